"""Caffe's element-wise (neuron) layers and Softmax, as torch modules.

Each layer reproduces BVLC Caffe's parameters, defaults, set-up checks and Forward/Backward
formulas (``src/caffe/layers/<name>_layer.cpp``). Forward is one fused torch op where torch has
one whose gradient equals Caffe's Backward; the few places where Caffe's Backward is not the plain
derivative of its Forward (Power with ``scale: 0`` or ``power: 0``, Threshold) are written so
autograd gives Caffe's numbers.

Known divergence: Caffe's neuron layers that read ``bottom_data`` in Backward (ReLU with a negative
``negative_slope``, BNLL, Clip, Log, Power) give different gradients when run in place, because
the bottom was overwritten by the top; we always give the mathematically intended gradient.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

from converters import caffe_pb2, glog
from layers.base import Layer, canonical_axis
from layers.registry import register


def _fmt(value):
    return glog.format_number(value)


def _f32(value):
    """A proto float field as Caffe holds it (``Dtype`` = float)."""
    return float(np.float32(value))


def legacy_dim(layer, shape, index):
    """Caffe's Blob::LegacyShape (num/channels/height/width): at most 4 axes, missing ones are 1."""
    if len(shape) > 4:
        layer.fail("Check failed: num_axes() <= 4 (%d vs. 4) Cannot use legacy accessors on "
                   "Blobs with > 4 axes." % len(shape), "blob.hpp:159")
    if index >= len(shape) or index < -len(shape):
        return 1
    return int(shape[index])


class _Constant(torch.autograd.Function):
    """A tensor filled with ``value`` shaped like ``x``, whose gradient w.r.t. ``x`` is zero.

    Caffe's Power layer with ``scale * power == 0`` writes a constant top and a zero bottom diff
    (even where ``x`` is inf or NaN, where ``0 * x`` would not be zero).
    """

    @staticmethod
    def forward(ctx, x, value):
        return torch.full_like(x, value)

    @staticmethod
    def backward(ctx, grad):
        return torch.zeros_like(grad), None


class NeuronLayer(Layer):
    """Caffe's NeuronLayer: one bottom, one top of the same shape."""
    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        self.check_blob_counts(len(param.bottom), len(param.top))

    def top_shapes(self):
        return [tuple(self.bottom_shapes[0])]


@register("ReLU", "RELU")
class ReLU(NeuronLayer):
    """Caffe ReLU: ``max(x, 0) + negative_slope * min(x, 0)``; diff passes where ``x > 0``, is
    scaled by ``negative_slope`` where ``x <= 0`` (so the gradient at 0 is ``negative_slope``)."""

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        self.negative_slope = _f32(param.relu_param.negative_slope)

    def forward(self, x):
        if self.negative_slope == 0:
            return F.relu(x)
        return F.leaky_relu(x, self.negative_slope)


@register("PReLU")
class PReLU(NeuronLayer):
    """Caffe PReLU: ``max(x, 0) + a_c * min(x, 0)`` with one learnable slope per channel (axis 1),
    or one 0-axis blob when ``channel_shared``; the filler defaults to constant 0.25. Slope
    gradient: sum of ``diff * x`` where ``x <= 0``."""

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        shape = self.bottom_shapes[0]
        if len(shape) < 2:
            self.fail("Check failed: bottom[0]->num_axes() >= 2 (%d vs. 2) Number of axes of "
                      "bottom blob must be >=2." % len(shape), "prelu_layer.cpp:14")
        p = param.prelu_param
        channels = legacy_dim(self, shape, 1)
        self.channel_shared = bool(p.channel_shared)
        if p.HasField("filler"):
            filler = p.filler
        else:
            filler = caffe_pb2.FillerParameter(type="constant", value=0.25)
        self.add_blob(() if self.channel_shared else (channels,), filler)

    def forward(self, x):
        return F.prelu(x, self.blobs[0].to(x.dtype))


@register("Sigmoid", "SIGMOID")
class Sigmoid(NeuronLayer):
    """Caffe Sigmoid: ``1 / (1 + exp(-x))``; diff ``* y * (1 - y)``."""

    def forward(self, x):
        return torch.sigmoid(x)


@register("TanH", "TANH")
class TanH(NeuronLayer):
    """Caffe TanH: ``tanh(x)``; diff ``* (1 - y^2)``."""

    def forward(self, x):
        return torch.tanh(x)


@register("ELU")
class ELU(NeuronLayer):
    """Caffe ELU: ``max(x, 0) + alpha * (exp(min(x, 0)) - 1)`` (alpha default 1); diff passes
    where ``x > 0``, else ``* (y + alpha)``."""

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        self.alpha = _f32(param.elu_param.alpha)

    def forward(self, x):
        return F.elu(x, self.alpha)


@register("Power", "POWER")
class Power(NeuronLayer):
    """Caffe Power: ``(shift + scale * x) ^ power`` (defaults 1, 1, 0).

    When ``scale * power == 0`` Caffe ignores the input: the top is ``1`` (power 0) or
    ``shift ^ power`` everywhere and the bottom diff is 0. ``power == 1`` is the affine map.
    """

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        p = param.power_param
        self.power = _f32(p.power)
        self.scale = _f32(p.scale)
        self.shift = _f32(p.shift)
        self.diff_scale = _f32(np.float32(self.power) * np.float32(self.scale))
        if self.diff_scale == 0:
            if self.power == 0:
                self.constant = 1.0
            else:
                with np.errstate(all="ignore"):
                    self.constant = float(np.float32(self.shift) ** np.float32(self.power))

    def forward(self, x):
        if self.diff_scale == 0:
            return _Constant.apply(x, self.constant)
        y = x
        if self.scale != 1:
            y = y * self.scale
        if self.shift != 0:
            y = y + self.shift
        if self.power == 1:
            return y if y is not x else x.clone()
        if self.power == 2:
            return y * y
        if self.power == 0.5:
            return torch.sqrt(y)
        return torch.pow(y, self.power)


@register("Exp", "EXP")
class Exp(NeuronLayer):
    """Caffe Exp: ``base ^ (shift + scale * x)``, base -1 (default) meaning e; computed as
    ``outer * exp(inner * x)`` with ``inner = ln(base) * scale``, ``outer = base ^ shift``;
    diff ``* y * inner``. Checks base > 0 and a finite ln(base)."""

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        p = param.exp_param
        base, scale, shift = _f32(p.base), _f32(p.scale), _f32(p.shift)
        if base != -1 and not base > 0:
            self.fail("Check failed: base > 0 (%s vs. 0) base must be strictly positive."
                      % _fmt(base), "exp_layer.cpp:14")
        log_base = 1.0 if base == -1 else _f32(math.log(base)) if base != math.inf else math.inf
        if math.isinf(log_base):
            self.fail("Check failed: !isinf(log_base) Inf result: log(base) = log(%s) = %s"
                      % (_fmt(base), _fmt(log_base)), "exp_layer.cpp:21")
        self.inner_scale = _f32(log_base * scale)
        if shift == 0:
            self.outer_scale = 1.0
        elif base != -1:
            self.outer_scale = _f32(math.pow(base, shift))
        else:
            self.outer_scale = _f32(math.exp(shift))

    def forward(self, x):
        y = torch.exp(x * self.inner_scale if self.inner_scale != 1 else x)
        if self.outer_scale != 1:
            y = y * self.outer_scale
        return y


@register("Log")
class Log(NeuronLayer):
    """Caffe Log: ``log_base(shift + scale * x)``, base -1 (default) meaning e; diff
    ``* scale / (ln(base) * (shift + scale * x))``. Checks base > 0 and finite ln(base),
    1/ln(base) (so base 1 is refused)."""

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        p = param.log_param
        base = _f32(p.base)
        if base != -1 and not base > 0:
            self.fail("Check failed: base > 0 (%s vs. 0) base must be strictly positive."
                      % _fmt(base), "log_layer.cpp:14")
        log_base = 1.0 if base == -1 else _f32(math.log(base)) if base != math.inf else math.inf
        if math.isinf(log_base):
            self.fail("Check failed: !isinf(log_base) Inf result: log(base) = log(%s) = %s"
                      % (_fmt(base), _fmt(log_base)), "log_layer.cpp:21")
        if log_base == 0:
            self.fail("Check failed: !isinf(base_scale_) Inf result: 1/log(base) = 1/log(%s) = inf"
                      % _fmt(base), "log_layer.cpp:25")
        self.base_scale = _f32(1.0 / log_base)
        self.input_scale = _f32(p.scale)
        self.input_shift = _f32(p.shift)

    def forward(self, x):
        y = x
        if self.input_scale != 1:
            y = y * self.input_scale
        if self.input_shift != 0:
            y = y + self.input_shift
        y = torch.log(y)
        if self.base_scale != 1:
            y = y * self.base_scale
        return y


@register("AbsVal", "ABSVAL")
class AbsVal(NeuronLayer):
    """Caffe AbsVal: ``|x|``; diff ``* sign(x)`` (0 at 0). Caffe refuses in-place use."""

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        if param.top[0] == param.bottom[0]:
            self.fail("Check failed: top[0] != bottom[0] AbsVal Layer does not allow in-place "
                      "computation.", "absval_layer.cpp:12")

    def forward(self, x):
        return torch.abs(x)


@register("BNLL", "BNLL")
class BNLL(NeuronLayer):
    """Caffe BNLL (softplus) in its stable form: ``x + log(1 + exp(-x))`` for ``x > 0`` else
    ``log(1 + exp(x))``; diff ``* e / (e + 1)`` with ``e = exp(min(x, 50))``. torch's softplus
    gives the same float32 values and gradients (its linear branch above 20 equals Caffe's
    result to the last bit)."""

    def forward(self, x):
        return F.softplus(x)


@register("Clip")
class Clip(NeuronLayer):
    """Caffe Clip: ``max(min, min(x, max))``; diff passes where ``min <= x <= max``."""

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        self.min = _f32(param.clip_param.min)
        self.max = _f32(param.clip_param.max)

    def forward(self, x):
        if self.min <= self.max:
            return torch.clamp(x, self.min, self.max)
        # Caffe's formula with min > max: the top is `min` everywhere, no gradient passes.
        return torch.clamp_min(torch.clamp_max(x, self.max), self.min)


@register("Swish")
class Swish(NeuronLayer):
    """Caffe Swish: ``x * sigmoid(beta * x)`` (beta default 1); diff
    ``* (beta * y + s * (1 - beta * y))`` with ``s = sigmoid(beta * x)``."""

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        self.beta = _f32(param.swish_param.beta)

    def forward(self, x):
        if self.beta == 1:
            return F.silu(x)
        return x * torch.sigmoid(x * self.beta)


@register("Threshold", "THRESHOLD")
class Threshold(NeuronLayer):
    """Caffe Threshold: ``1`` where ``x > threshold`` (default 0), else ``0``. Caffe has no
    Backward for it; the top carries no gradient."""

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        self.threshold = _f32(param.threshold_param.threshold)

    def forward(self, x):
        return (x.detach() > self.threshold).to(x.dtype)


@register("Softmax", "SOFTMAX")
class Softmax(Layer):
    """Caffe Softmax over ``softmax_param.axis`` (default 1, negative counts from the end),
    numerically stable (max subtracted); diff ``(dy - sum(dy * y)) * y`` along the axis."""
    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        self.check_blob_counts(len(param.bottom), len(param.top))
        shape = self.bottom_shapes[0]
        self.axis = canonical_axis(param.softmax_param.axis, len(shape), self)

    def top_shapes(self):
        return [tuple(self.bottom_shapes[0])]

    def forward(self, x):
        return F.softmax(x, dim=self.axis)
