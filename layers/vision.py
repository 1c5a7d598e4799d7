"""Caffe's vision layers as torch modules: Convolution, Deconvolution, Pooling, SPP, Im2col.

Each module reproduces BVLC Caffe's parameter handling (``kernel_size`` given once or once per
spatial axis, or ``kernel_h``/``kernel_w``; the same for ``stride``/``pad``; ``dilation``;
``group``; ``axis``), its blob shapes (Convolution weights ``(num_output, C/group, *kernel)``,
Deconvolution weights ``(C, num_output/group, *kernel)`` exactly as a ``.caffemodel`` stores
them), its output-size rules and its setup checks (the same ``Check failed`` texts and source tags
as Caffe's ``base_conv_layer.cpp`` / ``pooling_layer.cpp``).

The forward pass is one torch op per layer wherever torch's semantics equal Caffe's
(``F.conv{1,2,3}d``, ``F.conv_transpose{1,2,3}d``, ``F.max_pool2d``, ``F.avg_pool2d``,
``F.unfold``); where they differ (Caffe's pooling output size and window clipping in edge cases) an
explicit padding reproduces Caffe's windows exactly.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

from layers.base import Layer, canonical_axis, count
from layers.registry import register

FLT_MAX = 3.4028234663852886e38
FLT_MIN = 1.1754943508222875e-38


def check(layer, ok, where, expr, message="", values=None):
    """Caffe's CHECK / CHECK_EQ & co.: fail with glog's "Check failed: ..." text when not ``ok``.

    ``values`` is the (lhs, rhs) pair glog prints for the binary CHECK_* macros.
    """
    if ok:
        return
    text = "Check failed: " + expr
    if values is not None:
        text += " (%s vs. %s)" % values
    if message:
        text += " " + message
    layer.fail(text, where)


# ================================================================ convolution
class _ConvGeometry:
    """Kernel / stride / pad / dilation per spatial axis, parsed as BaseConvolutionLayer does."""

    def __init__(self, layer, p, num_spatial, where_file, line_offset=0, end="."):
        # Im2colLayer repeats these checks 4 lines earlier, with ");" closing three messages
        tag = lambda line: "%s:%d" % (where_file, line + line_offset)  # noqa: E731
        self.num_spatial = num_spatial
        n = num_spatial
        # kernel
        if p.HasField("kernel_h") or p.HasField("kernel_w"):
            check(layer, n == 2, tag(27), "num_spatial_axes_ == 2",
                  "kernel_h & kernel_w can only be used for 2D convolution.", (n, 2))
            check(layer, len(p.kernel_size) == 0, tag(29), "0 == conv_param.kernel_size_size()",
                  "Either kernel_size or kernel_h/w should be specified; not both.",
                  (0, len(p.kernel_size)))
            kernel = [int(p.kernel_h), int(p.kernel_w)]
        else:
            nk = len(p.kernel_size)
            check(layer, nk == 1 or nk == n, tag(35),
                  "num_kernel_dims == 1 || num_kernel_dims == num_spatial_axes_",
                  "kernel_size must be specified once, or once per spatial dimension "
                  "(kernel_size specified %d times; %d spatial dims)%s" % (nk, n, end))
            kernel = [int(p.kernel_size[0 if nk == 1 else i]) for i in range(n)]
        for k in kernel:
            check(layer, k > 0, tag(45), "kernel_shape_data[i] > 0",
                  "Filter dimensions must be nonzero.", (k, 0))
        # stride
        if p.HasField("stride_h") or p.HasField("stride_w"):
            check(layer, n == 2, tag(51), "num_spatial_axes_ == 2",
                  "stride_h & stride_w can only be used for 2D convolution.", (n, 2))
            check(layer, len(p.stride) == 0, tag(53), "0 == conv_param.stride_size()",
                  "Either stride or stride_h/w should be specified; not both.",
                  (0, len(p.stride)))
            stride = [int(p.stride_h), int(p.stride_w)]
        else:
            ns = len(p.stride)
            check(layer, ns in (0, 1) or ns == n, tag(59),
                  "num_stride_dims == 0 || num_stride_dims == 1 || "
                  "num_stride_dims == num_spatial_axes_",
                  "stride must be specified once, or once per spatial dimension "
                  "(stride specified %d times; %d spatial dims)%s" % (ns, n, end))
            stride = [1 if ns == 0 else int(p.stride[0 if ns == 1 else i]) for i in range(n)]
        for s in stride:
            check(layer, s > 0, tag(68), "stride_data[i] > 0",
                  "Stride dimensions must be nonzero.", (s, 0))
        # pad
        if p.HasField("pad_h") or p.HasField("pad_w"):
            check(layer, n == 2, tag(75), "num_spatial_axes_ == 2",
                  "pad_h & pad_w can only be used for 2D convolution.", (n, 2))
            check(layer, len(p.pad) == 0, tag(77), "0 == conv_param.pad_size()",
                  "Either pad or pad_h/w should be specified; not both.", (0, len(p.pad)))
            pad = [int(p.pad_h), int(p.pad_w)]
        else:
            npd = len(p.pad)
            check(layer, npd in (0, 1) or npd == n, tag(83),
                  "num_pad_dims == 0 || num_pad_dims == 1 || num_pad_dims == num_spatial_axes_",
                  "pad must be specified once, or once per spatial dimension "
                  "(pad specified %d times; %d spatial dims)%s" % (npd, n, end))
            pad = [0 if npd == 0 else int(p.pad[0 if npd == 1 else i]) for i in range(n)]
        # dilation
        nd = len(p.dilation)
        check(layer, nd in (0, 1) or nd == n, tag(98),
              "num_dilation_dims == 0 || num_dilation_dims == 1 || "
              "num_dilation_dims == num_spatial_axes_",
              "dilation must be specified once, or once per spatial dimension "
              "(dilation specified %d times; %d spatial dims)." % (nd, n))
        dilation = [1 if nd == 0 else int(p.dilation[0 if nd == 1 else i]) for i in range(n)]
        for d in dilation:
            if d <= 0:
                layer.fail("dilation must be positive (got %d)" % d, tag(98))
        self.kernel, self.stride, self.pad, self.dilation = kernel, stride, pad, dilation

    def extents(self):
        return [d * (k - 1) + 1 for k, d in zip(self.kernel, self.dilation)]


class _BaseConv(Layer):
    """Shared setup of Convolution and Deconvolution (Caffe's BaseConvolutionLayer)."""

    min_bottoms = 1
    min_tops = 1
    reverse = False
    where_file = "base_conv_layer.cpp"

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        self.check_blob_counts(len(bottom_shapes), len(param.top))
        if len(param.top) != len(bottom_shapes):
            self.fail("%s Layer produces one top blob as output for each bottom blob input."
                      % param.type, "layer.hpp:380")
        p = param.convolution_param
        shape = self.bottom_shapes[0]
        tag = lambda line: "%s:%d" % (self.where_file, line)  # noqa: E731
        self.axis = canonical_axis(p.axis, len(shape), self)
        n = len(shape) - self.axis - 1
        self.geom = g = _ConvGeometry(self, p, n, self.where_file)
        if n > 3:
            self.fail("%d-D convolution (%d spatial axes) is not supported: torch convolves 1, 2 "
                      "or 3 spatial axes" % (n, n), tag(20))
        channels = shape[self.axis]
        num_output = int(p.num_output)
        check(self, num_output > 0, tag(119), "num_output_ > 0", "", (num_output, 0))
        group = int(p.group)
        if group <= 0:
            self.fail("group must be positive (got %d)" % group, tag(121))
        check(self, channels % group == 0, tag(121), "channels_ % group_ == 0", "",
              (channels % group, 0))
        check(self, num_output % group == 0, tag(122), "num_output_ % group_ == 0",
              "Number of output should be multiples of group.", (num_output % group, 0))
        for j, s in enumerate(self.bottom_shapes[1:], 1):
            check(self, tuple(s) == tuple(shape), tag(195),
                  "bottom[0]->shape() == bottom[bottom_id]->shape()",
                  "All inputs must have the same shape.")
        self.channels, self.num_output, self.group = channels, num_output, group
        if self.reverse:
            weight_shape = (channels, num_output // group)
        else:
            weight_shape = (num_output, channels // group)
        weight_shape += tuple(g.kernel)
        self.bias_term = bool(p.bias_term)
        self.weight = self.add_blob(weight_shape, p.weight_filler)
        self.bias = self.add_blob((num_output,), p.bias_filler) if self.bias_term else None
        # output spatial size
        self.out_spatial = []
        for i in range(n):
            size = self.output_dim(shape[self.axis + 1 + i], i)
            if size <= 0:
                self.fail("output size %d along spatial axis %d is not positive (input %d, kernel "
                          "%d, stride %d, pad %d, dilation %d)"
                          % (size, i, shape[self.axis + 1 + i], g.kernel[i], g.stride[i],
                             g.pad[i], g.dilation[i]), "%s:%d" % (self.out_file, self.out_line))
            self.out_spatial.append(size)
        self._fast = self.axis == 1 and n >= 1

    def top_shapes(self):
        top = tuple(self.bottom_shapes[0][:self.axis]) + (self.num_output,) + tuple(
            self.out_spatial)
        return [top] * len(self.bottom_shapes)

    def forward(self, *bottoms):
        tops = tuple(self._one(x) for x in bottoms)
        return tops[0] if len(tops) == 1 else tops

    def _one(self, x):
        if self._fast:
            return self._op(x, self.weight)
        # channel axis other than 1, or no spatial axis: fold the leading axes into a batch
        lead = tuple(x.shape[:self.axis])
        rest = tuple(x.shape[self.axis:])
        x = x.reshape((count(lead),) + rest)
        w = self.weight
        if self.geom.num_spatial == 0:
            x = x.unsqueeze(-1)
            w = w.unsqueeze(-1)
        y = self._op(x, w)
        if self.geom.num_spatial == 0:
            y = y.squeeze(-1)
        return y.reshape(lead + tuple(y.shape[1:]))


@register("Convolution", "CONVOLUTION")
class Convolution(_BaseConv):
    """Caffe's ConvolutionLayer.

    Output size per spatial axis ``(in + 2*pad - (dilation*(kernel-1)+1)) / stride + 1`` (integer
    division); weights ``(num_output, channels/group, *kernel)``, bias ``(num_output,)``; ``axis``
    selects the channel axis (axes before it are batch axes); 1-D, 2-D and 3-D spatial blobs (and
    0-D: a per-position inner product) run as one ``F.conv{1,2,3}d``. Several bottoms share the
    weights and give one top each.
    """

    out_file, out_line = "conv_layer.cpp", 18

    def output_dim(self, size, i):
        g = self.geom
        extent = g.dilation[i] * (g.kernel[i] - 1) + 1
        num = size + 2 * g.pad[i] - extent
        if num < 0:
            return 0     # Caffe's C division would give a degenerate window; refused above
        return num // g.stride[i] + 1

    def _op(self, x, w):
        g = self.geom
        fn = (F.conv1d, F.conv1d, F.conv2d, F.conv3d)[max(g.num_spatial, 1)]
        if g.num_spatial == 0:
            return fn(x, w, self.bias, 1, 0, 1, self.group)
        return fn(x, w, self.bias, g.stride, g.pad, g.dilation, self.group)


@register("Deconvolution", "DECONVOLUTION")
class Deconvolution(_BaseConv):
    """Caffe's DeconvolutionLayer (the transpose of Convolution's forward).

    Output size ``stride*(in-1) + dilation*(kernel-1) + 1 - 2*pad``; weights
    ``(channels, num_output/group, *kernel)`` as Caffe stores them (torch's conv_transpose layout),
    bias ``(num_output,)``. One ``F.conv_transpose{1,2,3}d``.
    """

    reverse = True
    out_file, out_line = "deconv_layer.cpp", 18

    def output_dim(self, size, i):
        g = self.geom
        extent = g.dilation[i] * (g.kernel[i] - 1) + 1
        return g.stride[i] * (size - 1) + extent - 2 * g.pad[i]

    def _op(self, x, w):
        g = self.geom
        fn = (F.conv_transpose1d, F.conv_transpose1d, F.conv_transpose2d,
              F.conv_transpose3d)[max(g.num_spatial, 1)]
        if g.num_spatial == 0:
            return fn(x, w, self.bias, 1, 0, 0, self.group, 1)
        return fn(x, w, self.bias, g.stride, g.pad, 0, self.group, g.dilation)


def im2col(x, kernel, stride, pad, dilation):
    """Caffe's im2col on a (N, C, *spatial) tensor: (N, C * prod(kernel), *out_spatial), rows
    ordered by channel then kernel offsets (row-major), as Caffe lays its column buffer out.

    Built from strided views (``Tensor.unfold``) and one copy; autograd gives col2im.
    """
    n = len(kernel)
    if any(pad):
        widths = []
        for p in reversed(pad):
            widths += [p, p]
        x = F.pad(x, widths)
    for i in range(n):
        extent = dilation[i] * (kernel[i] - 1) + 1
        x = x.unfold(2 + i, extent, stride[i])
        if dilation[i] > 1:
            x = x[..., ::dilation[i]]
    # (N, C, *out, *k) -> (N, C, *k, *out)
    order = [0, 1] + [2 + n + i for i in range(n)] + [2 + i for i in range(n)]
    x = x.permute(order)
    out = tuple(x.shape[2 + n:])
    return x.reshape((x.shape[0], -1) + out)


@register("Im2col", "IM2COL")
class Im2col(Layer):
    """Caffe's Im2colLayer: every (dilated) kernel window laid out along the channel axis.

    Top shape: channel axis ``C * prod(kernel)`` (ordered channel, then kernel offsets row-major,
    as Caffe's im2col), spatial axes ``(in + 2*pad - (dilation*(kernel-1)+1)) / stride + 1``.
    Any number of spatial axes (Caffe's N-D im2col); the backward is Caffe's col2im (a sum).
    """

    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        self.check_blob_counts(len(bottom_shapes), len(param.top))
        p = param.convolution_param
        shape = self.bottom_shapes[0]
        self.axis = canonical_axis(p.axis, len(shape), self)
        n = len(shape) - self.axis - 1
        check(self, n >= 1, "im2col_layer.cpp:17", "num_spatial_axes_ >= 1", "", (n, 1))
        self.geom = g = _ConvGeometry(self, p, n, "im2col_layer.cpp", -4, ";")
        self.channels = c = shape[self.axis]
        kk = count(g.kernel)
        self.out_spatial = []
        for i in range(n):
            num = shape[self.axis + 1 + i] + 2 * g.pad[i] - g.extents()[i]
            if num < 0:
                self.fail("output size along spatial axis %d is not positive (input %d, kernel "
                          "%d, pad %d, dilation %d)" % (i, shape[self.axis + 1 + i],
                                                        g.kernel[i], g.pad[i], g.dilation[i]),
                          "im2col_layer.cpp:118")
            self.out_spatial.append(num // g.stride[i] + 1)
        self.top = tuple(shape[:self.axis]) + (c * kk,) + tuple(self.out_spatial)

    def top_shapes(self):
        return [self.top]

    def forward(self, x):
        g = self.geom
        lead = tuple(x.shape[:self.axis])
        x = x.reshape((count(lead),) + tuple(x.shape[self.axis:]))
        y = im2col(x, g.kernel, g.stride, g.pad, g.dilation)
        return y.reshape(lead + tuple(y.shape[1:])) if lead != (y.shape[0],) else y


# ================================================================ pooling
MAX, AVE, STOCHASTIC = 0, 1, 2


def _caffe_pooled(size, k, s, p, ceil):
    """Caffe's pooled size before the pad clipping rule: float division, then ceil or floor."""
    v = np.float32(size + 2 * p - k) / np.float32(s)
    return int(math.ceil(v) if ceil else math.floor(v)) + 1


def _torch_pooled(size, k, s, p, ceil):
    """The output size torch's pooling ops compute for the same arguments."""
    out = (size + 2 * p - k + (s - 1 if ceil else 0)) // s + 1
    if ceil and (out - 1) * s >= size + p:
        out -= 1
    return out


class _PoolPlan:
    """How to run one Caffe pooling geometry on a H x W input with torch ops, exactly."""

    def __init__(self, method, h, w, kh, kw, sh, sw, ph, pw, oh, ow):
        self.method = method
        self.h, self.w, self.kh, self.kw = h, w, kh, kw
        self.sh, self.sw, self.ph, self.pw, self.oh, self.ow = sh, sw, ph, pw, oh, ow
        self.global_pool = (kh == h and kw == w and ph == 0 and pw == 0 and oh == 1 and ow == 1)
        self.native_ceil = None
        if 2 * ph <= kh and 2 * pw <= kw and h + 2 * ph >= kh and w + 2 * pw >= kw:
            for ceil in (False, True):
                if (_torch_pooled(h, kh, sh, ph, ceil) == oh
                        and _torch_pooled(w, kw, sw, pw, ceil) == ow):
                    self.native_ceil = ceil
                    break
        # explicit padding that makes every Caffe window a plain stride-s window of size k
        self.pad_bottom = (oh - 1) * sh + kh - h - ph
        self.pad_right = (ow - 1) * sw + kw - w - pw
        self.empty_windows = ((oh - 1) * sh >= h + ph) or ((ow - 1) * sw >= w + pw)
        self._divisor = {}

    def divisor(self, device, dtype):
        """Caffe's AVE pool_size per output position: the window clipped to the padded input."""
        key = (device, dtype)
        if key not in self._divisor:
            def sizes(o, s, p, k, n):
                start = np.arange(o) * s - p
                return np.minimum(start + k, n + p) - start
            d = np.outer(sizes(self.oh, self.sh, self.ph, self.kh, self.h),
                         sizes(self.ow, self.sw, self.pw, self.kw, self.w))
            self._divisor[key] = torch.as_tensor(d, dtype=dtype, device=device)
        return self._divisor[key]

    def padded(self, x, value):
        return F.pad(x, (self.pw, self.pad_right, self.ph, self.pad_bottom), value=value)

    def run(self, x, want_mask=False, train=False):
        kernel, stride = (self.kh, self.kw), (self.sh, self.sw)
        if self.method == MAX:
            if self.native_ceil is not None:
                out = F.max_pool2d(x, kernel, stride, (self.ph, self.pw),
                                   ceil_mode=self.native_ceil, return_indices=want_mask)
                if want_mask:
                    return out[0], out[1].to(x.dtype)
                return out
            xp = self.padded(x, float("-inf"))
            out = F.max_pool2d(xp, kernel, stride, return_indices=want_mask)
            if want_mask:
                out, idx = out
                wp = self.w + self.pw + self.pad_right
                hh = torch.div(idx, wp, rounding_mode="floor") - self.ph
                ww = idx - (hh + self.ph) * wp - self.pw
                mask = (hh * self.w + ww).to(x.dtype)
            if self.empty_windows:
                out = out.clamp(min=-FLT_MAX)
            return (out, mask) if want_mask else out
        if self.method == AVE:
            if self.global_pool:
                return x.mean((2, 3), keepdim=True)
            if self.native_ceil is not None:
                return F.avg_pool2d(x, kernel, stride, (self.ph, self.pw),
                                    ceil_mode=self.native_ceil, count_include_pad=True)
            sums = F.avg_pool2d(self.padded(x, 0.0), kernel, stride, divisor_override=1)
            return sums / self.divisor(x.device, x.dtype)
        # STOCHASTIC (Caffe's GPU kernels; Caffe's CPU path is not implemented). No padding.
        xp = self.padded(x, 0.0)
        if not train:
            sums = F.avg_pool2d(xp, kernel, stride, divisor_override=1)
            squares = F.avg_pool2d(xp * xp, kernel, stride, divisor_override=1)
            return squares / (sums + FLT_MIN)
        kk = self.kh * self.kw
        # (N, C, oh, ow, kh*kw): every window, row-major inside, as strided views plus one copy
        win = xp.unfold(2, self.kh, self.sh).unfold(3, self.kw, self.sw).reshape(
            x.shape[:2] + (self.oh, self.ow, kk))
        cum = win.detach().cumsum(-1)
        thres = torch.rand(cum.shape[:-1] + (1,), device=x.device, dtype=x.dtype) * cum[..., -1:]
        pick = (cum < thres).sum(-1, keepdim=True).clamp_(max=kk - 1)
        return win.gather(-1, pick).squeeze(-1)


@register("Pooling", "POOLING")
class Pooling(Layer):
    """Caffe's PoolingLayer (4-D bottoms).

    * Output size: ``ceil((in + 2*pad - kernel) / stride) + 1`` (``round_mode: CEIL``, Caffe's
      default) or ``floor`` (``round_mode: FLOOR``); then, if any pad is non-zero, a last window
      that would start at or beyond ``in + pad`` is dropped (on both axes).
    * MAX: max over the window clipped to the image; the gradient goes to the first maximum in
      row-major order; with two tops the second is the argmax mask (``h * W + w``, as floats).
    * AVE: sum over the window clipped to the image, divided by the window size clipped to the
      padded image (``min(start + kernel, in + pad) - start`` per axis).
    * STOCHASTIC (no padding): TRAIN samples one element per window with probability proportional
      to its value (the gradient goes to it); TEST gives ``sum(x^2) / sum(x)`` per window, as
      Caffe's GPU kernels.
    * ``global_pooling``: the kernel is the whole image (no kernel/pad/stride may be given).
    """

    exact_bottoms = 1
    min_tops = 1

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        p = param.pooling_param
        self.method = int(p.pool)
        self.max_tops = 2 if self.method == MAX else 1
        self.check_blob_counts(len(bottom_shapes), len(param.top))
        tag = lambda line: "pooling_layer.cpp:%d" % line  # noqa: E731
        has = p.HasField
        self.global_pooling = bool(p.global_pooling)
        if self.global_pooling:
            check(self, not (has("kernel_size") or has("kernel_h") or has("kernel_w")), tag(18),
                  "!(pool_param.has_kernel_size() || pool_param.has_kernel_h() || "
                  "pool_param.has_kernel_w())",
                  "With Global_pooling: true Filter size cannot specified")
        else:
            check(self, (not has("kernel_size")) != (not (has("kernel_h") and has("kernel_w"))),
                  tag(22), "!pool_param.has_kernel_size() != !(pool_param.has_kernel_h() && "
                  "pool_param.has_kernel_w())",
                  "Filter size is kernel_size OR kernel_h and kernel_w; not both")
            check(self, has("kernel_size") or (has("kernel_h") and has("kernel_w")), tag(25),
                  "pool_param.has_kernel_size() || (pool_param.has_kernel_h() && "
                  "pool_param.has_kernel_w())",
                  "For non-square filters both kernel_h and kernel_w are required.")
        check(self, (not has("pad") and has("pad_h") and has("pad_w"))
              or (not has("pad_h") and not has("pad_w")), tag(29),
              "(!pool_param.has_pad() && pool_param.has_pad_h() && pool_param.has_pad_w()) || "
              "(!pool_param.has_pad_h() && !pool_param.has_pad_w())",
              "pad is pad OR pad_h and pad_w are required.")
        check(self, (not has("stride") and has("stride_h") and has("stride_w"))
              or (not has("stride_h") and not has("stride_w")), tag(33),
              "(!pool_param.has_stride() && pool_param.has_stride_h() && "
              "pool_param.has_stride_w()) || (!pool_param.has_stride_h() && "
              "!pool_param.has_stride_w())",
              "Stride is stride OR stride_h and stride_w are required.")
        shape = self.bottom_shapes[0]
        check(self, len(shape) == 4, tag(82), "4 == bottom[0]->num_axes()",
              "Input must have 4 axes, corresponding to (num, channels, height, width)",
              (4, len(shape)))
        h, w = shape[2], shape[3]
        if self.global_pooling:
            kh, kw = h, w
        elif has("kernel_size"):
            kh = kw = int(p.kernel_size)
        else:
            kh, kw = int(p.kernel_h), int(p.kernel_w)
        check(self, kh > 0, tag(50), "kernel_h_ > 0", "Filter dimensions cannot be zero.",
              (kh, 0))
        check(self, kw > 0, tag(51), "kernel_w_ > 0", "Filter dimensions cannot be zero.",
              (kw, 0))
        if has("pad_h"):
            ph, pw = int(p.pad_h), int(p.pad_w)
        else:
            ph = pw = int(p.pad)
        if has("stride_h"):
            sh, sw = int(p.stride_h), int(p.stride_w)
        else:
            sh = sw = int(p.stride)
        if sh <= 0 or sw <= 0:
            self.fail("Stride dimensions must be nonzero (stride_h %d, stride_w %d)" % (sh, sw),
                      tag(58))
        if self.global_pooling:
            check(self, ph == 0 and pw == 0 and sh == 1 and sw == 1, tag(65),
                  "pad_h_ == 0 && pad_w_ == 0 && stride_h_ == 1 && stride_w_ == 1",
                  "With Global_pooling: true; only pad = 0 and stride = 1")
        if ph or pw:
            check(self, self.method in (MAX, AVE), tag(69),
                  "this->layer_param_.pooling_param().pool() == PoolingParameter_PoolMethod_AVE "
                  "|| this->layer_param_.pooling_param().pool() == "
                  "PoolingParameter_PoolMethod_MAX",
                  "Padding implemented only for average and max pooling.")
            check(self, ph < kh, tag(74), "pad_h_ < kernel_h_", "", (ph, kh))
            check(self, pw < kw, tag(75), "pad_w_ < kernel_w_", "", (pw, kw))
        if self.method not in (MAX, AVE, STOCHASTIC):
            self.fail("Unknown pooling method.", tag(207))
        ceil = int(p.round_mode) == 0
        oh = _caffe_pooled(h, kh, sh, ph, ceil)
        ow = _caffe_pooled(w, kw, sw, pw, ceil)
        if ph or pw:
            if (oh - 1) * sh >= h + ph:
                oh -= 1
            if (ow - 1) * sw >= w + pw:
                ow -= 1
            check(self, (oh - 1) * sh < h + ph, tag(116),
                  "(pooled_height_ - 1) * stride_h_ < height_ + pad_h_", "",
                  ((oh - 1) * sh, h + ph))
            check(self, (ow - 1) * sw < w + pw, tag(117),
                  "(pooled_width_ - 1) * stride_w_ < width_ + pad_w_", "",
                  ((ow - 1) * sw, w + pw))
        if oh <= 0 or ow <= 0:
            self.fail("pooled output size %dx%d is empty (input %dx%d, kernel %dx%d, stride "
                      "%dx%d, pad %dx%d, round_mode %s)" % (oh, ow, h, w, kh, kw, sh, sw, ph, pw,
                                                            "CEIL" if ceil else "FLOOR"), tag(99))
        self.kernel, self.stride, self.pad = (kh, kw), (sh, sw), (ph, pw)
        self.pooled = (oh, ow)
        self.plan = _PoolPlan(self.method, h, w, kh, kw, sh, sw, ph, pw, oh, ow)
        self.want_mask = len(param.top) > 1
        self._plans = {(h, w): self.plan}

    def top_shapes(self):
        top = (self.bottom_shapes[0][0], self.bottom_shapes[0][1]) + self.pooled
        return [top] * (2 if self.want_mask else 1)

    def forward(self, x):
        plan = self.plan
        if (x.shape[2], x.shape[3]) != (plan.h, plan.w):
            plan = self._plan_for(x.shape[2], x.shape[3])
        if self.method == STOCHASTIC and self.shape_inference:
            return x.new_zeros(x.shape[:2] + (plan.oh, plan.ow))
        return plan.run(x, self.want_mask, self.phase == "TRAIN")

    def _plan_for(self, h, w):
        """Caffe's Reshape for a new input size (same parameters)."""
        key = (h, w)
        if key not in self._plans:
            (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.pad
            if self.global_pooling:
                kh, kw = h, w
            ceil = int(self.param.pooling_param.round_mode) == 0
            oh, ow = _caffe_pooled(h, kh, sh, ph, ceil), _caffe_pooled(w, kw, sw, pw, ceil)
            if ph or pw:
                oh -= (oh - 1) * sh >= h + ph
                ow -= (ow - 1) * sw >= w + pw
            self._plans[key] = _PoolPlan(self.method, h, w, kh, kw, sh, sw, ph, pw, oh, ow)
        return self._plans[key]


@register("SPP")
class SPP(Layer):
    """Caffe's SPPLayer (spatial pyramid pooling).

    Level ``i`` (``0 <= i < pyramid_height``) pools with ``bins = 2^i``,
    ``kernel = ceil(in / bins)``, ``pad = (kernel*bins - in + 1) / 2``, ``stride = kernel`` (Caffe's
    pooling rules, CEIL), flattens each level to ``(N, C*h*w)`` and concatenates them on axis 1;
    with ``pyramid_height: 1`` the top is the single pooling output, unflattened.
    """

    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        self.check_blob_counts(len(bottom_shapes), len(param.top))
        p = param.spp_param
        shape = self.bottom_shapes[0]
        check(self, len(shape) == 4, "spp_layer.cpp:146", "4 == bottom[0]->num_axes()",
              "Input must have 4 axes, corresponding to (num, channels, height, width)",
              (4, len(shape)))
        h, w = shape[2], shape[3]
        check(self, h > 0, "spp_layer.cpp:73", "bottom_h_ > 0",
              "Input dimensions cannot be zero.", (h, 0))
        check(self, w > 0, "spp_layer.cpp:74", "bottom_w_ > 0",
              "Input dimensions cannot be zero.", (w, 0))
        self.height = int(p.pyramid_height)
        if self.height < 1:
            self.fail("pyramid_height must be at least 1 (got %d)" % self.height,
                      "spp_layer.cpp:76")
        method = int(p.pool)
        self.plans = []
        for level in range(self.height):
            bins = 2 ** level
            kh = int(math.ceil(h / float(bins)))
            kw = int(math.ceil(w / float(bins)))
            ph = (kh * bins - h + 1) // 2
            pw = (kw * bins - w + 1) // 2
            if ph or pw:
                check(self, method in (MAX, AVE), "pooling_layer.cpp:69",
                      "this->layer_param_.pooling_param().pool() == "
                      "PoolingParameter_PoolMethod_AVE || this->layer_param_.pooling_param()"
                      ".pool() == PoolingParameter_PoolMethod_MAX",
                      "Padding implemented only for average and max pooling.")
                check(self, ph < kh, "pooling_layer.cpp:74", "pad_h_ < kernel_h_", "", (ph, kh))
                check(self, pw < kw, "pooling_layer.cpp:75", "pad_w_ < kernel_w_", "", (pw, kw))
            oh = _caffe_pooled(h, kh, kh, ph, True)
            ow = _caffe_pooled(w, kw, kw, pw, True)
            if ph or pw:
                oh -= (oh - 1) * kh >= h + ph
                ow -= (ow - 1) * kw >= w + pw
            self.plans.append(_PoolPlan(method, h, w, kh, kw, kh, kw, ph, pw, oh, ow))
        n, c = shape[0], shape[1]
        if self.height == 1:
            self.top = (n, c, self.plans[0].oh, self.plans[0].ow)
        else:
            self.top = (n, sum(c * pl.oh * pl.ow for pl in self.plans))

    def top_shapes(self):
        return [self.top]

    def forward(self, x):
        train = self.phase == "TRAIN" and not self.shape_inference
        if self.height == 1:
            return self.plans[0].run(x, False, train)
        return torch.cat([pl.run(x, False, train).flatten(1) for pl in self.plans], 1)
