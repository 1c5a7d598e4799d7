"""Opt-in speed modes Caffe never had, and how far each strays from the fp32 run.

* ``--amp bf16|fp16``: the forward of every net (train and test) runs under ``torch.autocast``
  (convolutions and matrix products in bf16 / fp16, reductions and losses in fp32 as autocast
  decides); params, gradients, the update and the history stay float32. fp16 on CUDA uses dynamic
  loss scaling (GradScaler's rule: scale 2^16, halved and the update skipped when a gradient
  overflows, doubled after 2000 good iterations). The CPU has no fast fp16: ``fp16`` there runs
  as bf16, with a W line.
* ``--channels-last``: 4-D weights (and so the activations convolutions produce) in NHWC memory
  order, the layout tensor cores and oneDNN prefer. Same arithmetic up to summation order.
* ``--tf32``: let cuDNN convolutions and cuBLAS matrix products on Ampere and later GPUs use
  TF32 tensor cores (10-bit mantissa inputs). Off by default (:func:`configure_tf32`): torch lets
  cuDNN use TF32 by default, which is not Caffe's float32 arithmetic (~1e-3 relative per layer).
* ``--compile``: ``torch.compile`` of the layer graph (``Net.run`` after the data layers, which
  stay eager: they read LMDBs on threads). Compiled once before training on a zero batch (weights,
  statistics and RNG put back afterwards); if that fails, a W line says why and the net runs
  eagerly. Backend: ``inductor``, or ``$TRAINER_COMPILE_BACKEND`` (e.g. ``aot_eager``).

None of these is Caffe's arithmetic, so a run with any of them ends with one I line: the maximum
relative deviation of its per-iteration losses from those of an fp32 eager run of the same first
N iterations (``--speed-check-iters``, default 100; 0 skips the check) from the same weights, data
and RNG state. :func:`compare` runs both from scratch (tests, benchmarks).
"""
import contextlib
import functools
import gc
import os
from typing import NamedTuple

import numpy as np
import torch

from converters import caffe_pb2, glog


class SpeedOptions(NamedTuple):
    amp: str = ""               # "", "bf16" or "fp16"
    channels_last: bool = False
    compile: bool = False
    check_iters: int = 100
    tf32: bool = False

    def active(self):
        return bool(self.amp or self.channels_last or self.compile or self.tf32)

    def describe(self):
        parts = []
        if self.amp:
            parts.append("--amp %s" % self.amp)
        if self.channels_last:
            parts.append("--channels-last")
        if self.compile:
            parts.append("--compile")
        if self.tf32:
            parts.append("--tf32")
        return " ".join(parts) or "fp32"


class SpeedState:
    """What :func:`apply` did to a solver (kept as ``solver.speed_state``)."""

    def __init__(self, options):
        self.options = options
        self._losses = []           # the first check_iters iterations' losses, on the device
        self.amp_dtype = None
        self.compiled = False
        self.scaler = None

    def record(self, loss):
        """Keep one iteration's loss (the solver's device tensor, read only when asked)."""
        self._losses.append(loss.detach().reshape(()).float())

    @property
    def losses(self):
        """The recorded losses as floats (one transfer from the device)."""
        return torch.stack(self._losses).tolist() if self._losses else []


# ----------------------------------------------------------------------------- applying modes
def configure_tf32(enabled=False):
    """Caffe's float32 on CUDA: no TF32 in cuDNN convolutions (torch's default allows it) nor in
    cuBLAS matrix products. Call once a CUDA device is chosen; ``--tf32`` passes True."""
    torch.backends.cudnn.allow_tf32 = bool(enabled)
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)


def amp_dtype(name, device, warn=True):
    if not name:
        return None
    if name not in ("bf16", "fp16"):
        from converters.errors import CaffeError
        raise CaffeError("--amp must be bf16 or fp16 (got %s)" % name)
    if name == "fp16" and torch.device(device).type != "cuda":
        if warn:
            glog.warning("--amp fp16 on the CPU: the CPU has no fast fp16 arithmetic; using bf16 "
                         "autocast instead")
        return torch.bfloat16
    return torch.bfloat16 if name == "bf16" else torch.float16


def apply(solver, options, log=True):
    """Put ``options``' speed modes on a built solver (before training). Returns its
    :class:`SpeedState`, also stored as ``solver.speed_state``."""
    state = SpeedState(options)
    device = solver.device
    if device.type == "cuda":
        configure_tf32(options.tf32)
    nets = [solver.net] + list(solver.test_nets)
    if options.channels_last:
        _channels_last(solver, nets)
    if options.amp:
        state.amp_dtype = amp_dtype(options.amp, device, warn=log)
    if options.compile:       # compiled under the autocast state it will run in
        state.compiled = all([_compile(net, log, train=(net is solver.net),
                                       amp=state.amp_dtype) for net in nets])
    if options.amp:
        for net in nets:
            _autocast(net, device.type, state.amp_dtype)
    if state.amp_dtype == torch.float16 and device.type == "cuda":
        state.scaler = LossScaler(solver)    # outermost: scales the fp32 total loss
    if options.check_iters > 0:
        def record(solver, loss):
            if len(state._losses) < options.check_iters:
                state.record(loss)
            return loss
        hooks = dict(solver.hooks)
        hooks["gradients_ready"] = list(hooks.get("gradients_ready", ())) + [record]
        solver.hooks = hooks
    if log and options.active():
        glog.info("Speed modes: %s (not Caffe's arithmetic; the losses are compared with fp32 at "
                  "the end)" % options.describe())
    solver.speed_state = state
    return state


def _channels_last(solver, nets):
    cl = torch.channels_last
    for net in nets:
        net.to(memory_format=cl)
    update = solver.update
    n = len(update.params)
    for k, h in enumerate(update.history):
        if h.dim() == 4 and update.params[k % n].tensor.is_contiguous(memory_format=cl):
            update.history[k] = h.contiguous(memory_format=cl)


def _autocast(net, device_type, dtype):
    inner = net.run

    @functools.wraps(inner)
    def run(*args, **kwargs):
        with torch.autocast(device_type, dtype=dtype):
            total = inner(*args, **kwargs)
        if total is not None and total.dtype != torch.float32:
            total = total.float()
        return total
    net.run = run


class LossScaler:
    """Dynamic loss scaling for fp16 (torch.amp.GradScaler's rule, without an optimizer): the train
    net's total loss is multiplied by ``scale`` before backward; the ``gradients_ready`` hook
    divides the gradients and the loss by it; an overflow skips that iteration's update."""

    def __init__(self, solver, init_scale=2.0 ** 16, growth=2.0, backoff=0.5, interval=2000):
        self.solver = solver
        self.scale = float(init_scale)
        self.growth, self.backoff, self.interval = growth, backoff, interval
        self.good = 0
        self.skip = False
        net = solver.net
        inner = net.run

        @functools.wraps(inner)
        def run(*args, **kwargs):
            total = inner(*args, **kwargs)
            if total is not None and torch.is_grad_enabled() and total.requires_grad:
                return total * self.scale
            return total
        net.run = run
        update = solver.update
        apply_update = update.apply

        @functools.wraps(apply_update)
        def apply_or_skip(*args, **kwargs):
            if self.skip:
                self.skip = False
                return None
            return apply_update(*args, **kwargs)
        update.apply = apply_or_skip
        hooks = dict(solver.hooks)
        # after a data-parallel all-reduce (so that every process agrees on an overflow)
        hooks["gradients_ready"] = list(hooks.get("gradients_ready", ())) + [self]
        solver.hooks = hooks

    def __call__(self, solver, loss):
        inv = 1.0 / self.scale
        grads = [lp.tensor.grad for lp in solver.net.learnable_params
                 if lp.tensor.grad is not None]
        found = False
        if grads:
            flag = torch.zeros(1, device=grads[0].device)
            try:
                torch._amp_foreach_non_finite_check_and_unscale_(
                    grads, flag, torch.full((1,), inv, device=grads[0].device))
                found = bool(flag.item())
            except (RuntimeError, NotImplementedError):   # pragma: no cover - old torch / CPU
                torch._foreach_mul_(grads, inv)
                found = not all(bool(torch.isfinite(g).all()) for g in grads)
        loss = loss * inv
        if found:
            self.skip = True
            self.scale *= self.backoff
            self.good = 0
            glog.info("fp16 gradient overflow at iteration %d: update skipped, loss scale now %s"
                      % (solver.iter, glog.format_number(self.scale)))
        else:
            self.good += 1
            if self.good >= self.interval:
                self.scale *= self.growth
                self.good = 0
        return loss


def _leading_data_layers(net):
    k = 0
    for layer in net.layer_modules:
        if not getattr(layer, "is_data", False):
            break
        k += 1
    return k


def _straight_line_run(net, k):
    """``Net.run(start=k)`` (retain off) as straight-line Python generated for this net: one
    statement per layer, no loop and no try block, so that a graph break inside a layer (e.g. a
    layer reading its protobuf parameter in forward) splits the compiled graph there instead of
    making torch.compile give up on the whole net."""
    lines = ["def run(self, data, first):", "    L = self.layer_modules", "    total = None"]
    var = {}          # blob name -> local variable holding its current value
    for li in range(k):
        for t in net.top_names[li]:
            var[t] = "d%d" % len(var)
            lines.append("    %s = data[%r]" % (var[t], t))
    counter = [0]

    def fresh():
        counter[0] += 1
        return "v%d" % counter[0]
    for li in range(k, len(net.layer_modules)):
        args = []
        for j, b in enumerate(net.bottom_names[li]):
            name = var[b]
            args.append(name + ".detach()" if net._detach[li][j] else name)
        out = fresh()
        lines.append("    %s = L[%d](%s)" % (out, li, ", ".join(args)))
        lines.append("    if isinstance(%s, torch.Tensor):" % out)
        lines.append("        %s = (%s,)" % (out, out))
        for j, t in enumerate(net.top_names[li]):
            v = fresh()
            lines.append("    %s = %s[%d]" % (v, out, j))
            # no first[...] for computed tops: as Net.run(retain=False), the version an in-place
            # layer overwrites is not held (Caffe keeps no copy of it)
            lines.append("    data[%r] = %s" % (t, v))
            var[t] = v
            w = net.loss_weights[li][j]
            if w:
                term = "%s.sum()" % v if w == 1 else "(%s.sum() * %r)" % (v, float(w))
                lines.append("    total = %s if total is None else total + %s" % (term, term))
    lines.append("    return total")
    namespace = {"torch": torch}
    exec(compile("\n".join(lines) + "\n", "<trainer net %s>" % net.name, "exec"), namespace)
    return namespace["run"]


def _compile(net, log=True, train=True, amp=None):
    """Compile the layers after the leading data layers; True when it worked."""
    backend = os.environ.get("TRAINER_COMPILE_BACKEND", "inductor")
    eager = net.run
    k = _leading_data_layers(net)
    if k >= len(net.layer_modules) or (k == 0 and net.inputs):
        return False
    try:
        body = _straight_line_run(net, k)
        compiled_body = torch.compile(body, backend=backend, dynamic=False)

        def compiled():
            return compiled_body(net, net._data, net._first)
        autocast = (torch.autocast(net.device.type, dtype=amp) if amp is not None
                    else contextlib.nullcontext())
        with torch.set_grad_enabled(train), autocast:
            _probe(net, compiled, k)
    except Exception as exc:     # noqa: BLE001 - any failure means: run eagerly
        if log:
            text = str(exc).strip().splitlines()
            glog.warning("--compile: torch.compile of net %s (%s phase) failed, running it "
                         "eagerly: %s: %s" % (net.name, net.phase, type(exc).__name__,
                                              text[0] if text else ""))
        torch._dynamo.reset()
        return False
    state = {"ok": True}

    @functools.wraps(eager)
    def run(retain=False, inputs=None, start=0, end=None):
        if retain or inputs is not None or start != 0 or end is not None or not state["ok"]:
            return eager(retain=retain, inputs=inputs, start=start, end=end)
        head = eager(start=0, end=k - 1) if k else None
        if not k:
            net._data.clear()
            net._first.clear()
        try:
            tail = compiled()
        except Exception as exc:   # noqa: BLE001
            state["ok"] = False
            text = str(exc).strip().splitlines()
            glog.warning("--compile: the compiled net %s failed (%s: %s); running it eagerly from "
                         "now on" % (net.name, type(exc).__name__, text[0] if text else ""))
            tail = eager(start=k)
        if head is None:
            return tail
        return tail if tail is None else head + tail
    net.run = run
    return True


def _probe(net, compiled, k):
    """Compile now (forward and backward) on zero data tops; put back every blob, the RNG state
    and the gradients."""
    device = net.device
    blobs = [b for layer in net.layer_modules for b in layer.blobs]
    saved = [b.detach().clone() for b in blobs]
    grads = [b.grad for b in blobs]
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if device.type == "cuda" else None
    try:
        net._data.clear()
        net._first.clear()
        for li in range(k):
            for t in net.top_names[li]:
                value = torch.zeros(net.blob_shapes[t], dtype=torch.float32, device=device)
                net._data[t] = value
                net._first[t] = value
        total = compiled()
        if total is not None and total.requires_grad:
            total.backward()
    finally:
        with torch.no_grad():
            for b, s, g in zip(blobs, saved, grads):
                b.copy_(s)
                b.grad = g
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        net._data.clear()
        net._first.clear()


# ----------------------------------------------------------------------------- deviation check
def capture_rng(device=None):
    """The RNG state a solver is built from (to build the fp32 reference the same way)."""
    cuda = None
    if torch.cuda.is_available() and device is not None and torch.device(device).type == "cuda":
        cuda = torch.cuda.get_rng_state_all()
    return torch.get_rng_state(), cuda, np.random.get_state()


def _set_rng(rng):
    if rng is None:
        return
    cpu, cuda, numpy_state = rng
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    np.random.set_state(numpy_state)


@contextlib.contextmanager
def _quiet():
    level = glog._State.min_level
    glog._State.min_level = max(level, 1)
    try:
        yield
    finally:
        glog._State.min_level = level


def loss_trace(param, options, iters, device="cpu", rng=None, snapshot="", keep_sparsity=False):
    """Per-iteration losses of the first ``iters`` iterations of a solver built from ``param``
    (tests, display and snapshots off) with ``options``' modes, from RNG state ``rng``."""
    from solvers.solver import Solver
    quiet = caffe_pb2.SolverParameter()
    quiet.CopyFrom(param)
    quiet.test_interval = 0
    quiet.display = 0
    quiet.snapshot = 0
    quiet.snapshot_after_train = False
    options = options._replace(check_iters=int(iters))
    with _quiet():
        _set_rng(rng)
        if torch.device(device).type == "cuda":
            configure_tf32(options.tf32)
        solver = Solver(quiet, device=device, keep_sparsity=keep_sparsity)
        try:
            if snapshot:
                solver.restore(snapshot)
            state = apply(solver, options, log=False)
            solver.step(int(iters))
            return list(state.losses)
        finally:
            release(solver)


def max_relative_deviation(losses, reference):
    n = min(len(losses), len(reference))
    worst = 0.0
    for a, b in zip(losses[:n], reference[:n]):
        if not (np.isfinite(a) and np.isfinite(b)):
            return float("inf")
        worst = max(worst, abs(a - b) / max(abs(b), 1e-12))
    return worst


def log_deviation(options, deviation, iters):
    glog.info("Speed modes %s: the losses of the first %d iterations stray from the fp32 run's by "
              "at most %s (max relative deviation)" % (options.describe(), iters,
                                                       glog.format_number(deviation)))


def compare(param, options, iters=100, device="cpu", snapshot=""):
    """Run ``iters`` iterations with ``options`` and in fp32 from the same start; log and return
    ``(max relative deviation, mode losses, fp32 losses)``."""
    rng = capture_rng(device)
    mode = loss_trace(param, options, iters, device, rng, snapshot)
    ref = loss_trace(param, SpeedOptions(), iters, device, rng, snapshot)
    deviation = max_relative_deviation(mode, ref)
    log_deviation(options, deviation, min(len(mode), len(ref)))
    return deviation, mode, ref


def report_after_training(state, param, device, rng, snapshot="", keep_sparsity=False):
    """The end-of-training I line: the recorded losses against a fresh fp32 run of as many
    iterations (built from the same RNG state, weights and snapshot)."""
    if state is None or not state.options.active():
        return None
    losses = state.losses
    if not losses:
        return None
    n = len(losses)
    ref = loss_trace(param, SpeedOptions(), n, device, rng, snapshot, keep_sparsity)
    deviation = max_relative_deviation(losses, ref)
    log_deviation(state.options, deviation, min(n, len(ref)))
    return deviation


def release(solver):
    """Stop a solver's data threads and drop its tensors' memory (before building another)."""
    for net in [solver.net] + list(solver.test_nets):
        for layer in net.layer_modules:
            closer = getattr(layer, "close", None)
            if getattr(layer, "is_data", False) and closer is not None:
                try:
                    closer()
                except Exception:  # pragma: no cover
                    pass
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
