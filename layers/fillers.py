"""Caffe's fillers (``FillerParameter``): how a fresh blob is initialised.

Semantics reproduced from Caffe's ``filler.hpp``: fan_in = count / shape[0],
fan_out = count / shape[1] (for blobs of at least 2 axes), ``variance_norm`` FAN_IN (default) /
FAN_OUT / AVERAGE; xavier draws U(-sqrt(3/n), sqrt(3/n)); msra draws N(0, sqrt(2/n)); gaussian
with ``sparse`` keeps each weight with probability sparse/num_outputs; positive_unitball draws
U(0,1) and normalises each row (over dims after the first) to sum 1; bilinear builds the upsampling
kernel for Deconvolution. Random draws use torch's generator (seeded from ``random_seed``), so they
follow Caffe's distributions but not its exact numbers: fidelity tests load Caffe's weights.
"""
import math

import torch

from converters.errors import CaffeError


def _fan(shape, variance_norm):
    count = 1
    for d in shape:
        count *= d
    fan_in = count // shape[0] if len(shape) >= 1 and shape[0] else count
    fan_out = count // shape[1] if len(shape) >= 2 and shape[1] else count
    norm = variance_norm if isinstance(variance_norm, str) else {0: "FAN_IN", 1: "FAN_OUT",
                                                                  2: "AVERAGE"}[variance_norm]
    if norm == "FAN_OUT":
        return fan_out
    if norm == "AVERAGE":
        return (fan_in + fan_out) / 2.0
    return fan_in


def fill(tensor, filler=None):
    """Fill ``tensor`` in place according to a ``FillerParameter`` (None = constant 0)."""
    with torch.no_grad():
        if filler is None:
            tensor.zero_()
            return tensor
        kind = filler.type or "constant"
        shape = tuple(tensor.shape)
        if kind == "constant":
            tensor.fill_(filler.value)
        elif kind == "uniform":
            tensor.uniform_(filler.min, filler.max)
        elif kind == "gaussian":
            tensor.normal_(filler.mean, filler.std)
            sparse = filler.sparse
            if sparse >= 0:
                if len(shape) < 2:
                    raise CaffeError("gaussian filler with sparse needs a blob of at least 2 axes",
                                     where="filler.hpp:76")
                num_outputs = shape[0]
                keep = torch.rand(shape) < (sparse / float(num_outputs))
                tensor.mul_(keep.to(tensor.dtype))
        elif kind == "positive_unitball":
            tensor.uniform_(0, 1)
            if tensor.dim() >= 1 and tensor.numel():
                flat = tensor.view(shape[0], -1)
                flat.div_(flat.sum(dim=1, keepdim=True))
        elif kind == "xavier":
            n = _fan(shape, filler.variance_norm)
            scale = math.sqrt(3.0 / n)
            tensor.uniform_(-scale, scale)
        elif kind == "msra":
            n = _fan(shape, filler.variance_norm)
            tensor.normal_(0.0, math.sqrt(2.0 / n))
        elif kind == "bilinear":
            if len(shape) != 4 or shape[2] != shape[3]:
                raise CaffeError("bilinear filler needs a 4-D blob with square kernels (got %s)"
                                 % (shape,), where="filler.hpp:244")
            k = shape[3]
            f = math.ceil(k / 2.0)
            c = (2 * f - 1 - f % 2) / (2.0 * f)
            idx = torch.arange(k, dtype=torch.float64)
            w = 1 - (idx / f - c).abs()
            kernel = (w[:, None] * w[None, :]).to(tensor.dtype)
            tensor.copy_(kernel.expand(shape))
        else:
            raise CaffeError("Unknown filler name: %s" % kind, where="filler.hpp:285")
    return tensor


# Caffe's GetFiller names (filler.hpp), in the order fill() checks them.
FILLER_TYPES = ("constant", "uniform", "gaussian", "positive_unitball", "xavier", "msra",
                "bilinear")
