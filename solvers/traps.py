"""Caffe's silent traps, detected at solver start and reported as ``W`` lines.

* Frozen BatchNorm that still drifts (the user's seed 001): in TRAIN, a BatchNorm layer without
  ``use_global_stats: true`` normalises with batch statistics and keeps overwriting its running
  mean/variance, whatever the ``lr_mult`` of its blobs or of the Scale after it. If the user froze
  everything around it (its Scale, or ``base_lr: 0``), they expect a fixed model and get one whose
  TEST outputs drift. We warn once per such layer, naming it and the fix.
"""
from converters import glog


def _consumers(net, blob):
    return [li for li, bottoms in enumerate(net.bottom_names) if blob in bottoms]


def _frozen(net, li):
    return all(lr == 0 for lr in net.param_specs[li]) if net.param_specs[li] else True


def frozen_batchnorm_layers(net, base_lr):
    """[(bn layer name, reason)] for BatchNorm layers that will drift although frozen."""
    found = []
    for li, layer in enumerate(net.layer_modules):
        if net.layer_types[li] != "BatchNorm":
            continue
        bn = layer.param.batch_norm_param
        uses_global = bn.use_global_stats if bn.HasField("use_global_stats") else False
        if uses_global:
            continue
        if base_lr == 0:
            found.append((net.layer_names[li], "base_lr is 0"))
            continue
        top = net.top_names[li][0]
        scales = [c for c in _consumers(net, top) if net.layer_types[c] == "Scale" and c > li]
        # an in-place Scale consumes the same blob name later in the net
        if not scales:
            scales = [c for c in range(li + 1, len(net.layer_modules))
                      if net.layer_types[c] == "Scale" and top in net.bottom_names[c]]
        if scales and all(_frozen(net, c) for c in scales[:1]):
            found.append((net.layer_names[li],
                          "its Scale layer '%s' is frozen (lr_mult 0)" % net.layer_names[scales[0]]))
    return found


def warn_frozen_batchnorm(net, solver_param):
    for name, reason in frozen_batchnorm_layers(net, solver_param.base_lr):
        glog.warning(
            "BatchNorm layer '%s' runs in TRAIN with use_global_stats false while %s: it still "
            "normalises with batch statistics and updates its running mean/variance every "
            "iteration, so the model keeps changing although it looks frozen. To freeze it, set "
            "batch_norm_param { use_global_stats: true } in layer '%s'." % (name, reason, name),
            where="traps.py:1")
