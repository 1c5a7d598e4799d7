"""The update rules of Caffe's SGD-family solvers, applied to torch parameters in place.

``Update.apply(rate, iteration)`` does what ``SGDSolver::ApplyUpdate`` does after the lr is known:

1. ``ClipGradients``: global L2 norm over all learnable diffs (per-param sum of squares, summed in
   float32 in param order, as Caffe's ``sumsq_diff`` loop); if it exceeds ``clip_gradients`` every
   diff is scaled by ``clip / norm`` and Caffe's line is logged (sgd_solver.cpp:99).
2. per param: ``Normalize`` (diff *= float(1) / iter_size), ``Regularize`` (L2: diff += decay *
   data; L1: diff += decay * sign(data); local decay = weight_decay * decay_mult, skipped when 0),
   ``ComputeUpdateValue`` (the solver's own formula, below), then ``Net::Update``: data -= diff.

All arithmetic is float32 with the same operation order as Caffe's CPU code (``axpby`` = scale
then axpy, ``powx(., 0.5)`` = sqrt, ...); the scalar coefficients (local rate, decay, 1 - momentum,
Adam's bias correction) are rounded exactly as Caffe's ``Dtype`` expressions round them. Params are
handled in groups of equal (lr_mult, decay_mult, device, dtype) with ``torch._foreach_*`` ops,
which compute the same elementwise expressions as a per-tensor loop.

Differences from Caffe, on purpose:
* a param with ``lr_mult: 0`` is skipped entirely (no decay, no history change, no update). Caffe
  runs the formulas with a zero local rate: the data are the same, but for AdaGrad / RMSProp /
  AdaDelta / Adam Caffe's history of such a param absorbs ``decay * data`` when decay_mult != 0.
* a param whose ``.grad`` is None counts as a zero diff.
"""
from dataclasses import dataclass

import numpy as np
import torch

from converters import glog
from converters.errors import CaffeError
from solvers.lr_policy import pow_double

_f32 = np.float32

# Caffe's solver registry (std::map, so sorted by name) and the legacy enum's upgrade names.
_LEGACY_TYPES = {0: "SGD", 1: "Nesterov", 2: "AdaGrad", 3: "RMSProp", 4: "AdaDelta", 5: "Adam"}
_TAG_CLIP = "sgd_solver.cpp:99"
_TAG_REGULARIZATION = "sgd_solver.cpp:177"
_TAG_FACTORY = "solver_factory.hpp:76"


@dataclass
class LearnableParam:
    """One of Caffe's ``learnable_params_`` as the update sees it (any object with these
    attributes works)."""
    tensor: torch.nn.Parameter
    lr_mult: float = 1.0
    decay_mult: float = 1.0
    name: str = ""


def _fmt(x):
    return glog.format_number(float(x))


def _sqrt(tensors):
    """Correctly rounded elementwise sqrt (Caffe's ``powx(x, 0.5)``: glibc ``powf`` on the CPU,
    ``sqrt`` on the GPU). torch's float32 CPU sqrt is off by one ulp for a sizeable share of
    inputs, so on the CPU it is taken in double and rounded once to float (exact for sqrt)."""
    if tensors and tensors[0].device.type == "cpu" and tensors[0].dtype == torch.float32:
        return [t.double().sqrt_().float() for t in tensors]
    return torch._foreach_sqrt(tensors)


def _check_failed(expr, a, b, message, where):
    raise CaffeError("Check failed: %s (%s vs. %s) %s" % (expr, _fmt(a), _fmt(b), message),
                     where=where)


def solver_type(solver_param):
    """The solver type string: ``type``, or the legacy ``solver_type`` enum when only it is set."""
    if not solver_param.HasField("type") and solver_param.HasField("solver_type"):
        return _LEGACY_TYPES.get(int(solver_param.solver_type), str(solver_param.solver_type))
    return solver_param.type


def make_update(solver_param, params):
    """Build the Update of ``solver_param``'s solver type (Caffe's SolverRegistry::CreateSolver,
    then the solver's constructor checks) over ``params`` (Caffe's learnable_params order)."""
    kind = solver_type(solver_param)
    cls = _REGISTRY.get(kind)
    if cls is None:
        _check_failed("registry.count(type) == 1", 0, 1,
                      "Unknown solver type: %s (known types: %s)"
                      % (kind, ", ".join(sorted(_REGISTRY))), _TAG_FACTORY)
    return cls(solver_param, params)


class _Group:
    __slots__ = ("indices", "lr_mult", "decay_mult")

    def __init__(self, lr_mult, decay_mult):
        self.indices = []
        self.lr_mult = lr_mult
        self.decay_mult = decay_mult


class Update:
    """Caffe's SGDSolver update (plain momentum SGD); subclasses override ``_compute``.

    ``history`` is Caffe's ``history_``: one zero-initialised blob per learnable param (its shape),
    and for AdaDelta / Adam a second set of N blobs after the first N; the solver saves and
    restores this list in ``.solverstate`` as Caffe does.
    """
    type_name = "SGD"
    history_sets = 1

    def __init__(self, solver_param, params):
        self.param = solver_param
        self.params = list(params)
        self.momentum = _f32(solver_param.momentum)
        self.weight_decay = _f32(solver_param.weight_decay)
        self.regularization_type = solver_param.regularization_type
        self.iter_size = int(solver_param.iter_size)
        self.clip_gradients = _f32(solver_param.clip_gradients)
        self.delta = _f32(solver_param.delta)
        self.momentum2 = _f32(solver_param.momentum2)
        self.rms_decay = _f32(solver_param.rms_decay)
        self.sanity_check()
        # snapshot_diff: the last update value of each param (Caffe's diff after
        # ComputeUpdateValue), by id of the param tensor; kept only when asked (a reference
        # per param, the history itself for SGD).
        self.keep_updates = bool(solver_param.snapshot_diff)
        self.last_updates = {}
        self.history = []
        for _ in range(self.history_sets):
            for p in self.params:
                self.history.append(torch.zeros_like(p.tensor.detach(),
                                                     memory_format=torch.contiguous_format))
        groups = {}
        for i, p in enumerate(self.params):
            lr_mult = _f32(p.lr_mult)
            if lr_mult == 0:
                continue        # frozen: untouched
            decay_mult = _f32(p.decay_mult)
            key = (float(lr_mult), float(decay_mult), p.tensor.device, p.tensor.dtype)
            if key not in groups:
                groups[key] = _Group(lr_mult, decay_mult)
            groups[key].indices.append(i)
        self._groups = list(groups.values())

    def sanity_check(self):
        """The solver constructor's CHECKs (none for SGD)."""

    # -- helpers -------------------------------------------------------------------------------
    def _hist(self, indices, set_index=0):
        n = len(self.params)
        return [self.history[set_index * n + i] for i in indices]

    def _follow_devices(self):
        # the net may have been moved after the Update was built: keep history beside the params
        n = len(self.params)
        for k in range(len(self.history)):
            t = self.params[k % n].tensor
            h = self.history[k]
            if h.device != t.device or h.dtype != t.dtype:
                self.history[k] = h.to(device=t.device, dtype=t.dtype)

    def _local_decay(self, group):
        return _f32(self.weight_decay * group.decay_mult)

    # -- the update ----------------------------------------------------------------------------
    def apply(self, rate, iteration):
        """Clip, normalize, regularize, compute the update value and subtract it from the data,
        in Caffe's order. ``rate`` is the solver lr (float32 value), ``iteration`` Caffe's iter_.
        Modifies params' data, their ``.grad`` tensors (as Caffe's diffs) and ``history``."""
        if self._groups and self.regularization_type not in ("L1", "L2"):
            if any(self._local_decay(g) != 0 for g in self._groups):
                raise CaffeError("Unknown regularization type: %s" % self.regularization_type,
                                 where=_TAG_REGULARIZATION)
        with torch.no_grad():
            if self.history and self.params and (
                    self.history[0].device != self.params[0].tensor.device):
                self._follow_devices()
            grads = [p.tensor.grad for p in self.params]
            self._clip(grads)
            rate = _f32(rate)
            for group in self._groups:
                idx = group.indices
                ps = [self.params[i].tensor for i in idx]
                gs = [grads[i] if grads[i] is not None else torch.zeros_like(ps[k])
                      for k, i in enumerate(idx)]
                # Normalize
                if self.iter_size != 1:
                    torch._foreach_mul_(gs, float(_f32(1) / _f32(self.iter_size)))
                # Regularize
                local_decay = self._local_decay(group)
                if local_decay != 0:
                    if self.regularization_type == "L2":
                        torch._foreach_add_(gs, ps, alpha=float(local_decay))
                    else:
                        torch._foreach_add_(gs, torch._foreach_sign(ps), alpha=float(local_decay))
                # ComputeUpdateValue, then Net::Update (data -= diff)
                local_rate = _f32(rate * group.lr_mult)
                updates = self._compute(idx, gs, local_rate, int(iteration))
                torch._foreach_sub_(ps, updates)
                if self.keep_updates:
                    for p, u in zip(ps, updates):
                        self.last_updates[id(p)] = u

    def _clip(self, grads):
        clip = self.clip_gradients
        if clip < 0:
            return
        live = [g for p, g in zip(self.params, grads)
                if g is not None and _f32(p.lr_mult) != 0]
        sumsq = _f32(0)
        if live:
            parts = [torch.dot(g.reshape(-1), g.reshape(-1)) for g in live]
            devices = {t.device for t in parts}
            if len(devices) == 1:
                values = torch.stack(parts).tolist()          # the one host sync
            else:
                values = [float(t) for t in parts]
            for v in values:
                sumsq = _f32(sumsq + _f32(v))
        l2norm = _f32(np.sqrt(sumsq))
        if l2norm > clip:
            scale = _f32(clip / l2norm)
            glog.info("Gradient clipping: scaling down gradients (L2 norm %s > %s) by scale "
                      "factor %s" % (_fmt(l2norm), _fmt(clip), _fmt(scale)), where=_TAG_CLIP)
            torch._foreach_mul_(live, float(scale))

    def _compute(self, idx, gs, local_rate, iteration):
        """Caffe's ComputeUpdateValue for the params ``idx`` with diffs ``gs`` (may be modified in
        place); returns the tensors to subtract from the data."""
        # history = momentum * history + local_rate * diff; diff = history
        hs = self._hist(idx)
        torch._foreach_mul_(hs, float(self.momentum))
        torch._foreach_add_(hs, gs, alpha=float(local_rate))
        return hs


class NesterovUpdate(Update):
    type_name = "Nesterov"

    def _compute(self, idx, gs, local_rate, iteration):
        m = self.momentum
        hs = self._hist(idx)
        # update = (1 + m) * h_new - m * h_old, h_new = m * h_old + local_rate * diff
        back = torch._foreach_mul(hs, float(-m))
        torch._foreach_mul_(hs, float(m))
        torch._foreach_add_(hs, gs, alpha=float(local_rate))
        torch._foreach_add_(back, hs, alpha=float(_f32(1) + m))
        return back


class AdaGradUpdate(Update):
    type_name = "AdaGrad"

    def sanity_check(self):
        if not self.momentum == 0:
            _check_failed("0 == this->param_.momentum()", 0, self.momentum,
                          "Momentum cannot be used with AdaGrad.", "sgd_solvers.hpp:75")

    def _compute(self, idx, gs, local_rate, iteration):
        hs = self._hist(idx)
        torch._foreach_add_(hs, torch._foreach_mul(gs, gs))      # h += diff^2
        denom = _sqrt(hs)
        torch._foreach_add_(denom, float(self.delta))             # sqrt(h) + delta
        torch._foreach_div_(gs, denom)
        torch._foreach_mul_(gs, float(local_rate))
        return gs


class RMSPropUpdate(Update):
    type_name = "RMSProp"

    def sanity_check(self):
        if not self.momentum == 0:
            _check_failed("0 == this->param_.momentum()", 0, self.momentum,
                          "Momentum cannot be used with RMSProp.", "sgd_solvers.hpp:95")
        if not self.rms_decay >= 0:
            _check_failed("this->param_.rms_decay() >= 0", self.rms_decay, 0,
                          "rms_decay should lie between 0 and 1.", "sgd_solvers.hpp:97")
        if not self.rms_decay < 1:
            _check_failed("this->param_.rms_decay() < 1", self.rms_decay, 1,
                          "rms_decay should lie between 0 and 1.", "sgd_solvers.hpp:99")

    def _compute(self, idx, gs, local_rate, iteration):
        d = self.rms_decay
        hs = self._hist(idx)
        sq = torch._foreach_mul(gs, gs)
        torch._foreach_mul_(hs, float(d))
        torch._foreach_add_(hs, sq, alpha=float(_f32(1) - d))     # h = d*h + (1-d)*diff^2
        denom = _sqrt(hs)
        torch._foreach_add_(denom, float(self.delta))
        torch._foreach_div_(gs, denom)
        torch._foreach_mul_(gs, float(local_rate))
        return gs


class AdaDeltaUpdate(Update):
    type_name = "AdaDelta"
    history_sets = 2

    def _compute(self, idx, gs, local_rate, iteration):
        m = self.momentum
        one_minus = float(_f32(1) - m)
        h_grad = self._hist(idx, 0)
        h_upd = self._hist(idx, 1)
        # running average of squared gradients
        sq = torch._foreach_mul(gs, gs)
        torch._foreach_mul_(h_grad, float(m))
        torch._foreach_add_(h_grad, sq, alpha=one_minus)
        # diff *= sqrt((delta + h_upd) / (delta + h_grad))
        ratio = torch._foreach_add(h_upd, float(self.delta))
        torch._foreach_div_(ratio, torch._foreach_add(h_grad, float(self.delta)))
        ratio = _sqrt(ratio)
        torch._foreach_mul_(gs, ratio)
        # running average of squared updates
        sq = torch._foreach_mul(gs, gs)
        torch._foreach_mul_(h_upd, float(m))
        torch._foreach_add_(h_upd, sq, alpha=one_minus)
        torch._foreach_mul_(gs, float(local_rate))
        return gs


class AdamUpdate(Update):
    type_name = "Adam"
    history_sets = 2

    def _compute(self, idx, gs, local_rate, iteration):
        b1, b2 = self.momentum, self.momentum2
        t = iteration + 1
        # C++: pow(float, int) promotes to double; the quotient is stored as float.
        with np.errstate(all="ignore"):
            correction = _f32(np.sqrt(np.float64(1) - pow_double(b2, t))
                              / (np.float64(1) - pow_double(b1, t)))
        ms = self._hist(idx, 0)
        vs = self._hist(idx, 1)
        torch._foreach_mul_(ms, float(b1))
        torch._foreach_add_(ms, gs, alpha=float(_f32(1) - b1))
        sq = torch._foreach_mul(gs, gs)
        torch._foreach_mul_(vs, float(b2))
        torch._foreach_add_(vs, sq, alpha=float(_f32(1) - b2))
        denom = _sqrt(vs)
        torch._foreach_add_(denom, float(self.delta))
        out = torch._foreach_div(ms, denom)
        torch._foreach_mul_(out, float(_f32(local_rate * correction)))
        return out


_REGISTRY = {cls.type_name: cls for cls in
             (Update, NesterovUpdate, AdaGradUpdate, RMSPropUpdate, AdaDeltaUpdate, AdamUpdate)}
