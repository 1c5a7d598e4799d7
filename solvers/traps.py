"""Caffe's silent traps, detected at solver start and reported as ``W`` lines.

* Frozen BatchNorm that still drifts (the user's seed 001): in TRAIN, a BatchNorm layer without
  ``use_global_stats: true`` normalises with batch statistics and keeps overwriting its running
  mean/variance, whatever the ``lr_mult`` of its blobs or of the Scale after it. If the user froze
  everything around it, they expect a fixed model and get one whose TEST outputs drift. We warn
  once per such layer (one ``W`` line naming the layer, why it looks frozen, and the fix) when:

  - the solver's ``base_lr`` is 0; or
  - the Scale layer after it has ``lr_mult: 0`` on every param it specifies (a Scale that gives
    ``lr_mult: 0`` for its scale only still trains its bias: the line says so); or
  - no layer connected to it (above or below, through any path) trains: every param there has
    ``lr_mult: 0`` or receives no gradient (e.g. a distillation teacher whose loss has
    ``loss_weight: 0``); or
  - it lies in a frozen backbone under a trained head: every layer with weights below it is
    frozen and it has no trainable Scale (``lr_mult: 0`` on BatchNorm's own three blobs is
    Caffe's idiom for every BatchNorm, so it is no sign of freezing by itself).

  A BatchNorm that sits in a trained part of the net is normal fine-tuning and gets no warning.
"""
from converters import glog


def _consumers(net, blob):
    return [li for li, bottoms in enumerate(net.bottom_names) if blob in bottoms]


def _uses_global_stats(layer):
    bn = layer.param.batch_norm_param
    if bn.HasField("use_global_stats"):
        return bn.use_global_stats
    return False              # Caffe's default in TRAIN


def _trains(net, li, base_lr):
    """Whether layer ``li`` gets weight updates: some param learns and a gradient reaches it."""
    if base_lr == 0 or not net.need_backward[li]:
        return False
    return any(b.requires_grad for b in net.layer_modules[li].blobs)


def _scale_after(net, li):
    """The first Scale layer reading the BatchNorm's top (in place or not), or None."""
    top = net.top_names[li][0]
    for c in range(li + 1, len(net.layer_modules)):
        if top in net.bottom_names[c] and net.layer_types[c] == "Scale":
            return c
        if top in net.top_names[c] and top not in net.bottom_names[c]:
            return None       # the name was rebound by another producer
    return None


def _connected(net, li, above=True):
    """Indices of the layers above (fed by; unless ``above`` is False) and below (feeding)
    layer ``li``, transitively."""
    n = len(net.layer_modules)
    producer = {}             # (layer, bottom index) -> producing layer
    last = {}
    for k in range(n):
        for j, b in enumerate(net.bottom_names[k]):
            if b in last:
                producer[(k, j)] = last[b]
        for t in net.top_names[k]:
            last[t] = k
    parents = [[producer[(k, j)] for j in range(len(net.bottom_names[k])) if (k, j) in producer]
               for k in range(n)]
    children = [[] for _ in range(n)]
    for k in range(n):
        for p in parents[k]:
            children[p].append(k)
    seen = set()
    for edges in ((parents, children) if above else (parents,)):
        stack = [li]
        while stack:
            k = stack.pop()
            for m in edges[k]:
                if m not in seen and m != li:
                    seen.add(m)
                    stack.append(m)
    return seen


def frozen_batchnorm_layers(net, base_lr):
    """[(bn layer name, reason)] for BatchNorm layers that will drift although frozen.

    ``reason`` says why the layer looks frozen (several reasons joined by "; ")."""
    found = []
    for li, layer in enumerate(net.layer_modules):
        if net.layer_types[li] != "BatchNorm" or _uses_global_stats(layer):
            continue
        reasons = []
        if base_lr == 0:
            reasons.append("base_lr is 0")
        sc = _scale_after(net, li)
        if sc is not None:
            specs = list(net.layer_modules[sc].param.param)
            nblobs = len(net.layer_modules[sc].blobs)
            if specs and all(s.lr_mult == 0 for s in specs):
                name = net.layer_names[sc]
                if len(specs) < nblobs:
                    reasons.append(
                        "its Scale layer '%s' has lr_mult 0 on its scale (its bias has no param "
                        "spec, so it keeps lr_mult 1: add a second param { lr_mult: 0 "
                        "decay_mult: 0 } to freeze it too)" % name)
                else:
                    reasons.append("its Scale layer '%s' is frozen (lr_mult 0)" % name)
        if base_lr != 0 and not any(_trains(net, k, base_lr) for k in _connected(net, li)):
            reasons.append("no layer above or below it trains (lr_mult 0, or no gradient "
                           "reaches them)")
        elif base_lr != 0 and (sc is None or not _trains(net, sc, base_lr)):
            below = [k for k in _connected(net, li, above=False) if net.layer_modules[k].blobs]
            if below and not any(_trains(net, k, base_lr) for k in below):
                reasons.append("it lies in the frozen part of the net: every layer with "
                               "weights below it (%s) has lr_mult 0 or gets no gradient"
                               % ", ".join("'%s'" % net.layer_names[k] for k in sorted(below)))
        if reasons:
            found.append((net.layer_names[li], "; ".join(reasons)))
    return found


def warn_frozen_batchnorm(net, solver_param):
    for name, reason in frozen_batchnorm_layers(net, solver_param.base_lr):
        glog.warning(
            "BatchNorm layer '%s' is not frozen: it runs in TRAIN with use_global_stats false "
            "(Caffe's default in TRAIN) while %s. lr_mult: 0 does not stop it: every training "
            "forward pass normalises with batch statistics and overwrites its running "
            "mean/variance, which the TEST net uses, so test outputs drift although the net "
            "looks frozen. To freeze it, set batch_norm_param { use_global_stats: true } in "
            "layer '%s'." % (name, reason, name))


def unlearned_global_stats_layers(net):
    """BatchNorm layers of a TRAIN net told to use global statistics that were never learned.

    Caffe then scales the stored (zero) mean and variance by 0 (its moving-average factor is 0),
    so the layer divides by sqrt(eps): about 316x for the default eps. Seed 003's pretraining
    net did exactly this while training from scratch, and diverged.
    """
    found = []
    for li, layer in enumerate(net.layer_modules):
        if net.layer_types[li] != "BatchNorm":
            continue
        bn = layer.param.batch_norm_param
        if not (bn.HasField("use_global_stats") and bn.use_global_stats):
            continue
        if len(layer.blobs) >= 3 and float(layer.blobs[2].detach().abs().sum()) == 0.0:
            found.append(net.layer_names[li])
    return found


def warn_unlearned_global_stats(net):
    for name in unlearned_global_stats_layers(net):
        glog.warning(
            "BatchNorm layer '%s' uses global statistics (use_global_stats: true) in TRAIN, but "
            "they were never learned (moving-average factor 0, no weights loaded for it): it "
            "divides by sqrt(eps) instead of the batch's standard deviation, so activations "
            "are amplified and training may diverge. Load a caffemodel that has its statistics, "
            "or leave use_global_stats unset while training from scratch." % name)
