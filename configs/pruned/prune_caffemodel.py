#!/usr/bin/env python3
"""Prune a .caffemodel by magnitude: in each Convolution, Deconvolution and InnerProduct layer,
set the given fraction of weights with the smallest absolute value to exactly zero (biases and
other layers are copied unchanged). Fine-tune the result with ``trainer train --keep-sparsity``,
which keeps those zeros at zero.

    python configs/pruned/prune_caffemodel.py configs/pruned/snapshots/dense_iter_300.caffemodel \\
        configs/pruned/snapshots/pruned.caffemodel --sparsity 0.7 --layer ip1=0.9

``--sparsity`` applies to every prunable layer; ``--layer NAME=FRACTION`` (repeatable) overrides it
for one layer (0 leaves the layer dense). Ties at the threshold are broken by position, so exactly
``round(fraction * count)`` weights are zero afterwards (more if the layer already had zeros).
"""
import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

PRUNABLE = ("Convolution", "Deconvolution", "InnerProduct")


def prune_weights(weights, fraction):
    """A copy of ``weights`` with the ``fraction`` of smallest-magnitude entries set to 0."""
    flat = np.asarray(weights, dtype=np.float32).ravel().copy()
    k = int(round(fraction * flat.size))
    if k > 0:
        order = np.argsort(np.abs(flat), kind="stable")
        flat[order[:k]] = 0.0
    return flat.reshape(np.shape(weights))


def prune_caffemodel(src, dst, sparsity, per_layer=None, log=print):
    """Prune ``src`` into ``dst``; returns {layer: (zeros, count)} of the pruned layers."""
    from converters.caffemodel import array_to_blob, blob_to_array, read_caffemodel, \
        write_caffemodel
    per_layer = dict(per_layer or {})
    model = read_caffemodel(src)
    report = {}
    for layer in model.layer:
        if layer.type not in PRUNABLE or not len(layer.blobs):
            continue
        fraction = per_layer.pop(layer.name, sparsity)
        if not 0.0 <= fraction <= 1.0:
            raise SystemExit("sparsity of layer %s must be in [0, 1], got %s" % (layer.name,
                                                                                  fraction))
        weights = blob_to_array(layer.blobs[0])
        pruned = prune_weights(weights, fraction)
        layer.blobs[0].CopyFrom(array_to_blob(pruned))
        report[layer.name] = (int((pruned == 0).sum()), int(pruned.size))
        if log:
            log("%-12s %-14s %7d of %7d weights zero (%.1f%%)" % (
                layer.name, layer.type, report[layer.name][0], pruned.size,
                100.0 * report[layer.name][0] / max(pruned.size, 1)))
    if per_layer:
        raise SystemExit("no prunable layer named %s in %s" % (", ".join(sorted(per_layer)), src))
    write_caffemodel(dst, model)
    return report


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="the dense .caffemodel")
    ap.add_argument("dst", help="where to write the pruned .caffemodel")
    ap.add_argument("--sparsity", type=float, default=0.5,
                    help="fraction of weights to zero in every prunable layer (default 0.5)")
    ap.add_argument("--layer", action="append", default=[], metavar="NAME=FRACTION",
                    help="a different fraction for one layer")
    args = ap.parse_args(argv)
    per_layer = {}
    for item in args.layer:
        name, _, value = item.partition("=")
        per_layer[name] = float(value)
    prune_caffemodel(args.src, args.dst, args.sparsity, per_layer)


if __name__ == "__main__":
    main()
