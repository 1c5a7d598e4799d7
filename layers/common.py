"""Caffe's common (non-vision) layers as torch modules.

InnerProduct, Concat, Slice, Split, Eltwise, Flatten, Reshape, Crop, Scale, Bias, Tile,
Reduction, Embed, Silence, Parameter, ArgMax, Accuracy, Dropout: BVLC Caffe's parameters and
defaults, blob shapes in Caffe's order, top shapes (0-axis scalar tops are 0-d tensors) and setup
checks with Caffe's ``Check failed`` texts and source tags. Each forward is a handful of torch ops
at most, without copies where Caffe's result is a view (Flatten, Reshape, Slice, Crop, Split) and
without device synchronisation.
"""
import torch
import torch.nn.functional as F

from converters import caffe_pb2
from layers.base import Layer, canonical_axis, count
from layers.registry import register
from layers.vision import check


def _broadcast_shape(ndim, axis, shape):
    """The view shape that lines a blob of ``shape`` up with axes ``axis..`` of an ndim blob."""
    return (1,) * axis + tuple(shape) + (1,) * (ndim - axis - len(shape))


# ================================================================ InnerProduct
@register("InnerProduct", "INNER_PRODUCT")
class InnerProduct(Layer):
    """Caffe's InnerProductLayer.

    Axes from ``axis`` on are flattened into ``K`` inputs; the top is
    ``bottom.shape[:axis] + (num_output,)``. Weights are ``(num_output, K)``, or ``(K, num_output)``
    with ``transpose: true``; bias ``(num_output,)`` when ``bias_term``. One ``F.linear``.
    """

    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        self.check_blob_counts(len(bottom_shapes), len(param.top))
        p = param.inner_product_param
        shape = self.bottom_shapes[0]
        self.axis = canonical_axis(p.axis, len(shape), self)
        self.num_output = n = int(p.num_output)
        if n <= 0:      # Caffe builds an empty blob and its filler divides by zero
            self.fail("inner_product_param.num_output must be positive (got %d; it has no "
                      "default)" % n)
        k = count(shape, self.axis)
        self.transpose = bool(p.transpose)
        self.weight = self.add_blob((k, n) if self.transpose else (n, k), p.weight_filler)
        self.bias = self.add_blob((n,), p.bias_filler) if p.bias_term else None
        self.flatten = self.axis != len(shape) - 1

    def top_shapes(self):
        return [tuple(self.bottom_shapes[0][:self.axis]) + (self.num_output,)]

    def forward(self, x):
        if self.flatten:
            x = x.flatten(self.axis)
        w = self.weight.t() if self.transpose else self.weight
        return F.linear(x, w, self.bias)


# ================================================================ Concat / Slice / Split
def _legacy_axis(layer, p, ndim, legacy_field, where, name):
    """Caffe's axis-or-legacy-dim resolution of Concat / Slice."""
    if p.HasField(legacy_field):
        axis = int(getattr(p, legacy_field))
        check(layer, axis < ndim, where, "%s_axis_ < num_axes" % name,
              "%s_dim out of range." % name, (axis, ndim))
        return axis
    return canonical_axis(p.axis, ndim, layer)


@register("Concat", "CONCAT")
class Concat(Layer):
    """Caffe's ConcatLayer: bottoms joined along ``axis`` (or the legacy ``concat_dim``); every
    other axis must agree. One ``torch.cat``; a single bottom passes through."""

    min_bottoms = 1
    exact_tops = 1

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        self.check_blob_counts(len(bottom_shapes), len(param.top))
        p = param.concat_param
        check(self, not (p.HasField("axis") and p.HasField("concat_dim")), "concat_layer.cpp:12",
              "!(concat_param.has_axis() && concat_param.has_concat_dim())",
              "Either axis or concat_dim should be specified; not both.")
        first = self.bottom_shapes[0]
        ndim = len(first)
        self.axis = _legacy_axis(self, p, ndim, "concat_dim", "concat_layer.cpp:28", "concat")
        for s in self.bottom_shapes[1:]:
            check(self, len(s) == ndim, "concat_layer.cpp:38", "num_axes == bottom[i]->num_axes()",
                  "All inputs must have the same #axes.", (ndim, len(s)))
            for j in range(ndim):
                if j != self.axis:
                    check(self, first[j] == s[j], "concat_layer.cpp:42",
                          "top_shape[j] == bottom[i]->shape(j)",
                          "All inputs must have the same shape, except at concat_axis.",
                          (first[j], s[j]))

    def forward(self, *bottoms):
        if len(bottoms) == 1:
            return bottoms[0]
        return torch.cat(bottoms, self.axis)


@register("Slice", "SLICE")
class Slice(Layer):
    """Caffe's SliceLayer: the bottom cut along ``axis`` (or legacy ``slice_dim``) at the
    ``slice_point`` s, or into equal parts when none are given. The tops are views (no copy)."""

    exact_bottoms = 1
    min_tops = 1

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        self.check_blob_counts(len(bottom_shapes), len(param.top))
        p = param.slice_param
        check(self, not (p.HasField("axis") and p.HasField("slice_dim")), "slice_layer.cpp:13",
              "!(slice_param.has_axis() && slice_param.has_slice_dim())",
              "Either axis or slice_dim should be specified; not both.")
        shape = self.bottom_shapes[0]
        self.axis = _legacy_axis(self, p, len(shape), "slice_dim", "slice_layer.cpp:33", "slice")
        dim = shape[self.axis]
        ntop = len(param.top)
        points = [int(v) for v in p.slice_point]
        if points:
            check(self, len(points) == ntop - 1, "slice_layer.cpp:43",
                  "slice_point_.size() == top.size() - 1", "", (len(points), ntop - 1))
            check(self, ntop <= dim, "slice_layer.cpp:44", "top.size() <= bottom_slice_axis",
                  "slice axis: %d, bottom[0] shape: %s" % (
                      self.axis, "".join("%d " % d for d in shape) + "(%d)" % count(shape)),
                  (ntop, dim))
            prev, sizes = 0, []
            for point in points:
                check(self, point > prev, "slice_layer.cpp:50", "slice_point_[i] > prev", "",
                      (point, prev))
                sizes.append(point - prev)
                prev = point
            sizes.append(dim - prev)
        else:
            check(self, dim % ntop == 0, "slice_layer.cpp:61",
                  "bottom_slice_axis % top.size() == 0",
                  "Number of top blobs (%d) should evenly divide input slice axis (%d)"
                  % (ntop, dim), (dim % ntop, 0))
            sizes = None
        if sizes is not None:
            check(self, sizes[-1] >= 0, "blob.cpp:33", "shape[i] >= 0", "", (sizes[-1], 0))
        self.sizes = sizes          # None: equal parts of whatever the bottom holds
        self.ntop = ntop

    def forward(self, x):
        if self.ntop == 1:
            return x
        sizes = self.sizes or x.shape[self.axis] // self.ntop
        return tuple(torch.split(x, sizes, self.axis))


@register("Split", "SPLIT")
class Split(Layer):
    """Caffe's SplitLayer: every top is the bottom (shared data); diffs of the tops add up."""

    exact_bottoms = 1
    min_tops = 1

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        self.check_blob_counts(len(bottom_shapes), len(param.top))
        for t in param.top:
            check(self, t != param.bottom[0], "split_layer.cpp:16", "top[i] != bottom[0]",
                  "Split Layer does not allow in-place computation.")
        self.ntop = len(param.top)

    def top_shapes(self):
        return [self.bottom_shapes[0]] * self.ntop

    def forward(self, x):
        return (x,) * self.ntop


# ================================================================ Eltwise
PROD, SUM, MAX = 0, 1, 2


@register("Eltwise", "ELTWISE")
class Eltwise(Layer):
    """Caffe's EltwiseLayer over same-shaped bottoms.

    SUM: ``sum(coeff_i * bottom_i)`` (coefficients default to 1); PROD: the product (its gradient
    is the product of the other bottoms, Caffe's ``stable_prod_grad``); MAX: the maximum, whose
    gradient goes to one bottom per element exactly as Caffe's mask picks it (between the first two
    bottoms a tie goes to the second, later bottoms win only when strictly greater).
    """

    min_bottoms = 2
    exact_tops = 1

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        self.check_blob_counts(len(bottom_shapes), len(param.top))
        p = param.eltwise_param
        nb = len(bottom_shapes)
        check(self, len(p.coeff) == 0 or len(p.coeff) == nb, "eltwise_layer.cpp:12",
              "this->layer_param().eltwise_param().coeff_size() == 0 || "
              "this->layer_param().eltwise_param().coeff_size() == bottom.size()",
              "Eltwise Layer takes one coefficient per bottom blob.")
        check(self, not (p.operation == PROD and len(p.coeff)), "eltwise_layer.cpp:15",
              "!(this->layer_param().eltwise_param().operation() == "
              "EltwiseParameter_EltwiseOp_PROD && "
              "this->layer_param().eltwise_param().coeff_size())",
              "Eltwise layer only takes coefficients for summation.")
        self.op = int(p.operation)
        if self.op not in (PROD, SUM, MAX):
            self.fail("Unknown elementwise operation.", "eltwise_layer.cpp:74")
        self.coeffs = [float(c) for c in p.coeff] if len(p.coeff) else [1.0] * nb
        for s in self.bottom_shapes[1:]:
            check(self, tuple(s) == tuple(self.bottom_shapes[0]), "eltwise_layer.cpp:34",
                  "bottom[i]->shape() == bottom[0]->shape()")

    def top_shapes(self):
        return [self.bottom_shapes[0]]

    def forward(self, *bottoms):
        if self.op == SUM:
            c0 = self.coeffs[0]
            out = bottoms[0] if c0 == 1 else bottoms[0] * c0
            for c, b in zip(self.coeffs[1:], bottoms[1:]):
                out = torch.add(out, b) if c == 1 else torch.add(out, b, alpha=c)
            return out
        if self.op == PROD:
            out = bottoms[0] * bottoms[1]
            for b in bottoms[2:]:
                out = out * b
            return out
        a, b = bottoms[0], bottoms[1]
        out = torch.where(a > b, a, b)
        for b in bottoms[2:]:
            out = torch.where(b > out, b, out)
        return out


# ================================================================ Flatten / Reshape / Crop
@register("Flatten", "FLATTEN")
class Flatten(Layer):
    """Caffe's FlattenLayer: axes ``axis..end_axis`` (inclusive, default 1..-1) merged into one;
    a view of the bottom. Not in place, as Caffe."""

    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        self.check_blob_counts(len(bottom_shapes), len(param.top))
        check(self, param.top[0] != param.bottom[0], "flatten_layer.cpp:10", "top[0] != bottom[0]",
              "Flatten Layer does not allow in-place computation.")
        p = param.flatten_param
        shape = self.bottom_shapes[0]
        self.start = canonical_axis(p.axis, len(shape), self)
        self.end = canonical_axis(p.end_axis, len(shape), self)
        check(self, self.start <= self.end + 1, "blob.hpp:226", "start <= end", "",
              (self.start, self.end + 1))
        self.top = (tuple(shape[:self.start]) + (count(shape, self.start, self.end + 1),)
                    + tuple(shape[self.end + 1:]))

    def top_shapes(self):
        return [self.top]

    def forward(self, x):
        return x.reshape(tuple(x.shape[:self.start]) + (-1,) + tuple(x.shape[self.end + 1:]))


@register("Reshape")
class Reshape(Layer):
    """Caffe's ReshapeLayer: ``shape`` replaces axes ``axis .. axis+num_axes`` (all by default);
    a 0 copies the bottom's dimension, a single -1 is inferred. A view of the bottom."""

    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        self.check_blob_counts(len(bottom_shapes), len(param.top))
        check(self, param.top[0] != param.bottom[0], "reshape_layer.cpp:10", "top[0] != bottom[0]",
              "Reshape Layer does not allow in-place computation.")
        p = param.reshape_param
        dims = [int(d) for d in p.shape.dim]
        copy_axes, inferred, constant = [], -1, 1
        for i, d in enumerate(dims):
            if d == 0:
                copy_axes.append(i)
            elif d == -1:
                check(self, inferred == -1, "reshape_layer.cpp:22", "inferred_axis_ == -1",
                      "new shape contains multiple -1 dims; at most a single (1) value of -1 may "
                      "be specified", (inferred, -1))
                inferred = i
            else:
                constant *= d
        shape = self.bottom_shapes[0]
        nd = len(shape)
        start = p.axis if p.axis >= 0 else nd + p.axis + 1
        check(self, start >= 0, "reshape_layer.cpp:37", "start_axis >= 0",
              "axis %d out of range" % p.axis, (start, 0))
        check(self, start <= nd, "reshape_layer.cpp:38", "start_axis <= bottom[0]->num_axes()",
              "axis %d out of range for %d-D input blob" % (p.axis, nd), (start, nd))
        check(self, p.num_axes >= -1, "reshape_layer.cpp:41", "num_axes >= -1",
              "num_axes must be >= 0, or -1 for all", (p.num_axes, -1))
        end = nd if p.num_axes == -1 else start + p.num_axes
        check(self, end <= nd, "reshape_layer.cpp:44", "end_axis <= bottom[0]->num_axes()",
              "end_axis = axis + num_axes is out of range", (end, nd))
        top = list(shape[:start]) + dims + list(shape[end:])
        for i in copy_axes:
            check(self, nd > start + i, "reshape_layer.cpp:64",
                  "bottom[0]->num_axes() > start_axis + copy_axis_index",
                  "new shape contains a 0, but there was no corresponding bottom axis to copy",
                  (nd, start + i))
            top[start + i] = shape[start + i]
        if inferred >= 0:
            explicit = constant * count(shape, 0, start) * count(shape, end)
            for i in copy_axes:
                explicit *= top[start + i]
            total = count(shape)
            check(self, explicit != 0 and total % explicit == 0, "reshape_layer.cpp:80",
                  "0 == bottom[0]->count() % explicit_count",
                  "bottom count (%d) must be divisible by the product of the specified "
                  "dimensions (%d)" % (total, explicit),
                  (0, total % explicit if explicit else total))
            top[start + inferred] = total // explicit
        for d in top:
            check(self, d >= 0, "blob.cpp:33", "shape[i] >= 0", "", (d, 0))
        check(self, count(top) == count(shape), "reshape_layer.cpp:87",
              "top[0]->count() == bottom[0]->count()", "output count must match input count",
              (count(top), count(shape)))
        self.top = tuple(top)
        self.start, self.end = start, end
        self.dims = dims

    def top_shapes(self):
        return [self.top]

    def forward(self, x):
        shape = tuple(x.shape)
        new = tuple(shape[self.start + i] if d == 0 else d for i, d in enumerate(self.dims))
        return x.reshape(shape[:self.start] + new + shape[self.end:])


@register("Crop")
class Crop(Layer):
    """Caffe's CropLayer: bottom 0 cut to bottom 1's size on axes ``axis..``, starting at
    ``offset`` (none: 0; one: the same for every cropped axis; else one per cropped axis).
    A view of bottom 0; bottom 1 only gives the size (its diff stays zero)."""

    exact_bottoms = 2
    exact_tops = 1

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        self.check_blob_counts(len(bottom_shapes), len(param.top))
        check(self, len(bottom_shapes) == 2, "crop_layer.cpp:22", "bottom.size() == 2",
              "Wrong number of bottom blobs.", (len(bottom_shapes), 2))
        p = param.crop_param
        shape, ref = self.bottom_shapes
        nd = len(shape)
        start = canonical_axis(p.axis, nd, self)
        check(self, start < nd, "crop_layer.cpp:25", "start_axis < input_dim",
              "crop axis bigger than input dim", (start, nd))
        offsets = [int(o) for o in p.offset]
        if len(offsets) > 1:
            check(self, start + len(offsets) == nd, "crop_layer.cpp:29",
                  "start_axis + param.offset_size() == input_dim",
                  "number of offset values specified must be equal to the number of dimensions "
                  "following axis.", (start + len(offsets), nd))
        self.index = []
        top = []
        for i in range(nd):
            if i < start:
                self.index.append(slice(None))
                top.append(shape[i])
                continue
            size = ref[canonical_axis(i, len(ref), self)]
            off = 0 if not offsets else offsets[0] if len(offsets) == 1 else offsets[i - start]
            check(self, shape[i] - off >= size, "crop_layer.cpp:63",
                  "bottom[0]->shape(i) - crop_offset >= bottom[1]->shape(i)",
                  "the crop for dimension %d is out-of-bounds with size %d and offset %d"
                  % (i, size, off), (shape[i] - off, size))
            self.index.append(slice(off, off + size))
            top.append(size)
        self.index = tuple(self.index)
        self.top = tuple(top)

    def top_shapes(self):
        return [self.top]

    def forward(self, x, ref):
        return x[self.index]


# ================================================================ Scale / Bias
def _param_shape(layer, shape, axis_field, num_axes, kind, where):
    """The learned blob shape of Scale / Bias: ``bottom.shape[axis : axis+num_axes]``."""
    axis = canonical_axis(axis_field, len(shape), layer)
    check(layer, num_axes >= -1, "%s:%d" % where[0],
          "num_axes >= -1", "num_axes must be non-negative, or -1 to extend to the end of "
          "bottom[0]", (num_axes, -1))
    if num_axes >= 0:
        check(layer, len(shape) >= axis + num_axes, "%s:%d" % where[1],
              "bottom[0]->num_axes() >= axis%s + num_axes" % ("_" if kind == "scale" else ""),
              "%s blob's shape extends past bottom[0]'s shape when applied starting with "
              "bottom[0] axis = %d" % (kind, axis), (len(shape), axis + num_axes))
    return tuple(shape[axis:]) if num_axes == -1 else tuple(shape[axis:axis + num_axes])


def _align(layer, shape, blob_shape, axis_field, kind, where):
    """Caffe's Reshape of Scale / Bias: the axis the blob lines up with, checked; 0 for scalars."""
    axis = 0 if len(blob_shape) == 0 else canonical_axis(axis_field, len(shape), layer)
    check(layer, len(shape) >= axis + len(blob_shape), "%s:%d" % where[0],
          "bottom[0]->num_axes() >= axis%s + %s->num_axes()" % (
              "_" if kind == "scale" else "", kind),
          "%s blob's shape extends past bottom[0]'s shape when applied starting with bottom[0] "
          "axis = %d" % (kind, axis), (len(shape), axis + len(blob_shape)))
    for i, d in enumerate(blob_shape):
        check(layer, shape[axis + i] == d, "%s:%d" % where[1],
              "bottom[0]->shape(axis%s + i) == %s->shape(i)" % (
                  "_" if kind == "scale" else "", kind),
              "dimension mismatch between bottom[0]->shape(%d) and %s->shape(%d)"
              % (axis + i, kind, i), (shape[axis + i], d))
    return _broadcast_shape(len(shape), axis, blob_shape)


@register("Scale")
class Scale(Layer):
    """Caffe's ScaleLayer: ``top = bottom0 * scale (+ bias)``, the scale broadcast along axes
    ``axis .. axis+num_axes`` (a 0-axis scale multiplies everything).

    The scale is bottom 1 when given, else a learned blob of shape
    ``bottom0.shape[axis : axis+num_axes]`` filled by ``filler`` (default constant 1). With
    ``bias_term`` a learned bias of the same alignment follows it in the blobs (``bias_filler``,
    default constant 0). One ``torch.mul`` or ``torch.addcmul``; when it works in place on the
    top of the BatchNorm just before it, the Net folds it into that layer's batch_norm kernel
    (``fused``: this layer then passes its bottom through).
    """

    min_bottoms = 1
    max_bottoms = 2
    exact_tops = 1

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        self.check_blob_counts(len(bottom_shapes), len(param.top))
        p = param.scale_param
        shape = self.bottom_shapes[0]
        self.learned = len(bottom_shapes) == 1
        if self.learned:
            scale_shape = _param_shape(self, shape, p.axis, p.num_axes, "scale",
                                       (("scale_layer.cpp", 21), ("scale_layer.cpp", 24)))
            if p.HasField("filler"):
                filler = p.filler
            else:
                filler = caffe_pb2.FillerParameter(type="constant", value=1)
            self.scale = self.add_blob(scale_shape, filler)
        else:
            scale_shape = tuple(self.bottom_shapes[1])
        self.view = _align(self, shape, scale_shape, p.axis, "scale",
                           (("scale_layer.cpp", 88), ("scale_layer.cpp", 92)))
        self.bias = None
        if p.bias_term:
            num_axes = len(self.bottom_shapes[1]) if not self.learned else p.num_axes
            bias_shape = _param_shape(self, shape, p.axis, num_axes, "bias",
                                      (("bias_layer.cpp", 19), ("bias_layer.cpp", 22)))
            self.bias = self.add_blob(bias_shape, p.bias_filler)
            self.bias_view = _align(self, shape, bias_shape, p.axis, "bias",
                                    (("bias_layer.cpp", 50), ("bias_layer.cpp", 54)))

    def top_shapes(self):
        return [self.bottom_shapes[0]]

    fused = False     # True while the BatchNorm just before applies this scale (Net.run)

    def forward(self, x, *scale):
        if self.fused:
            return x
        return self.affine(x, *scale)

    def affine(self, x, *scale):
        s = (scale[0] if scale else self.scale).reshape(self.view)
        if self.bias is not None:
            return torch.addcmul(self.bias.view(self.bias_view), x, s)
        return x * s


@register("Bias")
class Bias(Layer):
    """Caffe's BiasLayer: ``top = bottom0 + bias`` broadcast along axes ``axis .. axis+num_axes``;
    the bias is bottom 1 or a learned blob (``filler``, default constant 0)."""

    min_bottoms = 1
    max_bottoms = 2
    exact_tops = 1

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        self.check_blob_counts(len(bottom_shapes), len(param.top))
        p = param.bias_param
        shape = self.bottom_shapes[0]
        self.learned = len(bottom_shapes) == 1
        if self.learned:
            bias_shape = _param_shape(self, shape, p.axis, p.num_axes, "bias",
                                      (("bias_layer.cpp", 19), ("bias_layer.cpp", 22)))
            self.bias = self.add_blob(bias_shape, p.filler)
        else:
            bias_shape = tuple(self.bottom_shapes[1])
        self.view = _align(self, shape, bias_shape, p.axis, "bias",
                           (("bias_layer.cpp", 50), ("bias_layer.cpp", 54)))

    def top_shapes(self):
        return [self.bottom_shapes[0]]

    def forward(self, x, *bias):
        b = bias[0] if bias else self.bias
        return x + b.reshape(self.view)


# ================================================================ Tile / Reduction
@register("Tile")
class Tile(Layer):
    """Caffe's TileLayer: the block of axes ``axis..`` repeated ``tiles`` times along ``axis``."""

    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        self.check_blob_counts(len(bottom_shapes), len(param.top))
        p = param.tile_param
        shape = self.bottom_shapes[0]
        self.axis = canonical_axis(p.axis, len(shape), self)
        check(self, p.HasField("tiles"), "tile_layer.cpp:13", "tile_param.has_tiles()",
              "Number of tiles must be specified")
        check(self, p.tiles > 0, "tile_layer.cpp:15", "tiles_ > 0",
              "Number of tiles must be positive.", (p.tiles, 0))
        self.reps = [1] * len(shape)
        self.reps[self.axis] = int(p.tiles)

    def forward(self, x):
        return x.repeat(self.reps)


@register("Reduction")
class Reduction(Layer):
    """Caffe's ReductionLayer: SUM, ASUM (sum of |x|), SUMSQ (sum of x^2) or MEAN over all axes
    from ``axis`` on, times ``coeff``. The top is ``bottom.shape[:axis]`` (0-d for axis 0)."""

    exact_bottoms = 1
    exact_tops = 1
    SUM, ASUM, SUMSQ, MEAN = 1, 2, 3, 4

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        self.check_blob_counts(len(bottom_shapes), len(param.top))
        p = param.reduction_param
        shape = self.bottom_shapes[0]
        self.axis = canonical_axis(p.axis, len(shape), self)
        self.op = int(p.operation)
        if self.op not in (self.SUM, self.ASUM, self.SUMSQ, self.MEAN):
            self.fail("Unknown reduction op: %d" % self.op, "reduction_layer.cpp:53")
        self.top = tuple(shape[:self.axis])
        dim = count(shape, self.axis)
        self.coeff = float(p.coeff)
        if self.op == self.MEAN:
            # Caffe divides the float coeff by the int dim in float arithmetic
            self.coeff = float(torch.tensor(self.coeff, dtype=torch.float32)
                               / torch.tensor(dim, dtype=torch.float32)) if dim else 0.0

    def top_shapes(self):
        return [self.top]

    def forward(self, x):
        x = x.reshape(tuple(x.shape[:self.axis]) + (-1,))
        if self.op == self.ASUM:
            x = x.abs()
        elif self.op == self.SUMSQ:
            x = x * x
        out = x.sum(-1)
        if self.coeff != 1:
            out = out * self.coeff
        return out


# ================================================================ Embed / Parameter / Silence
@register("Embed")
class Embed(Layer):
    """Caffe's EmbedLayer: each (integer-valued) bottom entry picks a row of the ``(input_dim,
    num_output)`` weight; the top is ``bottom.shape + (num_output,)``, plus the bias when
    ``bias_term``. The index bottom gets no gradient (Caffe refuses to back-propagate to it)."""

    exact_bottoms = 1
    exact_tops = 1
    label_bottoms = (0,)

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        self.check_blob_counts(len(bottom_shapes), len(param.top))
        p = param.embed_param
        n, k = int(p.num_output), int(p.input_dim)
        check(self, n > 0, "embed_layer.cpp:13", "N_ > 0",
              "EmbedLayer num_output must be positive.", (n, 0))
        check(self, k > 0, "embed_layer.cpp:15", "K_ > 0",
              "EmbedLayer input_dim must be positive.", (k, 0))
        self.num_output = n
        self.weight = self.add_blob((k, n), p.weight_filler)
        self.bias = self.add_blob((n,), p.bias_filler) if p.bias_term else None

    def top_shapes(self):
        return [tuple(self.bottom_shapes[0]) + (self.num_output,)]

    def forward(self, x):
        out = F.embedding(x.detach().long(), self.weight)
        if self.bias is not None:
            out = out + self.bias
        return out


@register("Parameter")
class Parameter(Layer):
    """Caffe's ParameterLayer: its one learned blob (``parameter_param.shape``, zero-filled) is
    the top; the top's diff is the blob's diff."""

    exact_bottoms = 0
    exact_tops = 1

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        self.check_blob_counts(len(bottom_shapes), len(param.top))
        shape = tuple(int(d) for d in param.parameter_param.shape.dim)
        for d in shape:
            check(self, d >= 0, "blob.cpp:33", "shape[i] >= 0", "", (d, 0))
        self.value = self.add_blob(shape, None)

    def top_shapes(self):
        return [tuple(self.value.shape)]

    def forward(self):
        return self.value.view_as(self.value)


@register("Silence", "SILENCE")
class Silence(Layer):
    """Caffe's SilenceLayer: consumes its bottoms, produces nothing (their diffs stay zero)."""

    min_bottoms = 1
    exact_tops = 0

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        self.check_blob_counts(len(bottom_shapes), len(param.top))

    def top_shapes(self):
        return []

    def forward(self, *bottoms):
        return ()


# ================================================================ ArgMax / Accuracy
def _sorted_desc(x, dim):
    """Values and indices sorted descending along ``dim``, ties broken towards the larger index
    (Caffe sorts (value, index) pairs with std::greater)."""
    n = x.shape[dim]
    values, idx = torch.sort(x.flip(dim), dim=dim, descending=True, stable=True)
    return values, (n - 1) - idx


@register("ArgMax", "ARGMAX")
class ArgMax(Layer):
    """Caffe's ArgMaxLayer (no backward).

    Without ``axis``: per item (axis 0) over all other values, the ``top_k`` indices, shape
    ``(N, 1, top_k)`` padded with 1s to the bottom's axes count (at least 3); with
    ``out_max_val`` ``(N, 2, top_k)``: indices then values. With ``axis``: the ``top_k`` indices
    (or, with ``out_max_val``, the values) along that axis, which becomes ``top_k`` long.
    """

    exact_bottoms = 1
    exact_tops = 1
    never_backward = True

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        self.check_blob_counts(len(bottom_shapes), len(param.top))
        p = param.argmax_param
        shape = self.bottom_shapes[0]
        self.top_k = k = int(p.top_k)
        self.out_max_val = bool(p.out_max_val)
        self.has_axis = p.HasField("axis")
        check(self, k >= 1, "argmax_layer.cpp:17", "top_k_ >= 1", "top k must not be less than 1.",
              (k, 1))
        if self.has_axis:
            self.axis = canonical_axis(p.axis, len(shape), self)
            check(self, k <= shape[self.axis], "argmax_layer.cpp:23",
                  "top_k_ <= bottom[0]->shape(axis_)",
                  "top_k must be less than or equal to the dimension of the axis.",
                  (k, shape[self.axis]))
            top = list(shape)
            top[self.axis] = k
        else:
            check(self, k <= count(shape, 1), "argmax_layer.cpp:26",
                  "top_k_ <= bottom[0]->count(1)",
                  "top_k must be less than or equal to the dimension of the flattened bottom "
                  "blob per instance.", (k, count(shape, 1)))
            top = [1] * max(len(shape), 3)
            top[0] = shape[0]
            top[2] = k
            if self.out_max_val:
                top[1] = 2
        self.top = tuple(top)

    def top_shapes(self):
        return [self.top]

    def forward(self, x):
        x = x.detach()
        k = self.top_k
        if self.has_axis:
            values, idx = _sorted_desc(x, self.axis)
            out = values if self.out_max_val else idx.to(x.dtype)
            return out.narrow(self.axis, 0, k)
        values, idx = _sorted_desc(x.reshape(x.shape[0], -1), 1)
        out = idx[:, :k].to(x.dtype)
        if self.out_max_val:
            out = torch.cat([out, values[:, :k]], 1)
        return out.reshape((x.shape[0],) + self.top[1:])


@register("Accuracy", "ACCURACY")
class Accuracy(Layer):
    """Caffe's AccuracyLayer (no backward).

    Top 0 (a 0-axis scalar): the fraction of non-ignored labels whose true-class score is beaten
    or tied by fewer than ``top_k`` classes (the true class counts itself), classes along ``axis``;
    0 when every label is ignored. Optional top 1: the same per class (0 for absent classes).
    """

    exact_bottoms = 2
    min_tops = 1
    max_tops = 2
    never_backward = True
    label_bottoms = (1,)

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        self.check_blob_counts(len(bottom_shapes), len(param.top))
        p = param.accuracy_param
        shape, label = self.bottom_shapes
        self.top_k = int(p.top_k)
        self.ignore = int(p.ignore_label) if p.HasField("ignore_label") else None
        n_label = count(label)
        check(self, n_label > 0 and self.top_k <= count(shape) // n_label, "accuracy_layer.cpp:25",
              "top_k_ <= bottom[0]->count() / bottom[1]->count()",
              "top_k must be less than or equal to the number of classes.",
              (self.top_k, count(shape) // n_label if n_label else 0))
        self.axis = canonical_axis(p.axis, len(shape), self)
        self.outer = count(shape, 0, self.axis)
        self.inner = count(shape, self.axis + 1)
        self.classes = shape[self.axis]
        check(self, self.outer * self.inner == n_label, "accuracy_layer.cpp:31",
              "outer_num_ * inner_num_ == bottom[1]->count()",
              "Number of labels must match number of predictions; e.g., if label axis == 1 and "
              "prediction shape is (N, C, H, W), label count (number of labels) must be N*H*W, "
              "with integer values in {0, 1, ..., C-1}.", (self.outer * self.inner, n_label))
        self.per_class = len(param.top) > 1

    def top_shapes(self):
        tops = [()]
        if self.per_class:
            tops.append((self.classes,))
        return tops

    def forward(self, x, label):
        x = x.detach().reshape(-1, self.classes, self.inner)
        lab = label.detach().reshape(x.shape[0], self.inner).long()
        if self.ignore is not None:
            valid = lab != self.ignore
            lab = torch.where(valid, lab, torch.zeros_like(lab))
        else:
            valid = None
        truth = x.gather(1, lab.unsqueeze(1))
        correct = (x >= truth).sum(1) <= self.top_k
        if valid is not None:
            correct = correct & valid
            acc = correct.sum().to(x.dtype) / valid.sum().clamp(min=1).to(x.dtype)
        else:
            acc = correct.sum().to(x.dtype) / float(lab.numel())
        if not self.per_class:
            return acc
        flat = lab.reshape(-1)
        ones = valid.reshape(-1).to(x.dtype) if valid is not None else torch.ones(
            flat.shape, dtype=x.dtype, device=x.device)
        nums = torch.zeros(self.classes, dtype=x.dtype, device=x.device).scatter_add_(
            0, flat, ones)
        good = torch.zeros(self.classes, dtype=x.dtype, device=x.device).scatter_add_(
            0, flat, correct.reshape(-1).to(x.dtype))
        per = torch.where(nums > 0, good / nums.clamp(min=1), torch.zeros_like(nums))
        return acc, per


# ================================================================ Dropout
@register("Dropout", "DROPOUT")
class Dropout(Layer):
    """Caffe's DropoutLayer: in TRAIN each value is kept with probability ``1 - dropout_ratio``
    and scaled by ``1 / (1 - dropout_ratio)`` (inverted dropout); TEST passes the bottom through."""

    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        self.check_blob_counts(len(bottom_shapes), len(param.top))
        self.ratio = float(param.dropout_param.dropout_ratio)
        if not 0.0 <= self.ratio < 1.0:
            self.fail("dropout_ratio must be in [0, 1) (got %s): Caffe's DCHECKs require "
                      "0 < ratio < 1" % self.ratio, "dropout_layer.cpp:17")

    def top_shapes(self):
        return [self.bottom_shapes[0]]

    def forward(self, x):
        if self.phase != "TRAIN" or self.shape_inference or self.ratio == 0.0:
            return x
        return F.dropout(x, self.ratio, True)
