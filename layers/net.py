"""The Net: builds a graph of layer modules from a NetParameter, as Caffe's ``Net::Init`` does.

This is the only module that knows prototxt structure. It reproduces, in Caffe's order and words:

* phase / level / stage filtering of layers (``FilterNet``, ``StateMeetsRule``);
* implicit ``Split`` layers for blobs consumed more than once (``InsertSplits``; names such as
  ``label_digits_1_split_0``);
* in-place tops (a top named as its bottom rebinds the blob name);
* loss weights (1 on top 0 of loss layers by default), ``propagate_down``, ``force_backward``;
* params shared by ``param { name }`` (the first layer owns it; shape, lr_mult and decay_mult must
  agree, with Caffe's errors);
* the backward analysis (which layers "need backward computation"), logged in reverse order.

Backward itself is torch autograd. The analysis is enforced, not only printed: a param with
``lr_mult: 0`` has ``requires_grad=False`` (no weight gradient is computed), a bottom that Caffe
would not back-propagate into is detached, and data never requires grad, so autograd runs no
backward at all for layers below the first trainable one.

The pycaffe-shaped API (``net.forward(**inputs)``, ``net.backward(**diffs)``, ``net.blobs``,
``net.params``) lets Caffe users' scripts port, and lets tests probe every blob.
"""
import collections

import numpy as np
import torch

from converters import caffe_pb2, glog
from converters.errors import CaffeError
from layers import registry
from layers.base import check_blob_counts, check_top_shape, count

PHASES = {"TRAIN": caffe_pb2.TRAIN, "TEST": caffe_pb2.TEST}
PHASE_NAMES = {v: k for k, v in PHASES.items()}


# ----------------------------------------------------------------------------- graph rewriting
def state_meets_rule(state, rule, layer_name, log):
    """Caffe's Net::StateMeetsRule, with its log lines."""
    if rule.HasField("phase") and rule.phase != state.phase:
        log("The NetState phase (%d) differed from the phase (%d) specified by a rule in layer %s"
            % (state.phase, rule.phase, layer_name), "net.cpp:296")
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        log("The NetState level (%d) is above the min_level (%d) specified by a rule in layer %s"
            % (state.level, rule.min_level, layer_name), "net.cpp:303")
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        log("The NetState level (%d) is above the max_level (%d) specified by a rule in layer %s"
            % (state.level, rule.max_level, layer_name), "net.cpp:311")
        return False
    for stage in rule.stage:
        if stage not in state.stage:
            log("The NetState did not contain stage '%s' specified by a rule in layer %s"
                % (stage, layer_name), "net.cpp:323")
            return False
    for stage in rule.not_stage:
        if stage in state.stage:
            log("The NetState contained a not_stage '%s' specified by a rule in layer %s"
                % (stage, layer_name), "net.cpp:337")
            return False
    return True


def filter_net(param, log):
    """Caffe's Net::FilterNet: keep the layers whose include/exclude rules meet the NetState."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(param)
    del out.layer[:]
    for layer in param.layer:
        if len(layer.include) and len(layer.exclude):
            raise CaffeError("Specify either include rules or exclude rules; not both. (layer %s)"
                             % layer.name, where="net.cpp:276")
        included = len(layer.include) == 0
        for rule in layer.exclude:
            if included and state_meets_rule(param.state, rule, layer.name, log):
                included = False
        for rule in layer.include:
            if not included and state_meets_rule(param.state, rule, layer.name, log):
                included = True
        if included:
            out.layer.add().CopyFrom(layer)
    return out


def insert_splits(param):
    """Caffe's InsertSplits: a Split layer for every top consumed by more than one bottom.

    A top with a non-zero explicit loss_weight counts as one extra consumer, as in Caffe.
    """
    last_top = {}            # blob name -> (layer index, top index)
    source_of_bottom = {}    # (layer, bottom) -> (layer, top)
    consumers = collections.Counter()
    loss_weight_of_top = {}
    layer_names = {-1: "input"}
    for i, name in enumerate(param.input):
        last_top[name] = (-1, i)
    for i, layer in enumerate(param.layer):
        layer_names[i] = layer.name
        for j, blob in enumerate(layer.bottom):
            if blob not in last_top:
                raise CaffeError("Unknown bottom blob '%s' (layer '%s', bottom index %d)"
                                 % (blob, layer.name, j), where="insert_splits.cpp:29")
            source_of_bottom[(i, j)] = last_top[blob]
            consumers[last_top[blob]] += 1
        for j, blob in enumerate(layer.top):
            last_top[blob] = (i, j)
        for j in range(min(len(layer.loss_weight), len(layer.top))):
            top = last_top[layer.top[j]]
            loss_weight_of_top[top] = layer.loss_weight[j]
            if layer.loss_weight[j]:
                consumers[top] += 1

    def split_layer(layer_name, blob, idx, n, loss_weight):
        split = caffe_pb2.LayerParameter()
        split.name = "%s_%s_%d_split" % (blob, layer_name, idx)
        split.type = "Split"
        split.bottom.append(blob)
        for k in range(n):
            split.top.append("%s_%s_%d_split_%d" % (blob, layer_name, idx, k))
            if loss_weight:
                split.loss_weight.append(loss_weight if k == 0 else 0)
        return split

    out = caffe_pb2.NetParameter()
    out.CopyFrom(param)
    del out.layer[:]
    next_split = collections.Counter()
    for i, name in enumerate(param.input):
        if consumers[(-1, i)] > 1:
            out.layer.add().CopyFrom(split_layer("input", name, i, consumers[(-1, i)], 0))
    for i, layer in enumerate(param.layer):
        new = out.layer.add()
        new.CopyFrom(layer)
        for j, blob in enumerate(new.bottom):
            top = source_of_bottom[(i, j)]
            if consumers[top] > 1:
                new.bottom[j] = "%s_%s_%d_split_%d" % (blob, layer_names[top[0]], top[1],
                                                       next_split[top])
                next_split[top] += 1
        for j, blob in enumerate(new.top):
            top = (i, j)
            if consumers[top] > 1:
                weight = loss_weight_of_top.get(top, 0)
                out.layer.add().CopyFrom(split_layer(layer.name, blob, j, consumers[top], weight))
                if weight:
                    del new.loss_weight[:]
                    next_split[top] += 1
    return out


def shape_string(shape):
    """Caffe's Blob::shape_string: "64 1 8 8 (4096)", "(1)" for a 0-axis blob."""
    return "".join("%d " % d for d in shape) + "(%d)" % count(shape)


# Set by ``trainer train --allow-python-layers``; Python layers are refused either way (nothing
# named by a net file is ever imported or run), the flag only changes what the error says.
ALLOW_PYTHON_LAYERS = False


def python_layer_message(lp):
    pp = lp.python_param
    what = "Layer '%s' is a Python layer (python_param module '%s', layer '%s')" % (
        lp.name, pp.module, pp.layer)
    if ALLOW_PYTHON_LAYERS:
        return (what + ": Python layers are not supported by trainer, even with "
                "--allow-python-layers (it never imports or runs code named by a net file). "
                "Replace it by built-in layers.")
    return (what + ": refused, since it would import and run code named by the net file. "
            "Python layers are not supported by trainer; replace it by built-in layers.")


# Exceptions a layer's setup raises on parameters it does not check itself (a filler with
# min > max, a zero or negative size): reported with the layer's name (not as an internal error).
_SETUP_ERRORS = (RuntimeError, ValueError, ZeroDivisionError, OverflowError, IndexError,
                 TypeError, ArithmeticError)


def _setup_error(lp, bottom_shapes, what, exc):
    """Raise ``exc`` as a CaffeError naming the layer (out-of-memory errors stay as they are)."""
    low = str(exc).lower()
    if "out of memory" in low or "can't allocate memory" in low:
        raise exc
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    raise CaffeError("Layer '%s' (type %s) could not %s with its parameters and bottom shapes "
                      "%s: %s: %s" % (lp.name, lp.type, what,
                                      ", ".join(shape_string(s) for s in bottom_shapes) or "none",
                                      type(exc).__name__, text), where="layer.hpp:72") from exc


# ----------------------------------------------------------------------------- pycaffe views
class BlobView:
    """``net.blobs[name]``: ``.data`` and ``.diff`` as numpy arrays, like pycaffe's Blob."""

    def __init__(self, net, name):
        self._net, self._name = net, name

    @property
    def data(self):
        provided = self._net._provided.get(self._name)
        if provided is not None:
            return provided.numpy()
        t = self._net._data.get(self._name)
        if t is None:
            return np.zeros(self._net.blob_shapes[self._name], np.float32)
        return t.detach().cpu().numpy()

    @property
    def diff(self):
        given = self._net._given.get(self._name)
        if given is not None:
            return given
        t = self._net._first.get(self._name)
        if t is None or t.grad is None:
            return np.zeros(self._net.blob_shapes[self._name], np.float32)
        return t.grad.detach().cpu().numpy()

    @property
    def shape(self):
        return tuple(self._net.blob_shapes[self._name])

    @property
    def count(self):
        return count(self.shape)


class ParamView:
    """``net.params[layer][i]``: a learnable blob with numpy ``.data`` and ``.diff``."""

    def __init__(self, tensor):
        self._t = tensor

    @property
    def data(self):
        return self._t.detach().cpu().numpy()

    @property
    def diff(self):
        if self._t.grad is None:
            return np.zeros(tuple(self._t.shape), np.float32)
        return self._t.grad.detach().cpu().numpy()

    @property
    def shape(self):
        return tuple(self._t.shape)


class LearnableParam:
    """One learnable blob as the solver sees it (Caffe's learnable_params_ entry)."""

    __slots__ = ("tensor", "lr_mult", "decay_mult", "name", "layer", "has_lr", "has_decay")

    def __init__(self, tensor, lr_mult, decay_mult, name, layer):
        self.tensor, self.lr_mult, self.decay_mult = tensor, lr_mult, decay_mult
        self.name, self.layer = name, layer
        self.has_lr = self.has_decay = False


# ----------------------------------------------------------------------------- the net
class Net(torch.nn.Module):
    """A Caffe net as a torch module. See the module docstring for the semantics."""

    def __init__(self, net, phase="TRAIN", weights=None, level=0, stages=(), log=True,
                 source=None):
        super().__init__()
        self.log_enabled = log
        if isinstance(net, (str, bytes)) or hasattr(net, "__fspath__"):
            from converters.prototxt import read_net
            source = str(net)
            param = read_net(source)
        else:
            param = caffe_pb2.NetParameter()
            param.CopyFrom(net)
        self.source = source
        if isinstance(phase, str):
            if phase not in PHASES:
                raise CaffeError("Unknown phase %s (use TRAIN or TEST)" % phase)
            phase = PHASES[phase]
        param.state.phase = phase
        if not isinstance(net, caffe_pb2.NetParameter):
            # Caffe's Net(file, phase, level, stages) constructor sets the level and appends
            # the stages (pycaffe: level 0, no stage); a NetParameter keeps its own state.
            param.state.level = level
            param.state.stage.extend(stages)
        elif level or stages:
            param.state.level = level
            param.state.stage.extend(stages)
        self.phase = PHASE_NAMES[phase]
        self._build(param)
        for path in ([weights] if isinstance(weights, str) else (weights or [])):
            self.copy_from(path)

    def _log(self, text, where):
        if self.log_enabled:
            glog.info(text, where=where)

    # ------------------------------------------------------------------ building
    def _build(self, in_param):
        from converters.prototxt import write_text
        filtered = filter_net(in_param, self._log)
        self._log("Initializing net from parameters: \n" + write_text(filtered), "net.cpp:53")
        param = insert_splits(filtered)
        self.name = param.name
        self.param_proto = param
        self.force_backward = param.force_backward
        self.layer_modules = torch.nn.ModuleList()
        self.layer_names, self.layer_types = [], []
        self.bottom_names, self.top_names = [], []      # per layer
        self.loss_weights = []                          # per layer, per top
        self.blob_shapes = collections.OrderedDict()
        self.blob_producer = {}
        self.input_blobs = []
        blob_need_backward = {}
        bottom_need_backward = []
        layer_need_backward = []
        available = set()
        memory = 0
        param_names = {}      # shared param name -> (layer idx, param idx, LearnableParam)
        self.learnable_params = []
        self._owners = {}     # (layer, param) -> (owner layer, owner param) for shared blobs
        self.param_specs = []  # per layer: list of (lr_mult, decay_mult, requires_grad)
        if len(param.input) or len(param.input_dim) or len(param.input_shape):
            raise CaffeError("Legacy net inputs should have been upgraded to an Input layer",
                             where="net.cpp:65")
        named = {}
        for li, lp in enumerate(param.layer):
            if lp.name in named:
                glog.warning("Layers %d and %d of net %s are both named '%s': weights are copied "
                             "(--weights, snapshots) and shared with the test net by layer name, "
                             "so the two cannot be told apart; give each layer its own name."
                             % (named[lp.name], li, param.name or "(unnamed)", lp.name))
            named.setdefault(lp.name, li)
            lp = self._copy_layer_param(lp)
            if not lp.HasField("phase"):
                lp.phase = param.state.phase     # Caffe: "Inherit phase from net if unset"
            if len(lp.propagate_down) and len(lp.propagate_down) != len(lp.bottom):
                raise CaffeError("propagate_down param must be specified either 0 or bottom_size "
                                 "times (layer %s)" % lp.name, where="net.cpp:77")
            if lp.type in ("Python", "PYTHON"):
                raise CaffeError(python_layer_message(lp), where="layer_factory.hpp:81")
            cls = registry.get(lp.type, lp.name)
            self._log("Creating layer %s" % lp.name, "layer_factory.hpp:77")
            for j, b in enumerate(lp.bottom):
                if b not in available:
                    raise CaffeError("Unknown bottom blob '%s' (layer '%s', bottom index %d)"
                                     % (b, lp.name, j), where="net.cpp:417")
            bottom_shapes = [self.blob_shapes[b] for b in lp.bottom]
            check_blob_counts(cls, lp, len(lp.bottom), len(lp.top))
            try:
                layer = cls(lp, bottom_shapes, self.phase)
            except _SETUP_ERRORS as exc:
                _setup_error(lp, bottom_shapes, "be set up", exc)
            except CaffeError as exc:
                self._note_shapeless_inputs(exc, lp)
                raise
            self._log("Creating Layer %s" % lp.name, "net.cpp:86")
            need_backward = False
            bnb = []
            for j, b in enumerate(lp.bottom):
                self._log("%s <- %s" % (lp.name, b), "net.cpp:408")
                available.discard(b)
                pd = lp.propagate_down[j] if len(lp.propagate_down) else True
                bnb.append(blob_need_backward[b] and pd)
                need_backward |= blob_need_backward[b]
            tops = list(lp.top)
            for j, t in enumerate(tops):
                if t in tops[:j]:
                    raise CaffeError("Top blob '%s' produced by multiple sources: layer '%s' "
                                     "names it as top %d and top %d"
                                     % (t, lp.name, tops.index(t), j), where="net.cpp:375")
                if j < len(lp.bottom) and t == lp.bottom[j]:
                    self._log("%s -> %s (in-place)" % (lp.name, t), "net.cpp:369")
                elif t in self.blob_shapes:
                    raise CaffeError("Top blob '%s' produced by multiple sources: layer '%s' "
                                     "names it, and layer '%s' already produces it (only a layer "
                                     "whose top and bottom at the same index share the name "
                                     "works in place)" % (t, lp.name, self.blob_producer[t]),
                                     where="net.cpp:375")
                else:
                    self._log("%s -> %s" % (lp.name, t), "net.cpp:382")
                available.add(t)
            for where, text in layer.extra_log_lines():
                self._log(text, where)
            self._log("Setting up %s" % lp.name, "net.cpp:124")
            try:
                top_shapes = layer.top_shapes()
            except _SETUP_ERRORS as exc:
                _setup_error(lp, bottom_shapes, "shape its tops", exc)
            if len(top_shapes) != len(tops):
                raise CaffeError("Layer %s (%s) produces %d tops but %d are named"
                                 % (lp.name, lp.type, len(top_shapes), len(tops)),
                                 where="layer.hpp:352")
            # loss weights: Caffe's SetLossWeights
            if len(lp.loss_weight):
                if len(lp.loss_weight) != len(tops):
                    raise CaffeError("loss_weight must be unspecified or specified once per top "
                                     "blob (layer %s)" % lp.name, where="layer.hpp:404")
                weights = [float(w) for w in lp.loss_weight]
            else:
                weights = [1.0 if (layer.is_loss and j == 0) else 0.0 for j in range(len(tops))]
            for j, (t, shape) in enumerate(zip(tops, top_shapes)):
                check_top_shape(lp, t, shape)
                self.blob_shapes[t] = tuple(shape)
                self.blob_producer[t] = lp.name
                self._log("Top shape: %s" % shape_string(shape), "net.cpp:131")
                if weights[j]:
                    self._log("    with loss weight %s" % glog.format_number(weights[j]),
                              "net.cpp:134")
                memory += count(shape)
            self._log("Memory required for data: %d" % (memory * 4), "net.cpp:139")
            # params
            specs = list(layer.param.param)
            if len(specs) > len(layer.blobs):
                raise CaffeError("Too many params specified for layer %s" % lp.name,
                                 where="net.cpp:146")
            layer_specs = []
            for pi in range(len(layer.blobs)):
                spec = specs[pi] if pi < len(specs) else caffe_pb2.ParamSpec()
                need_backward |= spec.lr_mult > 0
                layer_specs.append(spec)
            self._append_params(li, layer, layer_specs, param_names)
            layer_need_backward.append(need_backward)
            bottom_need_backward.append(bnb)
            for t in tops:   # an in-place top keeps its blob's flag unless this layer sets it
                blob_need_backward[t] = need_backward or blob_need_backward.get(t, False)
            self.layer_modules.append(layer)
            self.layer_names.append(lp.name)
            self.layer_types.append(lp.type)
            self.bottom_names.append(list(lp.bottom))
            self.top_names.append(tops)
            self.loss_weights.append(weights)

        # Caffe's backward pass over the layers: who contributes to the loss.
        under_loss, skip_backp = set(), set()
        n = len(self.layer_modules)
        for li in range(n - 1, -1, -1):
            contributes, skip_down = False, True
            for j, t in enumerate(self.top_names[li]):
                if self.loss_weights[li][j] or t in under_loss:
                    contributes = True
                if t not in skip_backp:
                    skip_down = False
                if contributes and not skip_down:
                    break
            if layer_need_backward[li] and skip_down:
                layer_need_backward[li] = False
                bottom_need_backward[li] = [False] * len(bottom_need_backward[li])
            if not contributes:
                layer_need_backward[li] = False
            if layer_need_backward[li]:
                self._log("%s needs backward computation." % self.layer_names[li], "net.cpp:200")
            else:
                self._log("%s does not need backward computation." % self.layer_names[li],
                          "net.cpp:202")
            for j, b in enumerate(self.bottom_names[li]):
                if contributes:
                    under_loss.add(b)
                else:
                    bottom_need_backward[li][j] = False
                if not bottom_need_backward[li][j]:
                    skip_backp.add(b)
        self.logged_need_backward = list(layer_need_backward)
        for li, layer in enumerate(self.layer_modules):
            if layer.never_backward and layer_need_backward[li] and any(bottom_need_backward[li]):
                name, kind = self.layer_names[li], self.layer_types[li]
                below = [b for b, need in zip(self.bottom_names[li], bottom_need_backward[li])
                         if need]
                raise CaffeError(
                    "Layer '%s' (type %s) needs backward computation, but %s has no backward "
                    "(Caffe stops at the first backward: Not Implemented Yet), so the loss above "
                    "it cannot train what produces %s. Set propagate_down: false for that "
                    "bottom, or lr_mult: 0 below it." % (name, kind, kind, ", ".join(
                        "'%s'" % b for b in below)))
        if self.force_backward:
            for li, layer in enumerate(self.layer_modules):
                layer_need_backward[li] = True
                for j in range(len(bottom_need_backward[li])):
                    bottom_need_backward[li][j] = (bottom_need_backward[li][j]
                                                   or layer.allow_force_backward(j))
        self.need_backward = layer_need_backward
        self.bottom_need_backward = bottom_need_backward
        # Params: requires_grad exactly where the diff is used: the learnable param's effective
        # lr_mult (a shared param takes a sharer's lr_mult when its owner sets none, as Caffe's
        # AppendParam), so a param frozen through a sharer computes no weight gradient.
        effective = {id(lp.tensor): lp.lr_mult for lp in self.learnable_params}
        for li, layer in enumerate(self.layer_modules):
            for pi, blob in enumerate(layer.blobs):
                spec_lr = effective.get(id(blob), self.param_specs[li][pi])
                wants = (spec_lr > 0 or self.force_backward) and not layer.no_param_grad
                if self._param_owner(li, pi) is None:
                    blob.requires_grad_(bool(wants))
        self.outputs = sorted(available)
        for name in self.outputs:
            self._log("This network produces output %s" % name, "net.cpp:244")
        self._log("Network initialization done.", "net.cpp:257")
        self.loss_tops = [(li, j, w) for li in range(n)
                          for j, w in enumerate(self.loss_weights[li]) if w]
        self.inputs = [t for li in range(n) if self.layer_types[li] == "Input"
                       for t in self.top_names[li]]
        self._detach = [[not bnb for bnb in bottom_need_backward[li]] for li in range(n)]
        self._data, self._first = {}, {}
        self._total = None
        self._given = {}
        # Input blobs keep their data between forwards, and pycaffe scripts write into
        # ``net.blobs['data'].data[...]``: these CPU tensors back that view.
        self._provided = {t: torch.zeros(self.blob_shapes[t]) for t in self.inputs}
        self.register_buffer("_device_probe", torch.empty(0), persistent=False)
        self.blobs = collections.OrderedDict((b, BlobView(self, b)) for b in self.blob_shapes)
        self.layer_dict = collections.OrderedDict(zip(self.layer_names, self.layer_modules))
        self.refresh_param_views()
        # Caffe's blob_loss_weights_: the weight of the (last) top that wrote each blob
        self._blob_loss_weight = {}
        for li in range(n):
            for j, t in enumerate(self.top_names[li]):
                self._blob_loss_weight[t] = self.loss_weights[li][j]
        self._install_label_checks()
        self._bn_scale_pairs = self._fusable_batchnorm_scale()
        self._plan = self._run_plan()

    def _fusable_batchnorm_scale(self):
        """(BatchNorm, Scale) pairs that ``run`` folds into one batch_norm with an affine: a
        Scale right after the BatchNorm, in place on the BatchNorm's top, which nothing else
        reads (an implicit split would have renamed it), with gradient flowing through it, a
        learned per-channel scale (and bias) and no loss weight on either top. In Caffe the
        BatchNorm top is overwritten by the Scale at once, so no blob, value or diff that Caffe
        shows changes; only the work: one kernel forward and one backward instead of three
        passes each (~10% of a ResNet step). pycaffe-style runs (``retain``) and partial
        runs keep the two layers apart, so that every blob version stays visible."""
        pairs = []
        for li in range(len(self.layer_modules) - 1):
            if self.layer_types[li] != "BatchNorm" or self.layer_types[li + 1] != "Scale":
                continue
            top = self.top_names[li]
            if (self.bottom_names[li + 1] != top or self.top_names[li + 1] != top
                    or self._detach[li + 1][0] or any(self.loss_weights[li])
                    or any(self.loss_weights[li + 1])):
                continue
            bn, scale = self.layer_modules[li], self.layer_modules[li + 1]
            if bn.fusable_with(scale):
                pairs.append((bn, scale))
        return pairs

    def _run_plan(self):
        """Per layer, what ``run`` needs, gathered once at build time (module, bottom names,
        indices of the bottoms to detach, top names, loss weights, is an Input): the loop then
        does no attribute or ModuleList lookups, which on a GPU are what a small net waits on.
        A plain list of tuples, so not registered as submodules."""
        return [(layer, tuple(self.bottom_names[li]),
                 tuple(j for j, d in enumerate(self._detach[li]) if d),
                 tuple(self.top_names[li]), tuple(self.loss_weights[li]),
                 self.layer_types[li] == "Input")
                for li, layer in enumerate(self.layer_modules)]

    def _fuse(self, on):
        for bn, scale in self._bn_scale_pairs:
            bn.fused_scale = (scale,) if on else ()
            scale.fused = on

    def _install_label_checks(self):
        """Let data layers refuse labels a SoftmaxWithLoss cannot take ([0, C) or its
        ignore_label) while they read them on the CPU: the check costs no device sync, and the
        error names the record; on a GPU torch would otherwise hit a device-side assert."""
        for li, layer in enumerate(self.layer_modules):
            if self.layer_types[li] not in ("SoftmaxWithLoss", "SOFTMAX_LOSS") or \
                    len(self.bottom_names[li]) < 2 or not hasattr(layer, "channels"):
                continue
            source = self._source_of(li, self.bottom_names[li][1])
            if source is None:
                continue
            si, top_index = source
            check = getattr(self.layer_modules[si], "check_labels", None)
            if check is not None:
                ignore = layer.ignore_label if getattr(layer, "has_ignore_label", False) else None
                check(top_index, int(layer.channels), ignore, self.layer_names[li])

    def _source_of(self, li, blob):
        """(layer index, top index) of the layer that produced ``blob`` for layer ``li``,
        looking through Split layers; None when it is not a single data layer's top."""
        for k in range(li - 1, -1, -1):
            if blob not in self.top_names[k]:
                continue
            if self.layer_types[k] == "Split":
                return self._source_of(k, self.bottom_names[k][0])
            if getattr(self.layer_modules[k], "is_data", False) and \
                    blob not in self.bottom_names[k]:
                return k, self.top_names[k].index(blob)
            return None
        return None

    def _forward_failed(self, li, bottoms, exc):
        """A layer's forward raised: when a bottom's shape is not the one the layer was set up
        for (data of another size than the first record's), that is the user's data, named
        here; anything else names the layer (degenerate parameters Caffe does not check)."""
        layer = self.layer_modules[li]
        setup = [tuple(s) for s in getattr(layer, "bottom_shapes", [])]
        for j, b in enumerate(bottoms):
            shape = tuple(b.shape)
            if j < len(setup) and shape != setup[j]:
                producer = self.blob_producer.get(self.bottom_names[li][j], "?")
                raise CaffeError(
                    "Layer '%s' (type %s) cannot take bottom '%s' of shape %s, which differs from "
                    "the shape the net was set up with, %s (produced by layer '%s': do all its "
                    "inputs have the same size?): %s" % (
                        self.layer_names[li], self.layer_types[li], self.bottom_names[li][j],
                        shape_string(shape), shape_string(setup[j]), producer,
                        str(exc).strip().splitlines()[0] if str(exc).strip() else
                        type(exc).__name__), where="net.cpp:577") from None
        text = (str(exc).strip().splitlines() or [""])[0]
        raise CaffeError(
            "Layer '%s' (type %s) failed in forward on bottoms %s: %s: %s (if the layer's "
            "parameters are valid, this is a bug of trainer: run again with --debug and report "
            "it)" % (self.layer_names[li], self.layer_types[li],
                     ", ".join(shape_string(tuple(b.shape)) for b in bottoms) or "none",
                     type(exc).__name__, text), where="net.cpp:577") from exc

    def refresh_param_views(self):
        """(Re)build ``net.params`` (after params were shared with another net)."""
        self.params = collections.OrderedDict(
            (self.layer_names[li], [ParamView(b) for b in layer.blobs])
            for li, layer in enumerate(self.layer_modules) if len(layer.blobs))

    def output_loss_weight(self, name):
        return self._blob_loss_weight.get(name, 0.0)

    def first_non_finite(self):
        """(blob, layer, type) of the first top, in layer order, holding a NaN or inf."""
        for li in range(len(self.layer_modules)):
            for t in self.top_names[li]:
                value = self._data.get(t)
                if value is not None and value.is_floating_point() and \
                        not bool(torch.isfinite(value).all()):
                    return t, self.layer_names[li], self.layer_types[li]
        return None

    @staticmethod
    def _copy_layer_param(lp):
        copy = caffe_pb2.LayerParameter()
        copy.CopyFrom(lp)
        return copy

    def _param_owner(self, li, pi):
        return self._owners.get((li, pi))

    def _append_params(self, li, layer, specs, param_names):
        """Caffe's Net::AppendParam: ownership, sharing checks, learnable params list."""
        lr_list = []
        for pi, spec in enumerate(specs):
            name = spec.name
            lr_list.append(spec.lr_mult)
            if not name or name not in param_names:
                lp = LearnableParam(layer.blobs[pi], spec.lr_mult, spec.decay_mult,
                                    name or "%s.%d" % (layer.name, pi), layer.name)
                lp.has_lr = spec.HasField("lr_mult")
                lp.has_decay = spec.HasField("decay_mult")
                self.learnable_params.append(lp)
                if name:
                    param_names[name] = (li, pi, lp)
                continue
            owner_li, owner_pi, owner = param_names[name]
            self._log("Sharing parameters '%s' owned by layer '%s', param index %d"
                      % (name, owner.layer, owner_pi), "net.cpp:501")
            mine, theirs = layer.blobs[pi], owner.tensor
            if spec.share_mode == caffe_pb2.ParamSpec.PERMISSIVE:
                if mine.numel() != theirs.numel():
                    raise CaffeError(
                        "Shared parameter blobs must have the same count: param '%s' of layer "
                        "'%s' has %d values, its owner layer '%s' has %d"
                        % (name, layer.name, mine.numel(), owner.layer, theirs.numel()),
                        where="net.cpp:510")
            elif tuple(mine.shape) != tuple(theirs.shape):
                raise CaffeError(
                    "Check failed: this_blob->shape() == owner_blob->shape(): shared param '%s' "
                    "has shape %s in layer '%s' but %s in its owner layer '%s'"
                    % (name, shape_string(mine.shape), layer.name, shape_string(theirs.shape),
                       owner.layer) + ". Give both layers the same num_output and input size, or "
                    "set share_mode: PERMISSIVE on the param to share by element count.",
                    where="net.cpp:513")
            if spec.HasField("lr_mult"):
                if owner.has_lr and spec.lr_mult != owner.lr_mult:
                    raise CaffeError(
                        "Shared param '%s' has mismatched lr_mult: %s in layer '%s' vs %s in its "
                        "owner layer '%s'. Give both the same lr_mult (or set it only on the "
                        "owner)." % (name, glog.format_number(spec.lr_mult), layer.name,
                                     glog.format_number(owner.lr_mult), owner.layer),
                        where="net.cpp:520")
                owner.has_lr, owner.lr_mult = True, spec.lr_mult
            if spec.HasField("decay_mult"):
                if owner.has_decay and spec.decay_mult != owner.decay_mult:
                    raise CaffeError(
                        "Shared param '%s' has mismatched decay_mult: %s in layer '%s' vs %s in "
                        "its owner layer '%s'. Give both the same decay_mult (or set it only on "
                        "the owner)." % (name, glog.format_number(spec.decay_mult), layer.name,
                                         glog.format_number(owner.decay_mult), owner.layer),
                        where="net.cpp:531")
                owner.has_decay, owner.decay_mult = True, spec.decay_mult
            self._share(layer, pi, theirs)
            self._owners[(li, pi)] = (owner_li, owner_pi)
        self.param_specs.append(lr_list)

    @staticmethod
    def _share(layer, pi, owner_tensor):
        """Make blob ``pi`` of ``layer`` the owner's tensor (one tensor, one gradient)."""
        old = layer.blobs[pi]
        for module in layer.modules():
            for key, value in list(module._parameters.items()):
                if value is old:
                    module._parameters[key] = owner_tensor

    # ------------------------------------------------------------------ weights
    def producer_type(self, blob):
        """The Caffe type of the layer that last wrote ``blob`` (None for an unknown blob)."""
        producer = self.blob_producer.get(blob)
        return None if producer is None else self.layer_types[self.layer_names.index(producer)]

    def _note_shapeless_inputs(self, exc, lp):
        """A layer that fails on a 0-D bottom fed by an Input layer without a shape: say so
        (Caffe names only the layer that fails, far from the missing ``input_param``)."""
        for b in lp.bottom:
            if self.blob_shapes.get(b) == () and self.producer_type(b) == "Input":
                producer = self.blob_producer[b]
                exc.message += (" -- bottom '%s' has no shape: its Input layer '%s' gives none "
                                "(input_param { shape { dim: ... } })" % (b, producer))
                exc.args = (exc.message,)
                return

    def copy_from(self, path_or_param, resuming=None):
        """Caffe's CopyTrainedLayersFrom: copy blobs by layer name; absent layers keep fillers.
        ``resuming``: the .solverstate whose learned_net this is (only for error messages)."""
        from converters.caffemodel import blob_to_array, read_caffemodel
        if isinstance(path_or_param, str):
            source = path_or_param
            param = read_caffemodel(path_or_param)
        else:
            source, param = "<NetParameter>", path_or_param
        index = {name: i for i, name in enumerate(self.layer_names)}
        for src in param.layer:
            li = index.get(src.name)
            if li is None:
                self._log("Ignoring source layer %s" % src.name, "net.cpp:758")
                continue
            layer = self.layer_modules[li]
            if len(src.blobs) != len(layer.blobs):
                raise CaffeError("Incompatible number of blobs for layer %s: %s has %d, the net "
                                 "has %d" % (src.name, source, len(src.blobs), len(layer.blobs)),
                                 where="net.cpp:765")
            for j, blob in enumerate(src.blobs):
                arr = blob_to_array(blob)
                target = layer.blobs[j]
                shape = tuple(target.shape)
                if tuple(arr.shape) != shape:
                    legacy = not len(blob.shape.dim)
                    padded = (1,) * (4 - len(shape)) + shape if len(shape) <= 4 else None
                    if not (legacy and padded is not None and tuple(arr.shape) == padded):
                        if resuming:
                            tail = ("(file %s, the learned_net of %s). A snapshot resumes only "
                                    "the net it was written for; to start from its weights with "
                                    "a changed net, use --weights and rename the changed layer."
                                    % (source, resuming))
                        else:
                            tail = ("(file %s). To learn this layer's parameters from scratch "
                                    "rather than copying from a saved net, rename the layer."
                                    % source)
                        raise CaffeError(
                            "Cannot copy param %d weights from layer '%s'; shape mismatch.  Source "
                            "param shape is %s; target param shape is %s %s" % (
                                j, src.name, shape_string(arr.shape), shape_string(shape), tail),
                            where="blob.cpp:500")
                with torch.no_grad():
                    target.copy_(torch.from_numpy(np.ascontiguousarray(arr)).reshape(shape))

    def to_proto(self, diffs=None):
        """The net's layers and blobs as a NetParameter (Caffe's Net::ToProto). ``diffs``
        ({id(blob tensor): tensor}, Caffe's ``write_diff``) adds each blob's diff; a blob
        without one (never updated) gets zeros, as Caffe's diff of a frozen param."""
        from converters.caffemodel import array_to_blob
        out = caffe_pb2.NetParameter()
        out.name = self.name
        for li, layer in enumerate(self.layer_modules):
            lp = out.layer.add()
            lp.CopyFrom(layer.param)
            del lp.blobs[:]
            for b in layer.blobs:
                data = b.detach().cpu().numpy()
                diff = None
                if diffs is not None:
                    d = diffs.get(id(b))
                    diff = d.detach().cpu().numpy() if d is not None else np.zeros_like(data)
                lp.blobs.add().CopyFrom(array_to_blob(data, diff))
        return out

    def save(self, path):
        from converters.caffemodel import write_caffemodel
        write_caffemodel(path, self.to_proto())

    # ------------------------------------------------------------------ running
    def run(self, retain=False, inputs=None, start=0, end=None):
        """Forward the layers [start, end]; returns the weighted total loss tensor (or None).

        ``retain`` keeps every blob's gradient after backward (pycaffe API, tests); the
        training path leaves it off so that autograd frees what it can.
        """
        data = self._data
        first = self._first
        if start == 0:
            data.clear()
            first.clear()
        seen = set()
        total = None
        plan = self._plan
        last = len(plan) - 1
        end = last if end is None else end
        fuse = bool(self._bn_scale_pairs) and not retain and start == 0 and end == last
        if fuse:
            self._fuse(True)
        try:
            for li in range(start, end + 1):
                layer, names, detach, tops_names, weights, is_input = plan[li]
                bottoms = [data[b] for b in names]
                for j in detach:
                    if bottoms[j].requires_grad:
                        bottoms[j] = bottoms[j].detach()
                if inputs is not None and is_input:
                    tops = [inputs[t] for t in tops_names]
                else:
                    try:
                        tops = layer(*bottoms)
                    except (RuntimeError, ValueError, IndexError) as exc:
                        if "out of memory" in str(exc) or "can't allocate memory" in str(exc):
                            raise
                        self._forward_failed(li, bottoms, exc)
                    if isinstance(tops, torch.Tensor):
                        tops = (tops,)
                for j, t in enumerate(tops_names):
                    value = tops[j]
                    if retain:
                        if id(value) in seen:
                            value = value.view_as(value)
                        seen.add(id(value))
                        if value.requires_grad:
                            value.retain_grad()
                    # in-place: the diff Caffe shows is the first version's. Kept only where a
                    # diff can be read (retain, or a leaf that gets .grad): elsewhere holding it
                    # would keep a copy of the blob that Caffe, which overwrites it, does not.
                    if (retain or (value.is_leaf and value.requires_grad)) and t not in first:
                        first[t] = value
                    data[t] = value
                    w = weights[j]
                    if w:                # Caffe: loss += weight * sum(top) (a scalar top as is)
                        term = value if value.dim() == 0 else value.sum()
                        if w != 1:
                            term = term * w
                        total = term if total is None else total + term
        finally:
            if fuse:
                self._fuse(False)
        return total

    # ------------------------------------------------------------------ pycaffe API
    def forward(self, blobs=None, start=None, end=None, **inputs):
        """pycaffe's Net.forward: feed Input blobs by keyword, returns {output: ndarray}."""
        device = self.device
        feed = {}
        for li in range(len(self.layer_modules)):
            if self.layer_types[li] != "Input":
                continue
            for t in self.top_names[li]:
                if t in inputs:
                    value = torch.as_tensor(np.asarray(inputs[t], dtype=np.float32))
                    if tuple(value.shape) != tuple(self._provided[t].shape):
                        raise CaffeError("Input blob %s has shape %s, the net expects %s"
                                         % (t, shape_string(value.shape),
                                            shape_string(self._provided[t].shape)))
                    self._provided[t].copy_(value)
                arr = self._provided[t].to(device, copy=True)
                arr.requires_grad_(bool(self.bottom_need_input(li)))
                feed[t] = arr
        unknown = set(inputs) - set(feed)
        if unknown:
            raise CaffeError("Input blob arguments do not match net inputs: %s (inputs: %s)"
                             % (", ".join(sorted(unknown)), ", ".join(self.inputs)))
        for p in self.parameters():
            p.grad = None
        self._given = {}
        self._total = self.run(retain=True, inputs=feed)
        names = self.outputs if blobs is None else list(self.outputs) + list(blobs)
        return {n: self.blobs[n].data for n in names}

    def backward(self, diffs=None, **top_diffs):
        """pycaffe's Net.backward: diffs for non-loss outputs by keyword; losses get loss_weight."""
        tensors, grads = [], []
        if self._total is not None and self._total.requires_grad:
            tensors.append(self._total)
            grads.append(torch.ones_like(self._total))
        for name, diff in top_diffs.items():
            if name not in self._data:
                raise CaffeError("Top diff given for unknown blob %s" % name)
            t = self._data[name]
            if not t.requires_grad:     # pycaffe keeps a diff written into any blob
                self._given[name] = np.asarray(diff, np.float32).reshape(tuple(t.shape))
                continue
            tensors.append(t)
            grads.append(torch.as_tensor(np.asarray(diff, np.float32), device=t.device))
        if tensors:
            torch.autograd.backward(tensors, grads)
        return {n: self.blobs[n].diff for n in self.inputs}

    def bottom_need_input(self, li):
        """Whether the Input layer ``li``'s tops get diffs (Caffe: only under force_backward)."""
        return self.force_backward and self.layer_modules[li].allow_force_backward(0)

    @property
    def device(self):
        return self._device_probe.device
