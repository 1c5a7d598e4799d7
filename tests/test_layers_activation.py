"""Unit tests of layers/activation.py against numpy re-implementations of Caffe's formulas.

Forward values are compared with Caffe's Forward_cpu written in numpy; gradients with Caffe's
Backward_cpu (for a random top diff), and Caffe's set-up checks with their messages and tags.
"""
import numpy as np
import pytest
import torch

from converters import caffe_pb2
from converters.errors import CaffeError
from converters.prototxt import parse_text
from layers import registry

RNG = np.random.RandomState(7)


def make(text, shapes, phase="TRAIN"):
    lp = parse_text(text, caffe_pb2.LayerParameter())
    if not len(lp.bottom):
        lp.bottom.append("x")
    if not len(lp.top):
        lp.top.append("y")
    cls = registry.get(lp.type)
    layer = cls(lp, shapes, phase)
    layer.check_blob_counts(len(lp.bottom), len(lp.top))
    return layer


def run(layer, x, dy=None):
    """Forward (float64) and the bottom gradient for top diff ``dy`` (random if None)."""
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    y = layer(xt)
    if dy is None:
        dy = RNG.randn(*y.shape)
    if y.requires_grad:
        y.backward(torch.tensor(dy, dtype=torch.float64))
    grad = None if xt.grad is None else xt.grad.numpy()
    return y.detach().numpy(), grad, dy


X = RNG.randn(2, 3, 4, 5)


def test_registered_types_and_aliases():
    for name in ("ReLU", "RELU", "PReLU", "Sigmoid", "SIGMOID", "TanH", "TANH", "ELU", "Power",
                 "POWER", "Exp", "EXP", "Log", "AbsVal", "ABSVAL", "BNLL", "Clip", "Swish",
                 "Threshold", "THRESHOLD", "Softmax", "SOFTMAX"):
        assert registry.get(name) is not None


def test_relu_and_leaky():
    y, g, dy = run(make('type: "ReLU"', [X.shape]), X)
    np.testing.assert_allclose(y, np.maximum(X, 0))
    np.testing.assert_allclose(g, dy * (X > 0))
    y, g, dy = run(make('type: "ReLU" relu_param { negative_slope: 0.1 }', [X.shape]), X)
    slope = np.float32(0.1)
    np.testing.assert_allclose(y, np.maximum(X, 0) + slope * np.minimum(X, 0))
    np.testing.assert_allclose(g, dy * ((X > 0) + slope * (X <= 0)))


def test_relu_gradient_at_zero_is_slope():
    x = np.zeros((1, 2))
    _, g, _ = run(make('type: "ReLU" relu_param { negative_slope: 0.25 }', [x.shape]), x,
                  np.ones((1, 2)))
    np.testing.assert_allclose(g, 0.25)


def test_prelu_per_channel_default_filler_and_gradients():
    layer = make('type: "PReLU"', [X.shape])
    assert len(layer.blobs) == 1 and tuple(layer.blobs[0].shape) == (3,)
    np.testing.assert_allclose(layer.blobs[0].detach().numpy(), 0.25)
    with torch.no_grad():
        layer.blobs[0].copy_(torch.tensor([0.1, 0.2, 0.3]))
    a = np.float32([0.1, 0.2, 0.3])[None, :, None, None]
    y, g, dy = run(layer, X)
    np.testing.assert_allclose(y, np.maximum(X, 0) + a * np.minimum(X, 0), rtol=1e-6)
    np.testing.assert_allclose(g, dy * ((X > 0) + a * (X <= 0)), rtol=1e-6)
    slope_grad = (dy * X * (X <= 0)).sum(axis=(0, 2, 3))
    np.testing.assert_allclose(layer.blobs[0].grad.numpy(), slope_grad, rtol=1e-5)


def test_prelu_channel_shared_is_a_0_axis_blob():
    layer = make('type: "PReLU" prelu_param { channel_shared: true filler { type: "constant" '
                 'value: 0.3 } }', [X.shape])
    assert tuple(layer.blobs[0].shape) == ()
    y, _, _ = run(layer, X)
    np.testing.assert_allclose(y, np.where(X > 0, X, np.float32(0.3) * X), rtol=1e-6)


def test_prelu_needs_two_axes():
    with pytest.raises(CaffeError) as err:
        make('type: "PReLU"', [(5,)])
    assert "Number of axes of bottom blob must be >=2." in str(err.value)
    assert err.value.where == "prelu_layer.cpp:14"


def test_prelu_refuses_more_than_4_axes_like_caffe_legacy_accessors():
    with pytest.raises(CaffeError) as err:
        make('type: "PReLU"', [(1, 2, 3, 4, 5)])
    assert "Cannot use legacy accessors on Blobs with > 4 axes." in str(err.value)


def test_sigmoid_tanh():
    y, g, dy = run(make('type: "Sigmoid"', [X.shape]), X)
    s = 1 / (1 + np.exp(-X))
    np.testing.assert_allclose(y, s)
    np.testing.assert_allclose(g, dy * s * (1 - s))
    y, g, dy = run(make('type: "TanH"', [X.shape]), X)
    np.testing.assert_allclose(y, np.tanh(X))
    np.testing.assert_allclose(g, dy * (1 - np.tanh(X) ** 2))


@pytest.mark.parametrize("alpha", [None, 0.7])
def test_elu(alpha):
    text = 'type: "ELU"' + ('' if alpha is None else ' elu_param { alpha: %g }' % alpha)
    a = 1.0 if alpha is None else float(np.float32(alpha))
    y, g, dy = run(make(text, [X.shape]), X)
    ref = np.maximum(X, 0) + a * (np.exp(np.minimum(X, 0)) - 1)
    np.testing.assert_allclose(y, ref)
    np.testing.assert_allclose(g, dy * np.where(X > 0, 1, ref + a))


@pytest.mark.parametrize("power,scale,shift", [(2, 0.5, 1), (0.5, 1.5, 0.2), (1, 2, -1),
                                               (3, 1, 0), (-0.75, 0.5, 1), (1.7, 1, 0.3)])
def test_power_general(power, scale, shift):
    x = RNG.uniform(0.1, 2.0, size=(2, 3, 4))
    layer = make('type: "Power" power_param { power: %r scale: %r shift: %r }'
                 % (power, scale, shift), [x.shape])
    p, s, t = (float(np.float32(v)) for v in (power, scale, shift))
    y, g, dy = run(layer, x)
    base = t + s * x
    np.testing.assert_allclose(y, base ** p, rtol=1e-12)
    # Caffe: diff = diff_scale * y / (shift + scale * x)
    np.testing.assert_allclose(g, dy * p * s * base ** p / base, rtol=1e-10)


def test_power_scale_zero_is_constant_with_zero_gradient():
    x = X.copy()
    x[0, 0, 0, 0] = np.inf
    y, g, _ = run(make('type: "Power" power_param { power: 3 scale: 0 shift: 2 }', [x.shape]), x)
    np.testing.assert_allclose(y, 8.0)
    np.testing.assert_array_equal(g, 0.0)
    y, g, _ = run(make('type: "Power" power_param { power: 0 scale: 3 shift: 2 }', [x.shape]), x)
    np.testing.assert_allclose(y, 1.0)
    np.testing.assert_array_equal(g, 0.0)


def test_power_identity_returns_a_new_tensor():
    layer = make('type: "Power"', [X.shape])
    xt = torch.tensor(X, requires_grad=True)
    y = layer(xt)
    assert y is not xt
    np.testing.assert_array_equal(y.detach().numpy(), X)


def test_exp_base_e_with_scale_shift_and_base_2():
    y, g, dy = run(make('type: "Exp" exp_param { base: -1 scale: 0.5 shift: 0.1 }', [X.shape]), X)
    ref = np.exp(float(np.float32(0.1)) + float(np.float32(0.5)) * X)
    np.testing.assert_allclose(y, ref, rtol=1e-6)
    np.testing.assert_allclose(g, dy * ref * 0.5, rtol=1e-6)
    y, g, dy = run(make('type: "Exp" exp_param { base: 2 }', [X.shape]), X)
    np.testing.assert_allclose(y, 2.0 ** X, rtol=1e-6)
    np.testing.assert_allclose(g, dy * 2.0 ** X * np.log(2), rtol=1e-6)


def test_exp_rejects_non_positive_base():
    with pytest.raises(CaffeError) as err:
        make('type: "Exp" exp_param { base: -2 }', [X.shape])
    assert "base must be strictly positive." in str(err.value)
    assert "(-2 vs. 0)" in str(err.value)
    assert err.value.where == "exp_layer.cpp:14"


def test_log_variants():
    p = RNG.uniform(0.1, 2.0, size=(2, 3, 4, 5))
    y, g, dy = run(make('type: "Log"', [p.shape]), p)
    np.testing.assert_allclose(y, np.log(p))
    np.testing.assert_allclose(g, dy / p)
    y, g, dy = run(make('type: "Log" log_param { base: 10 scale: 2 shift: 0.5 }', [p.shape]), p)
    np.testing.assert_allclose(y, np.log10(0.5 + 2 * p), rtol=1e-6)
    np.testing.assert_allclose(g, dy * 2 / (np.log(10) * (0.5 + 2 * p)), rtol=1e-6)


def test_log_checks():
    with pytest.raises(CaffeError) as err:
        make('type: "Log" log_param { base: 0 }', [X.shape])
    assert err.value.where == "log_layer.cpp:14"
    with pytest.raises(CaffeError) as err:
        make('type: "Log" log_param { base: 1 }', [X.shape])
    assert "Inf result: 1/log(base) = 1/log(1) = inf" in str(err.value)
    assert err.value.where == "log_layer.cpp:25"


def test_absval_and_its_in_place_check():
    y, g, dy = run(make('type: "AbsVal"', [X.shape]), X)
    np.testing.assert_allclose(y, np.abs(X))
    np.testing.assert_allclose(g, dy * np.sign(X))
    _, g, _ = run(make('type: "AbsVal"', [(1, 1)]), np.zeros((1, 1)), np.ones((1, 1)))
    assert g[0, 0] == 0
    with pytest.raises(CaffeError) as err:
        make('type: "AbsVal" bottom: "a" top: "a"', [X.shape])
    assert "AbsVal Layer does not allow in-place computation." in str(err.value)


def test_bnll_matches_caffe_stable_form_including_large_values():
    x = np.concatenate([X.ravel(), [-80, -30, 0, 19.5, 25, 49, 60, 200]]).astype(np.float32)
    layer = make('type: "BNLL"', [x.shape])
    xt = torch.tensor(x, requires_grad=True)
    y = layer(xt)
    y.backward(torch.ones_like(y))
    x64 = x.astype(np.float64)
    ref = np.where(x64 > 0, x64 + np.log1p(np.exp(-x64)), np.log1p(np.exp(x64)))
    e = np.exp(np.minimum(x64, 50.0))
    np.testing.assert_allclose(y.detach().numpy(), ref, rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(xt.grad.numpy(), e / (e + 1), rtol=1e-6, atol=1e-30)


def test_clip():
    y, g, dy = run(make('type: "Clip" clip_param { min: -0.5 max: 0.8 }', [X.shape]), X)
    lo, hi = float(np.float32(-0.5)), float(np.float32(0.8))
    np.testing.assert_allclose(y, np.clip(X, lo, hi))
    np.testing.assert_allclose(g, dy * ((X >= lo) & (X <= hi)))


def test_clip_with_min_above_max_follows_caffe_formula():
    y, g, _ = run(make('type: "Clip" clip_param { min: 1 max: -1 }', [X.shape]), X)
    np.testing.assert_allclose(y, 1.0)
    np.testing.assert_array_equal(g, 0.0)


@pytest.mark.parametrize("beta", [1.0, 1.5])
def test_swish(beta):
    y, g, dy = run(make('type: "Swish" swish_param { beta: %g }' % beta, [X.shape]), X)
    s = 1 / (1 + np.exp(-beta * X))
    np.testing.assert_allclose(y, X * s, rtol=1e-6)
    top = X * s
    np.testing.assert_allclose(g, dy * (beta * top + s * (1 - beta * top)), rtol=1e-6)


def test_threshold_has_no_gradient():
    y, g, _ = run(make('type: "Threshold" threshold_param { threshold: 0.3 }', [X.shape]), X)
    np.testing.assert_array_equal(y, (X > np.float32(0.3)).astype(np.float64))
    assert g is None


@pytest.mark.parametrize("axis", [1, 2, -1, 0])
def test_softmax_axes(axis):
    y, g, dy = run(make('type: "Softmax" softmax_param { axis: %d }' % axis, [X.shape]), X)
    e = np.exp(X - X.max(axis=axis, keepdims=True))
    ref = e / e.sum(axis=axis, keepdims=True)
    np.testing.assert_allclose(y, ref)
    np.testing.assert_allclose(g, (dy - (dy * ref).sum(axis=axis, keepdims=True)) * ref)


def test_softmax_is_stable_for_large_inputs():
    x = np.array([[1000.0, 1001.0, 999.0]], dtype=np.float32)
    y = make('type: "Softmax"', [x.shape])(torch.tensor(x))
    assert torch.isfinite(y).all()
    np.testing.assert_allclose(y.sum().item(), 1.0, rtol=1e-6)


def test_softmax_axis_out_of_range():
    with pytest.raises(CaffeError) as err:
        make('type: "Softmax" softmax_param { axis: 4 }', [X.shape])
    assert "out of range" in str(err.value)


def test_neuron_layers_keep_shape_and_take_one_bottom():
    layer = make('type: "TanH"', [(2, 7)])
    assert layer.top_shapes() == [(2, 7)]
    with pytest.raises(CaffeError):
        make('type: "TanH" bottom: "a" bottom: "b"', [(2, 7), (2, 7)])


def test_float32_forward_keeps_dtype():
    x = torch.randn(2, 3, 4, 5)
    for text in ('type: "ReLU"', 'type: "PReLU"', 'type: "Power" power_param { power: 2 }',
                 'type: "Softmax"', 'type: "Swish" swish_param { beta: 2 }'):
        assert make(text, [tuple(x.shape)])(x).dtype == torch.float32
