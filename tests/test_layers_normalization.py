"""Unit tests of layers/normalization.py (BatchNorm, LRN, MVN) against numpy versions of Caffe's
Forward_cpu / Backward_cpu and its set-up checks."""
import numpy as np
import pytest
import torch

from converters import caffe_pb2
from converters.errors import CaffeError
from converters.prototxt import parse_text
from layers import registry

RNG = np.random.RandomState(11)
X = 2 * RNG.randn(4, 6, 5, 5) + 1


def make(text, shapes, phase="TRAIN"):
    lp = parse_text(text, caffe_pb2.LayerParameter())
    if not len(lp.bottom):
        lp.bottom.append("x")
    if not len(lp.top):
        lp.top.append("y")
    layer = registry.get(lp.type)(lp, shapes, phase)
    layer.check_blob_counts(len(lp.bottom), len(lp.top))
    return layer


def run(layer, x, dy=None):
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    y = layer(xt)
    if dy is None:
        dy = RNG.randn(*y.shape)
    y.backward(torch.tensor(dy, dtype=torch.float64))
    return y.detach().numpy(), xt.grad.numpy(), dy


def set_blobs(layer, *values):
    with torch.no_grad():
        for blob, v in zip(layer.blobs, values):
            blob.copy_(torch.as_tensor(np.asarray(v, np.float32)))


# ----------------------------------------------------------------------------- BatchNorm
def bn_train_ref(x, eps):
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean = x.mean(axis=axes)
    var = ((x - mean.reshape(shape)) ** 2).mean(axis=axes)
    y = (x - mean.reshape(shape)) / np.sqrt(var + eps).reshape(shape)
    return y, mean, var


def bn_backward_ref(y, dy, var, eps):
    """Caffe's BatchNorm Backward_cpu without global stats."""
    axes = (0,) + tuple(range(2, y.ndim))
    shape = (1, -1) + (1,) * (y.ndim - 2)
    m_dy = dy.mean(axis=axes).reshape(shape)
    m_dyy = (dy * y).mean(axis=axes).reshape(shape)
    return (dy - m_dy - m_dyy * y) / np.sqrt(var + eps).reshape(shape)


def test_batchnorm_blobs_and_param_specs():
    layer = make('type: "BatchNorm"', [X.shape])
    assert [tuple(b.shape) for b in layer.blobs] == [(6,), (6,), (1,)]
    assert all(not b.requires_grad for b in layer.blobs)
    assert all(float(b.abs().sum()) == 0 for b in layer.blobs)
    assert [p.lr_mult for p in layer.param.param] == [0, 0, 0]
    assert layer.no_param_grad
    assert layer.use_global_stats is False
    assert make('type: "BatchNorm"', [X.shape], "TEST").use_global_stats is True
    # a user-given spec with lr_mult 0 is kept, the others appended
    layer = make('type: "BatchNorm" param { lr_mult: 0 decay_mult: 0 }', [X.shape])
    assert len(layer.param.param) == 3 and layer.param.param[0].decay_mult == 0


def test_batchnorm_refuses_learnable_statistics():
    with pytest.raises(CaffeError) as err:
        make('type: "BatchNorm" param { lr_mult: 0 } param { lr_mult: 1 }', [X.shape])
    assert "Cannot configure batch normalization statistics as layer parameters." in str(err.value)
    assert "(1 vs. 0)" in str(err.value)
    assert err.value.where == "batch_norm_layer.cpp:44"


def test_batchnorm_one_axis_bottom_fails_like_caffe_reshape():
    with pytest.raises(CaffeError) as err:
        make('type: "BatchNorm"', [(5,)])
    assert "out of range" in str(err.value)


@pytest.mark.parametrize("maf,eps", [(0.999, 1e-5), (0.9, 1e-4)])
def test_batchnorm_train_forward_backward_and_update(maf, eps):
    layer = make('type: "BatchNorm" batch_norm_param { moving_average_fraction: %r eps: %r }'
                 % (maf, eps), [X.shape])
    maf, eps = float(np.float32(maf)), float(np.float32(eps))
    init_mean, init_var, init_f = RNG.randn(6), RNG.rand(6) + 0.5, [2.5]
    set_blobs(layer, init_mean, init_var, init_f)
    y, g, dy = run(layer, X)
    ref, mean, var = bn_train_ref(X, eps)
    np.testing.assert_allclose(y, ref, rtol=1e-9)
    np.testing.assert_allclose(g, bn_backward_ref(ref, dy, var, eps), rtol=1e-7, atol=1e-9)
    m = X.size // 6
    np.testing.assert_allclose(layer.blobs[2].detach().numpy(), [2.5 * maf + 1], rtol=1e-6)
    np.testing.assert_allclose(layer.blobs[0].detach().numpy(),
                               np.float32(init_mean) * maf + mean, rtol=1e-5)
    np.testing.assert_allclose(layer.blobs[1].detach().numpy(),
                               np.float32(init_var) * maf + var * m / (m - 1), rtol=1e-5)
    assert all(b.grad is None for b in layer.blobs)


def test_batchnorm_running_sums_from_zero_over_two_batches():
    layer = make('type: "BatchNorm"', [(3, 2)])
    a, b = RNG.randn(3, 2), RNG.randn(3, 2)
    layer(torch.tensor(a))
    layer(torch.tensor(b))
    maf = float(np.float32(0.999))
    np.testing.assert_allclose(layer.blobs[2].item(), maf + 1, rtol=1e-6)
    np.testing.assert_allclose(layer.blobs[0].detach().numpy(),
                               a.mean(0) * maf + b.mean(0), rtol=1e-5)
    np.testing.assert_allclose(layer.blobs[1].detach().numpy(),
                               a.var(0, ddof=1) * maf + b.var(0, ddof=1), rtol=1e-5)


def test_batchnorm_float32_update_path_over_three_batches():
    layer = make('type: "BatchNorm" batch_norm_param { moving_average_fraction: 0.9 }', [X.shape])
    batches = [RNG.randn(*X.shape).astype(np.float32) for _ in range(3)]
    mean_sum, var_sum, factor = np.zeros(6), np.zeros(6), 0.0
    maf = float(np.float32(0.9))
    m = X.size // 6
    for b in batches:
        y = layer(torch.tensor(b))
        assert y.dtype == torch.float32
        _, mean, var = bn_train_ref(b.astype(np.float64), 1e-5)
        mean_sum = mean_sum * maf + mean
        var_sum = var_sum * maf + var * m / (m - 1)
        factor = factor * maf + 1
    np.testing.assert_allclose(layer.blobs[0].detach().numpy(), mean_sum, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.blobs[1].detach().numpy(), var_sum, rtol=1e-5)
    np.testing.assert_allclose(layer.blobs[2].item(), factor, rtol=1e-6)


def test_batchnorm_shape_inference_does_not_update():
    layer = make('type: "BatchNorm"', [X.shape])
    assert layer.top_shapes() == [X.shape]
    with layer.inferring(), torch.no_grad():
        layer(torch.zeros(X.shape))
    assert all(float(b.abs().sum()) == 0 for b in layer.blobs)


def test_batchnorm_single_value_per_channel():
    layer = make('type: "BatchNorm"', [(1, 3)])
    y, g, _ = run(layer, np.array([[1.0, -2.0, 3.0]]))
    np.testing.assert_array_equal(y, 0.0)
    np.testing.assert_array_equal(g, 0.0)   # Caffe: (dy - dy - 0) / sqrt(eps)
    np.testing.assert_allclose(layer.blobs[0].detach().numpy(), [1, -2, 3])
    np.testing.assert_allclose(layer.blobs[1].detach().numpy(), 0.0)   # correction factor 1


@pytest.mark.parametrize("factor", [0.0, 3.0])
def test_batchnorm_global_stats(factor):
    layer = make('type: "BatchNorm" batch_norm_param { use_global_stats: true eps: 0.001 }',
                 [X.shape])
    mean, var = RNG.randn(6), RNG.rand(6) + 0.5
    set_blobs(layer, mean, var, [factor])
    y, g, dy = run(layer, X)
    s = 0.0 if factor == 0 else 1.0 / factor
    m = (np.float32(mean) * s).reshape(1, -1, 1, 1)
    v = (np.float32(var) * s).reshape(1, -1, 1, 1)
    eps = float(np.float32(0.001))
    np.testing.assert_allclose(y, (X - m) / np.sqrt(v + eps), rtol=1e-6)
    np.testing.assert_allclose(g, dy / np.sqrt(v + eps), rtol=1e-6)
    np.testing.assert_allclose(layer.blobs[0].detach().numpy(), np.float32(mean))  # untouched


def test_batchnorm_test_phase_uses_global_stats_and_does_not_update():
    layer = make('type: "BatchNorm"', [X.shape], "TEST")
    set_blobs(layer, np.ones(6), 2 * np.ones(6), [1.0])
    y, _, _ = run(layer, X)
    np.testing.assert_allclose(y, (X - 1) / np.sqrt(2 + float(np.float32(1e-5))), rtol=1e-6)
    assert layer.blobs[2].item() == 1.0


def test_batchnorm_channel_mismatch_at_forward():
    layer = make('type: "BatchNorm"', [X.shape])
    with pytest.raises(CaffeError) as err:
        layer(torch.zeros(2, 5, 3, 3))
    assert err.value.where == "batch_norm_layer.cpp:55"


# ----------------------------------------------------------------------------- LRN
def lrn_across_ref(x, n, alpha, beta, k):
    pad = (n - 1) // 2
    sq = np.pad(x ** 2, ((0, 0), (pad, pad), (0, 0), (0, 0)))
    scale = k + alpha / n * np.stack([sq[:, c:c + n].sum(1) for c in range(x.shape[1])], 1)
    return x * scale ** -beta


def lrn_within_ref(x, n, alpha, beta):
    """Caffe's composition: Power(2) -> AVE Pooling(k n, pad (n-1)/2, stride 1) -> Power
    (1 + alpha * s)^-beta -> product, with Caffe's AVE pooling divisor."""
    pad = (n - 1) // 2
    N, C, H, W = x.shape
    sq = x ** 2
    pooled = np.zeros_like(x)
    for ph in range(H):
        for pw in range(W):
            hs, ws = ph - pad, pw - pad
            he, we = min(hs + n, H + pad), min(ws + n, W + pad)
            size = (he - hs) * (we - ws)
            hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, H), min(we, W)
            pooled[:, :, ph, pw] = sq[:, :, hs:he, ws:we].sum(axis=(2, 3)) / size
    return x * (1 + alpha * pooled) ** -beta


def numeric_grad(f, x, dy, h=1e-6):
    g = np.zeros_like(x)
    flat, gflat = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        up = (f(x) * dy).sum()
        flat[i] = old - h
        down = (f(x) * dy).sum()
        flat[i] = old
        gflat[i] = (up - down) / (2 * h)
    return g


@pytest.mark.parametrize("text,n,alpha,beta,k", [
    ("local_size: 3 alpha: 0.5 beta: 0.75 k: 2", 3, 0.5, 0.75, 2.0),
    ("", 5, 1.0, 0.75, 1.0),
])
def test_lrn_across_channels(text, n, alpha, beta, k):
    x = RNG.randn(2, 7, 3, 3)
    layer = make('type: "LRN" lrn_param { %s }' % text, [x.shape])
    y, g, dy = run(layer, x)
    f = lambda v: lrn_across_ref(v, n, alpha, beta, k)  # noqa: E731
    np.testing.assert_allclose(y, f(x), rtol=1e-7)
    np.testing.assert_allclose(g, numeric_grad(f, x.copy(), dy), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("n", [3, 5])
def test_lrn_within_channel(n):
    x = RNG.randn(2, 3, 5, 4)
    layer = make('type: "LRN" lrn_param { local_size: %d alpha: 0.5 beta: 0.75 k: 7 '
                 'norm_region: WITHIN_CHANNEL }' % n, [x.shape])
    y, g, dy = run(layer, x)
    f = lambda v: lrn_within_ref(v, n, 0.5, 0.75)  # noqa: E731  (k is not used)
    np.testing.assert_allclose(y, f(x), rtol=1e-7)
    np.testing.assert_allclose(g, numeric_grad(f, x.copy(), dy), rtol=1e-5, atol=1e-7)


def test_lrn_checks():
    with pytest.raises(CaffeError) as err:
        make('type: "LRN" lrn_param { local_size: 4 }', [X.shape])
    assert "LRN only supports odd values for local_size" in str(err.value)
    assert err.value.where == "lrn_layer.cpp:12"
    with pytest.raises(CaffeError) as err:
        make('type: "LRN"', [(2, 3, 4)])
    assert "Input must have 4 axes, corresponding to (num, channels, height, width)" in \
        str(err.value)
    assert err.value.where == "lrn_layer.cpp:71"


# ----------------------------------------------------------------------------- MVN
def mvn_ref(x, normalize_variance=True, across=False, eps=1e-9):
    n = x.shape[0] if across else x.shape[0] * x.shape[1]
    flat = x.reshape(n, -1)
    centred = flat - flat.mean(1, keepdims=True)
    if not normalize_variance:
        return centred.reshape(x.shape), None
    std = np.sqrt((centred ** 2).mean(1, keepdims=True)) + eps
    return (centred / std).reshape(x.shape), std


def mvn_backward_ref(y, dy, std, num):
    """Caffe's MVN Backward_cpu with normalize_variance."""
    y2, dy2 = y.reshape(num, -1), dy.reshape(num, -1)
    dim = y2.shape[1]
    out = dy2 - (dy2.sum(1, keepdims=True) + y2 * (dy2 * y2).sum(1, keepdims=True)) / dim
    return (out / std).reshape(y.shape)


@pytest.mark.parametrize("text,nv,across,eps", [
    ("", True, False, 1e-9),
    ("mvn_param { normalize_variance: false }", False, False, 1e-9),
    ("mvn_param { across_channels: true eps: 1e-6 }", True, True, 1e-6),
])
def test_mvn(text, nv, across, eps):
    layer = make('type: "MVN" ' + text, [X.shape])
    eps = float(np.float32(eps))
    y, g, dy = run(layer, X)
    ref, std = mvn_ref(X, nv, across, eps)
    np.testing.assert_allclose(y, ref, rtol=1e-8, atol=1e-12)
    if nv:
        num = X.shape[0] if across else X.shape[0] * X.shape[1]
        np.testing.assert_allclose(g, mvn_backward_ref(ref, dy, std, num), rtol=1e-8, atol=1e-12)
    else:
        np.testing.assert_allclose(g, dy - dy.mean(axis=(2, 3), keepdims=True), atol=1e-12)


def test_mvn_constant_plane_gives_finite_gradient():
    x = np.ones((2, 3, 1, 1))
    y, g, _ = run(make('type: "MVN"', [x.shape]), x)
    assert np.isfinite(y).all() and np.isfinite(g).all()
    np.testing.assert_array_equal(g, 0.0)


def test_mvn_top_is_legacy_4d_and_refuses_5_axes():
    layer = make('type: "MVN"', [(3, 4)])
    assert layer.top_shapes() == [(3, 4, 1, 1)]
    assert tuple(layer(torch.randn(3, 4)).shape) == (3, 4, 1, 1)
    with pytest.raises(CaffeError) as err:
        make('type: "MVN"', [(1, 2, 3, 4, 5)])
    assert "Cannot use legacy accessors on Blobs with > 4 axes." in str(err.value)


def test_registered():
    for name in ("BatchNorm", "LRN", "MVN"):
        assert registry.get(name) is not None
