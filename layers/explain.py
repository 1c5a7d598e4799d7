"""Why each layer runs backward, and what its backward costs (``--explain-backward``).

The user's seed 000: they froze conv_2..conv_6 (``lr_mult: 0``) and training was no faster. Caffe
(and this tool) still run those layers' backward, because a trainable layer *below* them
(conv_1_1) needs the gradient of its top, which only exists if every layer between it and the loss
passes its input gradient down. Freezing a layer removes its weight-gradient half only; its
input-gradient half runs as long as something trainable sits below it.

:func:`analyse` is a pure function of a built :class:`layers.net.Net`: for every layer, whether it
runs backward and why (which trainable layers below it need its gradient), whether its
weight-gradient part is computed or skipped (``lr_mult: 0`` -> ``requires_grad=False``), whether
its input-gradient part is needed, and an estimate of what that costs: measured per-layer backward
times (:class:`layers.profile.LayerwiseRunner`, as ``trainer time`` measures them) when given, else
FLOP counts. For every trainable layer it also gives the layers that run backward *only* to reach
it, and what freezing it (or moving it above them) would save.

:func:`log_table` prints all that as glog ``I`` lines.
"""
import collections

from converters import glog
from layers.base import count

# Rough backward cost, in FLOPs per bottom element, of the input-gradient part of layers that are
# not matrix products (element-wise chains; the exact figure matters little next to convolutions).
_ELEMENTWISE_FACTOR = {
    "BatchNorm": 6, "LRN": 10, "MVN": 6, "Normalize": 5, "Softmax": 4, "SoftmaxWithLoss": 4,
    "MultiBoxLoss": 4, "Pooling": 2, "Scale": 2, "Eltwise": 1, "Concat": 1, "Slice": 1,
    "Flatten": 0, "Reshape": 0, "Permute": 1, "Split": 1, "Dropout": 1,
}
_MATMUL_TYPES = ("Convolution", "Deconvolution", "InnerProduct")

Row = collections.namedtuple("Row", [
    "index", "name", "type", "backward", "trainable", "weight", "inputs", "reach", "why",
    "weight_cost", "input_costs"])
# weight: "computed" | "skipped" | "partly" | "unreached" | "statistics" | None (no blobs)
# inputs: list per bottom of True (needed) / False (not needed)
# reach: frozenset of indices of the trainable layers whose gradients flow through this layer
# weight_cost / input_costs: the cost of the parts actually computed (0 for skipped parts), in
#   the analysis' unit (FLOPs or seconds)

Saving = collections.namedtuple("Saving", [
    "layer", "only_for", "move_up_saving", "freeze_saving", "highest"])
# layer: index of a trainable layer; only_for: indices of the layers that run backward only to
#   reach it; move_up_saving: their backward work (saved by moving the layer up past them);
#   freeze_saving: its own weight-gradient work plus every input gradient computed only for it;
#   highest: the topmost layer of only_for


class Analysis:
    def __init__(self, net, rows, savings, unit, total):
        self.net, self.rows, self.savings = net, rows, savings
        self.unit = unit            # "s" (measured) or "flop" (estimated)
        self.total = total          # total backward cost, same unit

    def row(self, name):
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def saving(self, name):
        for s in self.savings:
            if self.net.layer_names[s.layer] == name:
                return s
        return None


# ----------------------------------------------------------------------------- FLOPs
def _top_shape(net, li, j):
    return tuple(net.blob_shapes[net.top_names[li][j]])


def backward_flops(net, li):
    """(weight-gradient FLOPs, [input-gradient FLOPs per bottom]) of layer ``li`` if both parts
    were computed (multiply-add = 2 FLOPs)."""
    layer = net.layer_modules[li]
    kind = net.layer_types[li]
    bottoms = [tuple(s) for s in layer.bottom_shapes]
    blobs = list(layer.blobs)
    if kind in _MATMUL_TYPES and blobs:
        w = blobs[0].numel()
        macs = []
        for j, shape in enumerate(bottoms):
            if kind == "Convolution":
                macs.append(w * count(_top_shape(net, li, j)) // max(layer.num_output, 1))
            elif kind == "Deconvolution":
                macs.append(w * count(shape) // max(layer.channels, 1))
            else:  # InnerProduct: M rows of K inputs
                macs.append(w * count(shape, 0, layer.axis))
        weight = 2 * sum(macs)
        if len(blobs) > 1:
            weight += sum(count(_top_shape(net, li, j)) for j in range(len(net.top_names[li])))
        return weight, [2 * m for m in macs]
    factor = _ELEMENTWISE_FACTOR.get(kind, 1)
    inputs = [factor * count(s) for s in bottoms]
    tops = sum(count(_top_shape(net, li, j)) for j in range(len(net.top_names[li])))
    weight = 2 * tops if blobs and not getattr(layer, "no_param_grad", False) else 0
    return weight, inputs


# ----------------------------------------------------------------------------- analysis
def _under_loss(net):
    """Per layer: whether some loss depends on it (Caffe's ``layer_contributes_loss``)."""
    n = len(net.layer_modules)
    under, contributes = set(), [False] * n
    for li in range(n - 1, -1, -1):
        c = any(net.loss_weights[li][j] or t in under for j, t in enumerate(net.top_names[li]))
        contributes[li] = c
        if c:
            under.update(net.bottom_names[li])
    return contributes


def _names(net, indices, limit=4):
    names = [net.layer_names[i] for i in sorted(indices)]
    if len(names) > limit:
        return ", ".join(names[:limit]) + " and %d more" % (len(names) - limit)
    return ", ".join(names)


def analyse(net, times=None):
    """The backward analysis of ``net`` (see the module docstring).

    ``times``: optional per-layer measured backward seconds (``LayerwiseRunner.backward(graphs,
    times)`` summed over iterations: only ratios matter). Without it costs are FLOP counts.
    """
    n = len(net.layer_modules)
    contributes = _under_loss(net)
    trainable = []
    for li, layer in enumerate(net.layer_modules):
        grads = [b.requires_grad for b in layer.blobs]
        trainable.append(bool(net.need_backward[li] and any(grads)))
    # forward pass: which trainable layers' gradients flow through each blob version
    src = {}
    reach, bottom_src = [], []
    for li in range(n):
        need = net.need_backward[li]
        here = [frozenset(src.get(b, ())) for b in net.bottom_names[li]]
        bottom_src.append(here)
        r = {li} if trainable[li] else set()
        if need:
            for j, s in enumerate(here):
                if net.bottom_need_backward[li][j]:
                    r |= s
        r = frozenset(r)
        reach.append(r)
        for t in net.top_names[li]:
            src[t] = r if need else frozenset()

    # costs of the parts each layer actually computes
    flops = [backward_flops(net, li) for li in range(n)]
    weight_part, input_parts = [], []
    for li, layer in enumerate(net.layer_modules):
        blobs = list(layer.blobs)
        need = net.need_backward[li]
        wf, inf = flops[li]
        live = sum(b.numel() for b in blobs if b.requires_grad)
        total_w = sum(b.numel() for b in blobs)
        weight_part.append(wf * live / total_w if (need and total_w) else 0.0)
        input_parts.append([inf[j] if (need and net.bottom_need_backward[li][j]) else 0.0
                            for j in range(len(inf))])
    unit = "flop"
    if times is not None:
        unit = "s"
        for li in range(n):
            computed = weight_part[li] + sum(input_parts[li])
            t = float(times[li])
            if computed > 0:
                scale = t / computed
                weight_part[li] *= scale
                input_parts[li] = [c * scale for c in input_parts[li]]
            elif t > 0:           # measured work our FLOP model calls free: charge it to inputs
                k = len(input_parts[li])
                input_parts[li] = [t / k] * k if k else []
                if not k:
                    weight_part[li] = t
    total = sum(weight_part) + sum(sum(p) for p in input_parts)

    rows = []
    for li, layer in enumerate(net.layer_modules):
        need = net.need_backward[li]
        blobs = list(layer.blobs)
        grads = [b.requires_grad for b in blobs]
        if not blobs:
            weight = None
        elif getattr(layer, "no_param_grad", False):
            weight = "statistics"
        elif not any(grads):
            weight = "skipped"
        elif not need:
            weight = "unreached"
        elif all(grads):
            weight = "computed"
        else:
            weight = "partly"
        inputs = [bool(need and net.bottom_need_backward[li][j])
                  for j in range(len(net.bottom_names[li]))]
        others = reach[li] - {li}
        if not need:
            if not contributes[li]:
                why = "no loss depends on it"
            elif getattr(layer, "never_backward", False):
                why = "never back-propagates"
            else:
                why = "nothing at or below it trains"
        elif net.force_backward and not reach[li]:
            why = "force_backward: true"
        elif trainable[li] and others:
            why = "trains its own params; passes gradients down to %s" % _names(net, others)
        elif trainable[li]:
            why = "trains its own params"
        elif others:
            why = "only to pass gradients down to %s" % _names(net, others)
        else:
            why = "force_backward: true" if net.force_backward else "needs backward"
        rows.append(Row(li, net.layer_names[li], net.layer_types[li], need, trainable[li],
                        weight, inputs, reach[li], why, weight_part[li], input_parts[li]))

    savings = []
    for t in range(n):
        if not trainable[t]:
            continue
        only = [li for li in range(n) if li != t and net.need_backward[li] and reach[li] == {t}]
        # moving t up past them: their backward (input gradients only: none of them trains)
        move = sum(weight_part[li] + sum(input_parts[li]) for li in only)
        # freezing t: its own weight gradient, and every input gradient computed only for it
        # (those of the layers in `only`, and that of the first trainable layer above them)
        freeze = weight_part[t]
        for li in range(n):
            for j, s in enumerate(bottom_src[li]):
                if s == {t} and rows[li].inputs[j]:
                    freeze += input_parts[li][j]
        savings.append(Saving(t, only, move, freeze, max(only) if only else None))
    return Analysis(net, rows, savings, unit, total)


# ----------------------------------------------------------------------------- printing
def format_cost(value, unit):
    if unit == "s":
        return "%.3g ms" % (value * 1000.0)
    for scale, name in ((1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP"), (1e3, "kFLOP")):
        if value >= scale:
            return "%.3g %s" % (value / scale, name)
    return "%d FLOP" % int(value)


def _percent(part, total):
    return "%.1f%%" % (100.0 * part / total) if total > 0 else "0%"


_WEIGHT_TEXT = {
    None: "-", "computed": "computed", "skipped": "skipped (lr_mult 0)",
    "partly": "partly (some lr_mult 0)", "unreached": "none reaches it",
    "statistics": "none (statistics)",
}


def _input_text(inputs):
    if not inputs:
        return "-"
    k = sum(inputs)
    if k == len(inputs):
        return "needed"
    if k == 0:
        return "not needed"
    return "needed (%d of %d)" % (k, len(inputs))


def table_lines(analysis, summary_only=False):
    """The lines :func:`log_table` prints (without the glog prefix)."""
    net, unit = analysis.net, analysis.unit
    how = ("measured per-layer backward times" if unit == "s" else
           "FLOP counts (`trainer time` measures them)")
    lines = []
    if not summary_only:
        lines.append("Backward analysis (--explain-backward), in backward order; costs from %s:"
                     % how)
        width = min(max([len(r.name) for r in analysis.rows] + [5]), 40)
        twidth = min(max([len(r.type) for r in analysis.rows] + [4]), 16)
        head = "%-*s %-*s %-8s %-22s %-14s %10s  %s" % (
            width, "layer", twidth, "type", "backward", "weight gradient", "input gradient",
            "cost", "why")
        lines.append(head)
        for r in reversed(analysis.rows):
            cost = r.weight_cost + sum(r.input_costs)
            lines.append("%-*s %-*s %-8s %-22s %-14s %10s  %s" % (
                width, r.name, twidth, r.type, "yes" if r.backward else "no",
                _WEIGHT_TEXT[r.weight], _input_text(r.inputs),
                format_cost(cost, unit) if r.backward else "0", r.why))
    total = analysis.total
    running = [r for r in analysis.rows if r.backward]
    passing = [r for r in running if not r.trainable]
    lines.append("Backward: %d of %d layers run backward (%s in all); %d of them train no "
                 "params and run only to pass gradients down."
                 % (len(running), len(analysis.rows), format_cost(total, unit), len(passing)))
    for s in analysis.savings:
        if not s.only_for:
            continue
        name = net.layer_names[s.layer]
        lines.append(
            "%d layers run backward only to reach the trainable layer %s below them: %s. "
            "Freezing %s (lr_mult: 0 on all its params) would save %s (%s of the backward "
            "pass); moving it up past %s instead would save %s (%s) and keep it trainable."
            % (len(s.only_for), name, _names(net, s.only_for, limit=12), name,
               format_cost(s.freeze_saving, unit), _percent(s.freeze_saving, total),
               net.layer_names[s.highest], format_cost(s.move_up_saving, unit),
               _percent(s.move_up_saving, total)))
    return lines


def log_table(net, times=None, summary_only=False):
    """Print the backward analysis of ``net`` as glog I lines; returns the :class:`Analysis`."""
    analysis = analyse(net, times)
    for line in table_lines(analysis, summary_only):
        glog.info(line)
    return analysis
