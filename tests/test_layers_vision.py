"""Unit tests of layers/vision.py: shapes, Caffe's checks, and numbers against small numpy
re-implementations of Caffe's loops."""
import itertools
import math

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from converters import caffe_pb2
from converters.errors import CaffeError
from layers import registry


def make(type_name, text="", shapes=((2, 3, 5, 5),), ntop=1, phase="TRAIN", bottoms=None):
    lp = caffe_pb2.LayerParameter()
    text_format.Parse(text, lp)
    lp.name = "l"
    lp.type = type_name
    names = bottoms or ["b%d" % i for i in range(len(shapes))]
    lp.bottom.extend(names)
    lp.top.extend(["t%d" % i for i in range(ntop)])
    return registry.get(type_name)(lp, [tuple(s) for s in shapes], phase)


def conv(text):
    return "convolution_param { %s }" % text


def fails(match, *args, **kwargs):
    with pytest.raises(CaffeError) as info:
        make(*args, **kwargs)
    assert match in str(info.value), str(info.value)
    return info.value


def rand(*shape, seed=0):
    return torch.from_numpy(np.random.RandomState(seed).randn(*shape).astype(np.float32))


# ------------------------------------------------------------------ numpy references
def np_conv2d(x, w, b, stride, pad, dil, group):
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    oh = (h + 2 * pad[0] - (dil[0] * (kh - 1) + 1)) // stride[0] + 1
    ow = (wd + 2 * pad[1] - (dil[1] * (kw - 1) + 1)) // stride[1] + 1
    xp = np.zeros((n, c, h + 2 * pad[0], wd + 2 * pad[1]), np.float64)
    xp[:, :, pad[0]:pad[0] + h, pad[1]:pad[1] + wd] = x
    out = np.zeros((n, o, oh, ow))
    og = o // group
    for g in range(group):
        for oc in range(g * og, (g + 1) * og):
            for i, j in itertools.product(range(oh), range(ow)):
                patch = xp[:, g * cg:(g + 1) * cg,
                           i * stride[0]:i * stride[0] + dil[0] * (kh - 1) + 1:dil[0],
                           j * stride[1]:j * stride[1] + dil[1] * (kw - 1) + 1:dil[1]]
                out[:, oc, i, j] = (patch * w[oc]).sum((1, 2, 3))
    if b is not None:
        out += b[None, :, None, None]
    return out


def np_deconv2d(x, w, b, stride, pad, dil, group):
    """Scatter form: each input value adds its kernel into the (padded) output."""
    n, c, h, wd = x.shape
    _, og, kh, kw = w.shape
    o = og * group
    full_h = stride * (h - 1) + dil * (kh - 1) + 1
    full_w = stride * (wd - 1) + dil * (kw - 1) + 1
    out = np.zeros((n, o, full_h, full_w))
    cg = c // group
    for ci in range(c):
        g = ci // cg
        for i, j in itertools.product(range(h), range(wd)):
            for a, bb in itertools.product(range(kh), range(kw)):
                out[:, g * og:(g + 1) * og, i * stride + a * dil, j * stride + bb * dil] += (
                    x[:, ci, i, j][:, None] * w[ci, :, a, bb][None, :])
    out = out[:, :, pad:full_h - pad, pad:full_w - pad]
    if b is not None:
        out = out + b[None, :, None, None]
    return out


def np_pool(x, method, k, s, p, ceil=True, global_pool=False):
    """Caffe's PoolingLayer Forward_cpu, loop by loop; returns (top, mask)."""
    n, c, h, w = x.shape
    kh, kw = (h, w) if global_pool else k
    sh, sw = s
    ph, pw = p
    rnd = math.ceil if ceil else math.floor
    oh = int(rnd(np.float32(h + 2 * ph - kh) / np.float32(sh))) + 1
    ow = int(rnd(np.float32(w + 2 * pw - kw) / np.float32(sw))) + 1
    if ph or pw:
        if (oh - 1) * sh >= h + ph:
            oh -= 1
        if (ow - 1) * sw >= w + pw:
            ow -= 1
    top = np.zeros((n, c, oh, ow), np.float64)
    mask = -np.ones((n, c, oh, ow), np.int64)
    for i, j in itertools.product(range(oh), range(ow)):
        hs, ws = i * sh - ph, j * sw - pw
        if method == "MAX":
            he, we = min(hs + kh, h), min(ws + kw, w)
            hs, ws = max(hs, 0), max(ws, 0)
            best = np.full((n, c), -np.finfo(np.float32).max)
            for y, z in itertools.product(range(hs, he), range(ws, we)):
                better = x[:, :, y, z] > best
                best = np.where(better, x[:, :, y, z], best)
                mask[:, :, i, j] = np.where(better, y * w + z, mask[:, :, i, j])
            top[:, :, i, j] = best
        else:
            he, we = min(hs + kh, h + ph), min(ws + kw, w + pw)
            size = (he - hs) * (we - ws)
            hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, h), min(we, w)
            top[:, :, i, j] = x[:, :, hs:he, ws:we].sum((2, 3)) / size
    return top, mask


def np_pool_backward(x, top_diff, method, k, s, p, mask):
    n, c, h, w = x.shape
    kh, kw = k
    sh, sw = s
    ph, pw = p
    oh, ow = top_diff.shape[2:]
    diff = np.zeros((n, c, h * w))
    for i, j in itertools.product(range(oh), range(ow)):
        if method == "MAX":
            for a, b in itertools.product(range(n), range(c)):
                diff[a, b, mask[a, b, i, j]] += top_diff[a, b, i, j]
        else:
            hs, ws = i * sh - ph, j * sw - pw
            he, we = min(hs + kh, h + ph), min(ws + kw, w + pw)
            size = (he - hs) * (we - ws)
            hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, h), min(we, w)
            d = diff.reshape(n, c, h, w)
            d[:, :, hs:he, ws:we] += (top_diff[:, :, i, j] / size)[:, :, None, None]
    return diff.reshape(n, c, h, w)


# ------------------------------------------------------------------ Convolution
@pytest.mark.parametrize("text,shape,wshape,tshape", [
    ("num_output: 6 kernel_size: 3 stride: 2 pad: 1 group: 3", (2, 3, 9, 9), (6, 1, 3, 3),
     (2, 6, 5, 5)),
    ("num_output: 4 kernel_size: 3 dilation: 2 pad: 2", (2, 3, 9, 9), (4, 3, 3, 3), (2, 4, 9, 9)),
    ("num_output: 2 kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2 pad_h: 0 pad_w: 1 "
     "bias_term: false", (1, 3, 7, 8), (2, 3, 2, 3), (1, 2, 6, 4)),
    ("num_output: 2 kernel_size: 2 kernel_size: 3 stride: 1 stride: 2 pad: 1 pad: 0",
     (1, 3, 7, 8), (2, 3, 2, 3), (1, 2, 8, 3)),
    ("num_output: 5 kernel_size: 3", (2, 3, 11), (5, 3, 3), (2, 5, 9)),
    ("num_output: 5 kernel_size: 3 pad: 1 stride: 2", (1, 2, 5, 6, 7), (5, 2, 3, 3, 3),
     (1, 5, 3, 3, 4)),
    ("num_output: 4 kernel_size: 3 axis: 2", (2, 3, 5, 6, 6), (4, 5, 3, 3), (2, 3, 4, 4, 4)),
    ("num_output: 4 axis: -1", (2, 3, 5), (4, 5), (2, 3, 4)),
])
def test_convolution_shapes(text, shape, wshape, tshape):
    layer = make("Convolution", conv(text + " weight_filler { type: 'gaussian' }"), [shape])
    assert tuple(layer.blobs[0].shape) == wshape
    assert layer.top_shapes() == [tshape]
    out = layer(rand(*shape))
    assert tuple(out.shape) == tshape


@pytest.mark.parametrize("text", [
    "num_output: 6 kernel_size: 3 stride: 2 pad: 1 group: 3",
    "num_output: 4 kernel_size: 3 dilation: 2 pad: 2 stride: 2",
    "num_output: 2 kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2 pad_h: 0 pad_w: 1",
    "num_output: 3 kernel_size: 1 group: 3",
])
def test_convolution_numbers(text):
    layer = make("Convolution", conv(text + " weight_filler { type: 'gaussian' } "
                                     "bias_filler { type: 'uniform' }"), [(2, 3, 7, 8)])
    x = rand(2, 3, 7, 8)
    geom = layer.geom
    ref = np_conv2d(x.numpy(), layer.blobs[0].detach().numpy(), layer.blobs[1].detach().numpy(),
                    geom.stride, geom.pad, geom.dilation, layer.group)
    np.testing.assert_allclose(layer(x).detach().numpy(), ref, rtol=1e-4, atol=1e-5)


def test_convolution_axis_and_nospatial_match_2d():
    x = rand(2, 3, 4, 5)
    base = make("Convolution", conv("num_output: 2 kernel_size: 1 weight_filler { type: "
                                    "'gaussian' } bias_filler { type: 'gaussian' }"),
                [(2, 3, 4, 5)])
    # 0 spatial axes: channels last, a per-position inner product with weights (O, C)
    flat = make("Convolution", conv("num_output: 2 axis: -1"), [(2, 4, 5, 3)])
    assert tuple(flat.blobs[0].shape) == (2, 3)
    with torch.no_grad():
        flat.blobs[0].copy_(base.blobs[0].view(2, 3))
        flat.blobs[1].copy_(base.blobs[1])
    ours = flat(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(ours, base(x))


def test_convolution_multiple_bottoms_share_weights():
    layer = make("Convolution", conv("num_output: 2 kernel_size: 3 "
                                     "weight_filler { type: 'gaussian' }"),
                 [(1, 3, 5, 5), (1, 3, 5, 5)], ntop=2)
    a, b = rand(1, 3, 5, 5, seed=1), rand(1, 3, 5, 5, seed=2)
    ta, tb = layer(a, b)
    torch.testing.assert_close(tb, layer(b, a)[0])
    k3 = conv("num_output: 2 kernel_size: 3")
    fails("All inputs must have the same shape.", "Convolution", k3,
          [(1, 3, 5, 5), (1, 3, 6, 5)], ntop=2)
    fails("one top blob as output for each bottom blob", "Convolution", k3,
          [(1, 3, 5, 5), (1, 3, 5, 5)], ntop=1)


def test_convolution_checks():
    s4 = [(1, 3, 5, 5)]
    err = fails("Number of output should be multiples of group.", "Convolution",
                conv("num_output: 5 kernel_size: 3 group: 3"), [(1, 6, 5, 5)])
    assert err.where == "base_conv_layer.cpp:122"
    assert "num_output_ % group_ == 0 (2 vs. 0)" in str(err)
    fails("channels_ % group_ == 0", "Convolution", conv("num_output: 6 kernel_size: 3 group: 4"),
          [(1, 6, 5, 5)])
    fails("Either kernel_size or kernel_h/w should be specified; not both.", "Convolution",
          conv("num_output: 2 kernel_size: 3 kernel_h: 2 kernel_w: 2"), s4)
    fails("kernel_h & kernel_w can only be used for 2D convolution.", "Convolution",
          conv("num_output: 2 kernel_h: 2 kernel_w: 2"), [(1, 3, 5, 5, 5)])
    fails("kernel_size must be specified once, or once per spatial dimension (kernel_size "
          "specified 3 times; 2 spatial dims).", "Convolution",
          conv("num_output: 2 kernel_size: 1 kernel_size: 2 kernel_size: 3"), s4)
    fails("kernel_size specified 0 times", "Convolution", conv("num_output: 2"), s4)
    fails("Filter dimensions must be nonzero.", "Convolution", conv("num_output: 2 kernel_h: 2"),
          s4)
    fails("Stride dimensions must be nonzero.", "Convolution",
          conv("num_output: 2 kernel_size: 2 stride: 0"), s4)
    fails("Either pad or pad_h/w should be specified; not both.", "Convolution",
          conv("num_output: 2 kernel_size: 2 pad: 1 pad_h: 1"), s4)
    fails("dilation must be specified once", "Convolution",
          conv("num_output: 2 kernel_size: 2 dilation: 1 dilation: 1 dilation: 1"), s4)
    fails("num_output_ > 0", "Convolution", conv("kernel_size: 2"), s4)
    fails("is not positive", "Convolution", conv("num_output: 2 kernel_size: 7"), s4)
    fails("takes at least 1 bottom", "Convolution", conv("num_output: 2 kernel_size: 1"), [])


# ------------------------------------------------------------------ Deconvolution
@pytest.mark.parametrize("text,out", [
    ("num_output: 3 kernel_size: 4 stride: 2 pad: 1", 10),
    ("num_output: 4 kernel_size: 3 stride: 1 group: 2", 7),
    ("num_output: 2 kernel_size: 3 stride: 2 pad: 2 dilation: 2", 9),
    ("num_output: 2 kernel_size: 1 stride: 3 pad: 1", 11),
])
def test_deconvolution(text, out):
    layer = make("Deconvolution", conv(text + " weight_filler { type: 'gaussian' } "
                                       "bias_filler { type: 'uniform' }"), [(2, 4, 5, 5)])
    g = layer.geom
    assert tuple(layer.blobs[0].shape) == (4, layer.num_output // layer.group) + tuple(g.kernel)
    assert layer.top_shapes() == [(2, layer.num_output, out, out)]
    x = rand(2, 4, 5, 5)
    ref = np_deconv2d(x.numpy(), layer.blobs[0].detach().numpy(), layer.blobs[1].detach().numpy(),
                      g.stride[0], g.pad[0], g.dilation[0], layer.group)
    np.testing.assert_allclose(layer(x).detach().numpy(), ref, rtol=1e-4, atol=1e-5)


def test_deconvolution_weight_layout_and_checks():
    layer = make("Deconvolution", conv("num_output: 6 kernel_size: 2 group: 2"), [(1, 4, 3, 3)])
    assert tuple(layer.blobs[0].shape) == (4, 3, 2, 2)
    fails("Number of output should be multiples of group.", "Deconvolution",
          conv("num_output: 3 kernel_size: 2 group: 2"), [(1, 4, 3, 3)])
    fails("is not positive", "Deconvolution", conv("num_output: 2 kernel_size: 1 pad: 3"),
          [(1, 4, 2, 2)])


# ------------------------------------------------------------------ Pooling
POOL_CASES = [
    # (pool text, input hw)
    ("kernel_size: 2 stride: 2", (9, 9)),                       # ceil: last window hangs over
    ("kernel_size: 2 stride: 2 round_mode: FLOOR", (9, 9)),
    ("kernel_size: 3 stride: 2 pad: 1", (9, 9)),
    ("kernel_size: 2 stride: 2 pad: 1", (9, 9)),                # pad clipping rule
    ("kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 3 pad_h: 1 pad_w: 0", (9, 8)),
    ("kernel_size: 3 stride: 1 pad: 2", (6, 7)),                # pad > kernel/2: torch refuses
    ("kernel_size: 1 stride: 3", (5, 5)),                       # stride > kernel, empty windows
    ("kernel_size: 4 stride: 3 pad: 3 round_mode: FLOOR", (7, 6)),
    ("kernel_size: 6 stride: 2", (5, 6)),                       # kernel larger than the input
    ("kernel_h: 2 kernel_w: 3 stride: 2 pad_h: 1 pad_w: 0", (6, 6)),  # clip rule on both axes
    ("kernel_size: 3 stride: 3 pad: 2", (7, 7)),
]


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("text,hw", POOL_CASES)
def test_pooling_matches_caffe_loops(method, text, hw):
    shape = (2, 3) + hw
    layer = make("Pooling", "pooling_param { pool: %s %s }" % (method, text), [shape],
                 ntop=2 if method == "MAX" else 1)
    p = layer.param.pooling_param
    x = rand(*shape, seed=3)
    x.requires_grad_(True)
    out = layer(x)
    top = out[0] if method == "MAX" else out
    ref, mask = np_pool(x.detach().numpy().astype(np.float64), method, layer.kernel, layer.stride,
                        layer.pad, ceil=p.round_mode == 0)
    assert layer.top_shapes()[0] == ref.shape
    np.testing.assert_allclose(top.detach().numpy(), ref, rtol=1e-5, atol=1e-6)
    if method == "MAX":
        valid = mask >= 0
        np.testing.assert_array_equal(out[1].numpy()[valid], mask[valid].astype(np.float32))
    grad = rand(*ref.shape, seed=4)
    top.backward(grad)
    if method == "MAX" and not (mask >= 0).all():
        return   # Caffe writes through index -1 for empty windows (undefined); skip the gradient
    ref_diff = np_pool_backward(x.detach().numpy(), grad.numpy().astype(np.float64), method,
                                layer.kernel, layer.stride, layer.pad, mask)
    np.testing.assert_allclose(x.grad.numpy(), ref_diff, rtol=1e-5, atol=1e-6)


def test_pooling_max_ties_go_to_first_index():
    layer = make("Pooling", "pooling_param { pool: MAX kernel_size: 2 stride: 2 pad: 1 }",
                 [(1, 1, 3, 3)])
    x = torch.ones(1, 1, 3, 3, requires_grad=True)
    layer(x).sum().backward()
    expected = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 0]], np.float32)
    np.testing.assert_array_equal(x.grad[0, 0].numpy(), expected)


@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_global_pooling(method):
    layer = make("Pooling", "pooling_param { pool: %s global_pooling: true }" % method,
                 [(2, 3, 4, 5)])
    x = rand(2, 3, 4, 5)
    assert layer.top_shapes() == [(2, 3, 1, 1)]
    ref = x.amax((2, 3), keepdim=True) if method == "MAX" else x.mean((2, 3), keepdim=True)
    torch.testing.assert_close(layer(x), ref)


def test_pooling_checks():
    fails("Filter size is kernel_size OR kernel_h and kernel_w; not both", "Pooling",
          "pooling_param { kernel_size: 2 kernel_h: 2 kernel_w: 2 }")
    # Caffe's first check already catches a lone kernel_h (its second check is unreachable)
    err = fails("Filter size is kernel_size OR kernel_h and kernel_w; not both", "Pooling",
                "pooling_param { kernel_h: 2 }")
    assert err.where == "pooling_layer.cpp:22"
    fails("pooled output size -1x1 is empty", "Pooling", "pooling_param { kernel_size: 6 }",
          [(1, 1, 4, 6)])
    fails("With Global_pooling: true Filter size cannot specified", "Pooling",
          "pooling_param { global_pooling: true kernel_size: 2 }")
    fails("With Global_pooling: true; only pad = 0 and stride = 1", "Pooling",
          "pooling_param { global_pooling: true stride: 2 }")
    fails("pad is pad OR pad_h and pad_w are required.", "Pooling",
          "pooling_param { kernel_size: 2 pad: 1 pad_h: 1 }")
    fails("Stride is stride OR stride_h and stride_w are required.", "Pooling",
          "pooling_param { kernel_size: 2 stride_h: 1 }")
    fails("Padding implemented only for average and max pooling.", "Pooling",
          "pooling_param { pool: STOCHASTIC kernel_size: 3 pad: 1 }")
    err = fails("pad_h_ < kernel_h_ (2 vs. 2)", "Pooling",
                "pooling_param { kernel_size: 2 pad: 2 }")
    assert err.where == "pooling_layer.cpp:74"
    fails("Input must have 4 axes", "Pooling", "pooling_param { kernel_size: 2 }", [(2, 3, 5)])
    fails("produces at most 1 top", "Pooling", "pooling_param { pool: AVE kernel_size: 2 }",
          ntop=2)


def test_stochastic_pooling():
    shape = (2, 3, 5, 5)
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(0)) + 0.01
    test = make("Pooling", "pooling_param { pool: STOCHASTIC kernel_size: 2 stride: 2 }",
                [shape], phase="TEST")
    xs = x.numpy().astype(np.float64)
    ref = np.zeros((2, 3, 3, 3))
    for i, j in itertools.product(range(3), range(3)):
        win = xs[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2]
        ref[:, :, i, j] = (win ** 2).sum((2, 3)) / win.sum((2, 3))
    np.testing.assert_allclose(test(x).numpy(), ref, rtol=1e-5)
    train = make("Pooling", "pooling_param { pool: STOCHASTIC kernel_size: 2 stride: 2 }",
                 [shape])
    xg = x.clone().requires_grad_(True)
    out = train(xg)
    assert out.shape == (2, 3, 3, 3)
    for i, j in itertools.product(range(3), range(3)):
        win = xs[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].reshape(2, 3, -1)
        picked = out.detach().numpy()[:, :, i, j].astype(np.float64)
        assert (np.abs(win - picked[:, :, None]) < 1e-7).any(-1).all()
    out.sum().backward()
    assert float(xg.grad.sum()) == 2 * 3 * 9       # one element per window gets the diff
    assert set(np.unique(xg.grad.numpy())) <= {0.0, 1.0}
    # sampling frequency follows the values (window [1, 3]: the 3 is picked ~75%)
    y = torch.tensor([1.0, 3.0]).view(1, 1, 1, 2).expand(4000, 1, 1, 2).contiguous()
    layer = make("Pooling", "pooling_param { pool: STOCHASTIC kernel_h: 1 kernel_w: 2 }",
                 [(4000, 1, 1, 2)])
    frac = float((layer(y) == 3.0).float().mean())
    assert 0.70 < frac < 0.80


# ------------------------------------------------------------------ SPP
@pytest.mark.parametrize("height", [1, 2, 3])
@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_spp(height, method):
    shape = (2, 3, 7, 6)
    layer = make("SPP", "spp_param { pyramid_height: %d pool: %s }" % (height, method), [shape])
    x = rand(*shape)
    out = layer(x)
    pieces = []
    for level in range(height):
        bins = 2 ** level
        kh, kw = math.ceil(7 / bins), math.ceil(6 / bins)
        ph, pw = (kh * bins - 7 + 1) // 2, (kw * bins - 6 + 1) // 2
        ref, _ = np_pool(x.numpy().astype(np.float64), method, (kh, kw), (kh, kw), (ph, pw))
        pieces.append(ref.reshape(2, -1) if height > 1 else ref)
    ref = np.concatenate(pieces, 1) if height > 1 else pieces[0]
    assert layer.top_shapes() == [ref.shape]
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ Im2col
def np_im2col(x, k, s, p, d):
    n, c, h, w = x.shape
    oh = (h + 2 * p[0] - (d[0] * (k[0] - 1) + 1)) // s[0] + 1
    ow = (w + 2 * p[1] - (d[1] * (k[1] - 1) + 1)) // s[1] + 1
    xp = np.zeros((n, c, h + 2 * p[0], w + 2 * p[1]))
    xp[:, :, p[0]:p[0] + h, p[1]:p[1] + w] = x
    out = np.zeros((n, c, k[0], k[1], oh, ow))
    for a, b in itertools.product(range(k[0]), range(k[1])):
        out[:, :, a, b] = xp[:, :, a * d[0]:a * d[0] + s[0] * (oh - 1) + 1:s[0],
                             b * d[1]:b * d[1] + s[1] * (ow - 1) + 1:s[1]]
    return out.reshape(n, c * k[0] * k[1], oh, ow)


def test_im2col_2d():
    layer = make("Im2col", "convolution_param { kernel_h: 2 kernel_w: 3 stride: 2 pad: 1 "
                 "dilation: 2 }", [(2, 3, 7, 8)])
    x = rand(2, 3, 7, 8)
    ref = np_im2col(x.numpy(), (2, 3), (2, 2), (1, 1), (2, 2))
    assert layer.top_shapes() == [ref.shape]
    np.testing.assert_allclose(layer(x).numpy(), ref, rtol=1e-6)


def test_im2col_1d_and_3d_match_2d_layout():
    x = rand(2, 3, 9)
    layer = make("Im2col", "convolution_param { kernel_size: 3 stride: 2 pad: 1 }", [(2, 3, 9)])
    ref = np_im2col(x.numpy()[:, :, None, :], (1, 3), (1, 2), (0, 1), (1, 1))[:, :, 0]
    np.testing.assert_allclose(layer(x).numpy(), ref, rtol=1e-6)
    x3 = rand(1, 2, 3, 4, 5)
    layer3 = make("Im2col", "convolution_param { kernel_size: 1 kernel_size: 2 kernel_size: 2 }",
                  [(1, 2, 3, 4, 5)])
    out = layer3(x3)
    assert tuple(out.shape) == (1, 8, 3, 3, 4) == layer3.top_shapes()[0]
    ref = np.stack([np_im2col(x3.numpy()[:, :, z], (2, 2), (1, 1), (0, 0), (1, 1))
                    for z in range(3)], 2)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-6)
    x.requires_grad_(True)
    layer(x).sum().backward()       # col2im: each input counted once per window it lies in
    assert x.grad.numpy()[0, 0].tolist() == [1, 2, 1, 2, 1, 2, 1, 2, 1]
