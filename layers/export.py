"""``trainer export``: a Caffe net and its weights as plain PyTorch code, or as ONNX.

* :func:`generate_torch` writes the TEST-phase (deploy) net as the source of one
  ``torch.nn.Module`` that calls ``torch`` / ``torch.nn.functional`` per layer and needs nothing
  else (no trainer, no protobuf), plus a ``state_dict`` with the weights. The code reproduces each
  layer's Caffe semantics as our layer modules do (Caffe's pooling output size and windows,
  BatchNorm's stored statistics divided by the moving-average factor, Eltwise MAX's tie rule, ...)
  for the net's input shapes, so its outputs equal the :class:`layers.net.Net`'s.
* :func:`export_onnx` runs ``torch.onnx.export`` on the TEST-phase Net itself (the ``onnx``
  package is an optional extra: ``pip install 'trainer[onnx]'``).

Inputs are the tops of the net's Input (or other data) layers, with their prototxt shapes;
outputs are the blobs no layer consumes (Caffe's net outputs), in sorted order. A layer type the
exporter cannot write raises a CaffeError naming the layer, its type and the supported types.
BatchNorm statistics are exported as two buffers, ``<layer>_mean`` and ``<layer>_var``, already
divided by Caffe's moving-average factor (the values Caffe uses at TEST time).
"""
import collections
import keyword
import math
import os
import re
import warnings

import numpy as np
import torch

from converters.errors import CaffeError

FLT_MAX = 3.4028234663852886e38
FLT_MIN = 1.1754943508222875e-38

ROLES = {
    "Convolution": ("weight", "bias"), "Deconvolution": ("weight", "bias"),
    "InnerProduct": ("weight", "bias"), "Scale": ("scale", "bias"), "Bias": ("bias",),
    "PReLU": ("slope",), "Normalize": ("scale",),
}
INPUT_TYPES = ("Input", "Data", "ImageData", "DummyData", "MemoryData", "HDF5Data",
               "AnnotatedData", "WindowData")


def _r(value):
    """A float as a Python literal that reads back as the same float."""
    value = float(value)
    if math.isinf(value):
        return "math.inf" if value > 0 else "-math.inf"
    if math.isnan(value):
        return "math.nan"
    return repr(value)


class _Writer:
    """Generates the module: variable and attribute names, parameters, code lines."""

    def __init__(self, net):
        self.net = net
        self.lines = []           # forward body
        self.params = collections.OrderedDict()    # attr -> (tensor, is_parameter)
        self.attr_of = {}         # id(tensor) -> attr (shared params)
        self.used = set(keyword.kwlist) | {"self", "torch", "F", "math", "os", "x", "load",
                                            "WEIGHTS"}
        self.var = {}             # blob name -> current Python variable
        self.locals = set()       # every name handed out (variables and attributes)

    def name(self, base, used=None):
        used = self.used if used is None else used
        base = re.sub(r"\W", "_", base) or "v"
        if base[0].isdigit():
            base = "b_" + base
        candidate, k = base, 1
        while candidate in used:
            candidate = "%s_%d" % (base, k)
            k += 1
        used.add(candidate)
        self.locals.add(candidate)
        return candidate

    def attr(self, tensor, base, parameter=True):
        key = id(tensor)
        if key in self.attr_of:
            return "self." + self.attr_of[key]
        a = self.name(base)
        self.attr_of[key] = a
        self.params[a] = (tensor.detach().to("cpu", torch.float32).clone(), parameter)
        return "self." + a

    def const(self, tensor, base):
        """A constant buffer (not a Caffe blob): pooling divisors, PriorBox outputs."""
        a = self.name(base)
        self.params[a] = (tensor.detach().to("cpu", torch.float32).clone(), False)
        return "self." + a

    def emit(self, line):
        self.lines.append(line)


def _blob(w, layer, i, li):
    name = w.net.layer_names[li]
    roles = ROLES.get(w.net.layer_types[li], ())
    role = roles[i] if i < len(roles) else "blob%d" % i
    return w.attr(layer.blobs[i], "%s_%s" % (name, role))


# ----------------------------------------------------------------------------- emitters
# Each takes (writer, net, li, layer, bottoms) and returns a list of expressions, one per top
# (or emits assignments itself and returns variable names).

def _conv(w, net, li, layer, xs):
    if not layer._fast:
        raise _unsupported(net, li, "only channel axis 1 with 1 to 3 spatial axes")
    g = layer.geom
    n = g.num_spatial
    weight = _blob(w, layer, 0, li)
    bias = _blob(w, layer, 1, li) if layer.bias is not None else "None"
    if net.layer_types[li] == "Convolution":
        fn = "F.conv%dd" % n
        return ["%s(%s, %s, %s, %s, %s, %s, %d)" % (fn, x, weight, bias, tuple(g.stride),
                                                   tuple(g.pad), tuple(g.dilation), layer.group)
                for x in xs]
    fn = "F.conv_transpose%dd" % n
    return ["%s(%s, %s, %s, %s, %s, 0, %d, %s)" % (fn, x, weight, bias, tuple(g.stride),
                                                  tuple(g.pad), layer.group, tuple(g.dilation))
            for x in xs]


def _inner_product(w, net, li, layer, xs):
    x = xs[0]
    if layer.flatten:
        x = "%s.flatten(%d)" % (x, layer.axis)
    weight = _blob(w, layer, 0, li)
    if layer.transpose:
        weight += ".t()"
    bias = _blob(w, layer, 1, li) if layer.bias is not None else "None"
    return ["F.linear(%s, %s, %s)" % (x, weight, bias)]


def _pooling(w, net, li, layer, xs):
    from layers.vision import AVE, MAX
    if layer.want_mask:
        raise _unsupported(net, li, "the argmax mask top of MAX pooling")
    p = layer.plan
    x = xs[0]
    k, s = (p.kh, p.kw), (p.sh, p.sw)
    pad = (p.pw, p.pad_right, p.ph, p.pad_bottom)
    if layer.method == MAX:
        if p.native_ceil is not None:
            return ["F.max_pool2d(%s, %s, %s, %s, ceil_mode=%s)" % (x, k, s, (p.ph, p.pw),
                                                                    p.native_ceil)]
        expr = "F.max_pool2d(F.pad(%s, %s, value=-math.inf), %s, %s)" % (x, pad, k, s)
        if p.empty_windows:
            expr = "%s.clamp(min=%s)" % (expr, _r(-FLT_MAX))
        return [expr]
    if layer.method == AVE:
        if p.global_pool:
            return ["%s.mean((2, 3), keepdim=True)" % x]
        if p.native_ceil is not None:
            return ["F.avg_pool2d(%s, %s, %s, %s, ceil_mode=%s, count_include_pad=True)"
                    % (x, k, s, (p.ph, p.pw), p.native_ceil)]
        div = w.const(p.divisor(torch.device("cpu"), torch.float32),
                      net.layer_names[li] + "_divisor")
        return ["F.avg_pool2d(F.pad(%s, %s, value=0.0), %s, %s, divisor_override=1) / %s"
                % (x, pad, k, s, div)]
    # STOCHASTIC at TEST time: sum(x^2) / sum(x) per window (Caffe's GPU kernel)
    v = w.name(net.layer_names[li] + "_padded")
    w.emit("%s = F.pad(%s, %s, value=0.0)" % (v, x, pad))
    return ["F.avg_pool2d(%s * %s, %s, %s, divisor_override=1) / (F.avg_pool2d(%s, %s, %s, "
            "divisor_override=1) + %s)" % (v, v, k, s, v, k, s, _r(FLT_MIN))]


def _relu(w, net, li, layer, xs):
    if layer.negative_slope == 0:
        return ["F.relu(%s)" % xs[0]]
    return ["F.leaky_relu(%s, %s)" % (xs[0], _r(layer.negative_slope))]


def _power(w, net, li, layer, xs):
    x = xs[0]
    if layer.diff_scale == 0:
        return ["torch.full_like(%s, %s)" % (x, _r(layer.constant))]
    y = x
    if layer.scale != 1:
        y = "%s * %s" % (y, _r(layer.scale))
    if layer.shift != 0:
        y = "(%s + %s)" % (y, _r(layer.shift))
    if layer.power == 1:
        return [y if y != x else "%s.clone()" % x]
    if layer.power == 2:
        v = w.name(net.layer_names[li] + "_base")
        w.emit("%s = %s" % (v, y))
        return ["%s * %s" % (v, v)]
    if layer.power == 0.5:
        return ["torch.sqrt(%s)" % y]
    return ["torch.pow(%s, %s)" % (y, _r(layer.power))]


def _exp(w, net, li, layer, xs):
    x = xs[0]
    inner = "%s * %s" % (x, _r(layer.inner_scale)) if layer.inner_scale != 1 else x
    y = "torch.exp(%s)" % inner
    if layer.outer_scale != 1:
        y = "%s * %s" % (y, _r(layer.outer_scale))
    return [y]


def _log(w, net, li, layer, xs):
    y = xs[0]
    if layer.input_scale != 1:
        y = "%s * %s" % (y, _r(layer.input_scale))
    if layer.input_shift != 0:
        y = "(%s + %s)" % (y, _r(layer.input_shift))
    y = "torch.log(%s)" % y
    if layer.base_scale != 1:
        y = "%s * %s" % (y, _r(layer.base_scale))
    return [y]


def _clip(w, net, li, layer, xs):
    if layer.min <= layer.max:
        return ["torch.clamp(%s, %s, %s)" % (xs[0], _r(layer.min), _r(layer.max))]
    return ["torch.clamp_min(torch.clamp_max(%s, %s), %s)" % (xs[0], _r(layer.max),
                                                             _r(layer.min))]


def _swish(w, net, li, layer, xs):
    if layer.beta == 1:
        return ["F.silu(%s)" % xs[0]]
    return ["%s * torch.sigmoid(%s * %s)" % (xs[0], xs[0], _r(layer.beta))]


def _batch_norm(w, net, li, layer, xs):
    name = net.layer_names[li]
    if not layer.use_global_stats:
        return ["F.batch_norm(%s, None, None, None, None, True, 0.0, %s)" % (xs[0],
                                                                           _r(layer.eps))]
    mean_blob, var_blob, factor_blob = layer._blob_list()
    factor = factor_blob.detach().cpu()
    scale = torch.where(factor == 0, torch.zeros_like(factor), 1.0 / factor)
    mean = w.const(mean_blob.detach().cpu() * scale, name + "_mean")
    var = w.const(var_blob.detach().cpu() * scale, name + "_var")
    return ["F.batch_norm(%s, %s, %s, None, None, False, 0.0, %s)" % (xs[0], mean, var,
                                                                     _r(layer.eps))]


def _scale(w, net, li, layer, xs):
    x = xs[0]
    if layer.learned:
        s = "%s.view(%s)" % (_blob(w, layer, 0, li), tuple(layer.view))
    else:
        s = "%s.reshape(%s)" % (xs[1], tuple(layer.view))
    if layer.bias is not None:
        bias = _blob(w, layer, 1 if layer.learned else 0, li)
        return ["torch.addcmul(%s.view(%s), %s, %s)" % (bias, tuple(layer.bias_view), x, s)]
    return ["%s * %s" % (x, s)]


def _bias(w, net, li, layer, xs):
    b = _blob(w, layer, 0, li) if layer.learned else xs[1]
    return ["%s + %s.reshape(%s)" % (xs[0], b, tuple(layer.view))]


def _eltwise(w, net, li, layer, xs):
    from layers.common import PROD, SUM
    if layer.op == SUM:
        terms = []
        for c, b in zip(layer.coeffs, xs):
            terms.append(b if c == 1 else "%s * %s" % (b, _r(c)))
        return [" + ".join(terms)]
    if layer.op == PROD:
        return [" * ".join(xs)]
    v = w.name(net.layer_names[li] + "_max")
    w.emit("%s = torch.where(%s > %s, %s, %s)" % (v, xs[0], xs[1], xs[0], xs[1]))
    for b in xs[2:]:
        w.emit("%s = torch.where(%s > %s, %s, %s)" % (v, b, v, b, v))
    return [v]


def _concat(w, net, li, layer, xs):
    if len(xs) == 1:
        return [xs[0]]
    return ["torch.cat([%s], %d)" % (", ".join(xs), layer.axis)]


def _slice(w, net, li, layer, xs):
    if layer.ntop == 1:
        return [xs[0]]
    sizes = list(layer.sizes) if layer.sizes else \
        layer.bottom_shapes[0][layer.axis] // layer.ntop
    v = w.name(net.layer_names[li] + "_parts")
    w.emit("%s = torch.split(%s, %s, %d)" % (v, xs[0], sizes, layer.axis))
    return ["%s[%d]" % (v, k) for k in range(layer.ntop)]


def _flatten(w, net, li, layer, xs):
    x = xs[0]
    return ["%s.reshape(tuple(%s.shape[:%d]) + (-1,) + tuple(%s.shape[%d:]))"
            % (x, x, layer.start, x, layer.end + 1)]


def _reshape(w, net, li, layer, xs):
    x = xs[0]
    dims = ", ".join("%s.shape[%d]" % (x, layer.start + i) if d == 0 else str(d)
                     for i, d in enumerate(layer.dims))
    if len(layer.dims) == 1:
        dims += ","
    return ["%s.reshape(tuple(%s.shape[:%d]) + (%s) + tuple(%s.shape[%d:]))"
            % (x, x, layer.start, dims, x, layer.end)]


def _lrn(w, net, li, layer, xs):
    x = xs[0]
    if not layer.within:
        return ["F.local_response_norm(%s, %d, %s, %s, %s)" % (x, layer.size, _r(layer.alpha),
                                                             _r(layer.beta), _r(layer.k))]
    return ["%s * torch.pow(F.avg_pool2d(%s * %s, %d, stride=1, padding=%d, "
            "count_include_pad=True) * %s + 1.0, %s)" % (x, x, x, layer.size, layer.pre_pad,
                                                         _r(layer.alpha), _r(-layer.beta))]


def _crop(w, net, li, layer, xs):
    parts = []
    for sl in layer.index:
        parts.append(":" if sl.start is None else "%d:%d" % (sl.start, sl.stop))
    return ["%s[%s]" % (xs[0], ", ".join(parts))]


def _permute(w, net, li, layer, xs):
    if not layer.need_permute:
        return [xs[0]]
    return ["%s.permute(%s).contiguous()" % (xs[0], ", ".join(str(o) for o in layer.orders))]


def _normalize(w, net, li, layer, xs):
    name = net.layer_names[li]
    x = xs[0]
    v = w.name(name + "_flat")
    w.emit("%s = %s.reshape(%s.shape[0], %s.shape[1], -1)" % (v, x, x, x))
    dims = "(1, 2)" if layer.across_spatial else "1"
    norm = "torch.sqrt((%s * %s).sum(dim=%s, keepdim=True) + %s)" % (v, v, dims, _r(layer.eps))
    scale = _blob(w, layer, 0, li)
    if not layer.channel_shared:
        scale = "%s.view(1, %d, 1)" % (scale, layer.bottom_shapes[0][1])
    return ["(%s / %s * %s).reshape(%s.shape)" % (v, norm, scale, x)]


def _prior_box(w, net, li, layer, xs):
    with torch.no_grad():
        out = layer(*[torch.zeros(s) for s in layer.bottom_shapes])
    return [w.const(out, net.layer_names[li] + "_priors")]


def _mvn(w, net, li, layer, xs):
    n, c, h, ww = layer.legacy_shape
    num = n if layer.across_channels else n * c
    v = w.name(net.layer_names[li] + "_flat")
    w.emit("%s = %s.reshape(%d, -1)" % (v, xs[0], num))
    if layer.normalize_variance:
        var, mean = w.name(net.layer_names[li] + "_var"), w.name(net.layer_names[li] + "_mean")
        w.emit("%s, %s = torch.var_mean(%s, dim=1, correction=0, keepdim=True)" % (var, mean, v))
        y = "(%s - %s) / (torch.sqrt(%s) + %s)" % (v, mean, var, _r(layer.eps))
    else:
        y = "(%s - %s.mean(dim=1, keepdim=True))" % (v, v)
    return ["(%s).reshape(%d, %d, %d, %d)" % (y, n, c, h, ww)]


def _tile(w, net, li, layer, xs):
    return ["%s.repeat(%s)" % (xs[0], tuple(layer.reps))]


def _simple(expr):
    return lambda w, net, li, layer, xs: [expr.format(x=xs[0], layer=layer, r=_r)]


EMITTERS = {
    "Convolution": _conv, "Deconvolution": _conv, "InnerProduct": _inner_product,
    "Pooling": _pooling, "ReLU": _relu,
    "PReLU": lambda w, net, li, layer, xs: ["F.prelu(%s, %s)" % (xs[0], _blob(w, layer, 0, li))],
    "Sigmoid": _simple("torch.sigmoid({x})"), "TanH": _simple("torch.tanh({x})"),
    "ELU": lambda w, net, li, layer, xs: ["F.elu(%s, %s)" % (xs[0], _r(layer.alpha))],
    "AbsVal": _simple("torch.abs({x})"), "BNLL": _simple("F.softplus({x})"),
    "Power": _power, "Exp": _exp, "Log": _log, "Clip": _clip, "Swish": _swish,
    "Threshold": lambda w, net, li, layer, xs: ["(%s > %s).to(%s.dtype)" % (
        xs[0], _r(layer.threshold), xs[0])],
    "BatchNorm": _batch_norm, "Scale": _scale, "Bias": _bias, "Eltwise": _eltwise,
    "Concat": _concat, "Slice": _slice,
    "Split": lambda w, net, li, layer, xs: [xs[0]] * layer.ntop,
    "Softmax": lambda w, net, li, layer, xs: ["F.softmax(%s, dim=%d)" % (xs[0], layer.axis)],
    "Dropout": lambda w, net, li, layer, xs: [xs[0]],
    "Flatten": _flatten, "Reshape": _reshape, "LRN": _lrn, "Crop": _crop,
    "Permute": _permute, "Normalize": _normalize, "PriorBox": _prior_box, "MVN": _mvn,
    "Tile": _tile,
}
SUPPORTED = sorted(set(EMITTERS) | {"Input", "Silence"})


def _unsupported(net, li, what=None):
    name, kind = net.layer_names[li], net.layer_types[li]
    if what:
        return CaffeError("Cannot export layer '%s' of type %s: %s is not supported by trainer "
                          "export." % (name, kind, what))
    hint = ""
    if kind.endswith("Loss") or kind in ("Accuracy", "DetectionOutput", "DetectionEvaluate",
                                         "ArgMax"):
        hint = (" Export the deploy net (the layers up to the scores, with an Input layer), "
                "not the train/val net.")
    return CaffeError("Cannot export layer '%s': layer type %s is not supported by trainer "
                      "export.%s Supported types: %s." % (name, kind, hint, ", ".join(SUPPORTED)))


def _check_net(net):
    if net.phase != "TEST":
        raise CaffeError("trainer export writes the TEST-phase (deploy) net; this net was built "
                         "in phase %s" % net.phase)
    inputs = []
    for li, kind in enumerate(net.layer_types):
        layer = net.layer_modules[li]
        if getattr(layer, "is_data", False) or kind in INPUT_TYPES:
            for t in net.top_names[li]:
                if t in inputs:
                    raise CaffeError("Input blob %s is produced twice" % t)
                inputs.append(t)
            continue
        if kind == "Silence":
            continue
        if kind not in EMITTERS:
            raise _unsupported(net, li)
    if not inputs:
        raise CaffeError("The net has no Input layer: nothing to feed the exported module")
    outputs = list(net.outputs)
    if not outputs:
        raise CaffeError("The net has no output blob (every top is consumed)")
    return inputs, outputs


def _class_name(net):
    words = re.findall(r"[A-Za-z0-9]+", net.name or "")
    name = "".join(w[:1].upper() + w[1:] for w in words) or "CaffeNet"
    if name[0].isdigit() or keyword.iskeyword(name):
        name = "Net" + name
    return name


def generate_torch(net, provenance="", weights_file=None):
    """(Python source, state_dict) of the TEST-phase ``net`` as a plain torch module;
    ``weights_file``: the state_dict's file name, which ``load()`` reads by default."""
    inputs, outputs = _check_net(net)
    w = _Writer(net)
    args = []
    for t in inputs:
        v = w.name(t)
        w.var[t] = v
        args.append(v)
    for li, kind in enumerate(net.layer_types):
        layer = net.layer_modules[li]
        if getattr(layer, "is_data", False) or kind in INPUT_TYPES or kind == "Silence":
            continue
        xs = [w.var[b] for b in net.bottom_names[li]]
        w.emit("# %s (%s)" % (net.layer_names[li], kind))
        exprs = EMITTERS[kind](w, net, li, layer, xs)
        for t, expr in zip(net.top_names[li], exprs):
            if expr in w.locals:           # an alias (Split, Dropout, single Concat ...)
                w.var[t] = expr
                continue
            v = w.name(t)
            w.emit("%s = %s" % (v, expr))
            w.var[t] = v
    ret = [w.var[o] for o in outputs]
    w.emit("return %s" % (ret[0] if len(ret) == 1 else "(%s)" % ", ".join(ret)))

    cls = _class_name(net)
    shapes = tuple(tuple(int(d) for d in net.blob_shapes[t]) for t in inputs)
    out = []
    out.append('"""%s: exported by `trainer export`%s (TEST phase).' % (
        net.name or cls, (" from " + provenance) if provenance else ""))
    out.append("")
    out.append("Plain PyTorch: this file needs only torch. The weights are in the state_dict "
               "saved beside it:")
    out.append("")
    if weights_file:
        out.append("    module = load()     # %s, from %s beside this file" % (cls, weights_file))
    else:
        out.append("    module = load(\"weights.pt\")     # %s, with the saved state_dict" % cls)
    out.append("    outputs = module(%s)" % ", ".join("torch.zeros%s" % (s,) for s in shapes))
    out.append("")
    out.append("Inputs: %s. Outputs: %s." % (
        ", ".join("%s %s" % (t, s) for t, s in zip(inputs, shapes)), ", ".join(outputs)))
    out.append("Caffe's semantics are reproduced for these input shapes (pooling output sizes "
               "and windows);")
    out.append("BatchNorm buffers hold Caffe's mean/variance already divided by its "
               "moving-average factor.")
    out.append('"""')
    out.append("import math")
    out.append("import os")
    out.append("")
    out.append("import torch")
    out.append("import torch.nn.functional as F")
    out.append("")
    out.append("")
    out.append("class %s(torch.nn.Module):" % cls)
    out.append("    input_names = %r" % (tuple(inputs),))
    out.append("    input_shapes = %r" % (shapes,))
    out.append("    output_names = %r" % (tuple(outputs),))
    out.append("")
    out.append("    def __init__(self):")
    out.append("        super().__init__()")
    for a, (tensor, is_param) in w.params.items():
        shape = tuple(tensor.shape)
        if is_param:
            out.append("        self.%s = torch.nn.Parameter(torch.zeros(%r))" % (a, shape))
        else:
            out.append("        self.register_buffer(%r, torch.zeros(%r))" % (a, shape))
    if not w.params:
        out.append("        pass")
    out.append("")
    out.append("    def forward(self, %s):" % ", ".join(args))
    for line in w.lines:
        out.append("        " + line)
    out.append("")
    out.append("")
    out.append("WEIGHTS = %r   # the state_dict trainer export wrote beside this file"
               % (weights_file or ""))
    out.append("")
    out.append("")
    out.append("def load(weights=None, map_location=\"cpu\"):")
    out.append("    \"\"\"A %s with the weights of the state_dict file ``weights`` (default: "
               "WEIGHTS beside this file), in eval mode.\"\"\"" % cls)
    out.append("    if weights is None:")
    out.append("        weights = os.path.join(os.path.dirname(os.path.abspath(__file__)), "
               "WEIGHTS)")
    out.append("    module = %s()" % cls)
    out.append("    module.load_state_dict(torch.load(weights, map_location=map_location, "
               "weights_only=True))")
    out.append("    return module.eval()")
    source = "\n".join(out) + "\n"
    state = collections.OrderedDict((a, t) for a, (t, _) in w.params.items())
    return source, state


def export_torch(net, py_path, pt_path, provenance=""):
    source, state = generate_torch(net, provenance, os.path.basename(pt_path))
    compile(source, py_path, "exec")            # never write a file that does not parse
    _atomic_write(py_path, source.encode())
    tmp = pt_path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, pt_path)
    return source, state


def _atomic_write(path, data):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- ONNX
class NetModule(torch.nn.Module):
    """The TEST-phase Net as a module of its input blobs, returning its outputs (for tracing)."""

    def __init__(self, net, inputs, outputs):
        super().__init__()
        self.net = net
        self.input_names, self.output_names = list(inputs), list(outputs)
        # layers whose output depends on shapes only (PriorBox) are constants: as buffers they
        # trace (the tracer refuses an output computed without data dependence)
        self.constants = {}
        for li, kind in enumerate(net.layer_types):
            if kind == "PriorBox":
                layer = net.layer_modules[li]
                with torch.no_grad():
                    out = layer(*[torch.zeros(s) for s in layer.bottom_shapes])
                self.register_buffer("constant_%d" % li, out)
                self.constants[li] = "constant_%d" % li

    def forward(self, *xs):
        net = self.net
        data = dict(zip(self.input_names, xs))
        for li, layer in enumerate(net.layer_modules):
            if getattr(layer, "is_data", False) or net.layer_types[li] in INPUT_TYPES:
                continue
            if li in self.constants:
                data[net.top_names[li][0]] = getattr(self, self.constants[li])
                continue
            bottoms = [data[b] for b in net.bottom_names[li]]
            tops = _onnx_pooling(layer, bottoms[0]) if net.layer_types[li] == "Pooling" \
                else None
            if tops is None:
                tops = layer(*bottoms)
            if isinstance(tops, torch.Tensor):
                tops = (tops,)
            for t, v in zip(net.top_names[li], tops):
                data[t] = v
        out = tuple(data[o] for o in self.output_names)
        return out[0] if len(out) == 1 else out


def _onnx_pooling(layer, x):
    """Pooling for the ONNX exporter, or None when the layer's own forward exports faithfully.

    Caffe's AVE windows clipped by padding (and TEST-time STOCHASTIC pooling) are window sums
    divided by per-position sizes; the layer takes the sums with ``divisor_override=1``, which
    the ONNX exporter silently drops. Here the sums are averages times the window size."""
    from layers.vision import AVE, MAX
    import torch.nn.functional as F
    p = layer.plan
    if layer.method == MAX or layer.want_mask or (x.shape[2], x.shape[3]) != (p.h, p.w):
        return None
    if layer.method == AVE and (p.global_pool or p.native_ceil is not None):
        return None
    k, s = (p.kh, p.kw), (p.sh, p.sw)
    area = float(p.kh * p.kw)
    xp = p.padded(x, 0.0)
    sums = F.avg_pool2d(xp, k, s) * area
    if layer.method == AVE:
        return sums / p.divisor(x.device, x.dtype)
    squares = F.avg_pool2d(xp * xp, k, s) * area
    return squares / (sums + FLT_MIN)


def export_onnx(net, path, opset=None):
    """``torch.onnx.export`` of the TEST-phase ``net`` (fixed input shapes) to ``path``."""
    inputs, outputs = _check_net(net)
    try:
        import onnx
    except ImportError:
        raise CaffeError("--format onnx needs the onnx package, which is not installed: "
                         "pip install 'trainer[onnx]' (or pip install onnx)")
    module = NetModule(net, inputs, outputs).eval()
    args = tuple(torch.zeros(tuple(net.blob_shapes[t]), dtype=torch.float32) for t in inputs)
    kwargs = dict(input_names=inputs, output_names=outputs, do_constant_folding=True)
    if opset:
        kwargs["opset_version"] = int(opset)
    tmp = path + ".tmp"
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            try:      # the TorchScript exporter needs no onnxscript; torch >= 2.9 defaults off it
                torch.onnx.export(module, args, tmp, dynamo=False, **kwargs)
            except TypeError:       # torch < 2.5 has no `dynamo` argument
                torch.onnx.export(module, args, tmp, **kwargs)
        onnx.checker.check_model(tmp)
    except CaffeError:
        raise
    except Exception as exc:    # the exporter's own errors: one line, with what failed
        if os.path.exists(tmp):
            os.remove(tmp)
        text = str(exc).strip().splitlines()
        raise CaffeError("ONNX export of %s failed: %s: %s" % (
            net.name or "the net", type(exc).__name__, text[0] if text else ""))
    os.replace(tmp, path)
    return path
