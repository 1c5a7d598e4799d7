"""Unit tests of layers/loss.py against numpy versions of Caffe's loss Forward_cpu/Backward_cpu
(the bottom diff for loss weight ``w`` is the gradient of ``w * top``) and its set-up checks."""
import numpy as np
import pytest
import torch

from converters import caffe_pb2
from converters.errors import CaffeError
from converters.prototxt import parse_text
from layers import registry

RNG = np.random.RandomState(5)
FLT_MIN = float(np.finfo(np.float32).tiny)


def make(text, shapes, phase="TRAIN", tops=1):
    lp = parse_text(text, caffe_pb2.LayerParameter())
    for i in range(len(shapes) - len(lp.bottom)):
        lp.bottom.append("b%d" % i)
    for i in range(tops - len(lp.top)):
        lp.top.append("t%d" % i)
    layer = registry.get(lp.type)(lp, shapes, phase)
    layer.check_blob_counts(len(lp.bottom), len(lp.top))
    return layer


def run(layer, *inputs, weight=1.0, grads=(0,)):
    """Loss value and gradients (for loss weight ``weight``) of the inputs listed in grads."""
    ts = [torch.tensor(v, dtype=torch.float64, requires_grad=(i in grads))
          for i, v in enumerate(inputs)]
    out = layer(*ts)
    loss = out[0] if isinstance(out, tuple) else out
    assert loss.dim() == 0
    (loss * weight).backward()
    return loss.item(), [t.grad.numpy() if t.grad is not None else None for t in ts], out


def softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def test_registered_and_flags():
    for name in ("SoftmaxWithLoss", "EuclideanLoss", "SigmoidCrossEntropyLoss", "HingeLoss",
                 "MultinomialLogisticLoss", "InfogainLoss", "ContrastiveLoss"):
        cls = registry.get(name)
        assert cls.is_loss
    assert registry.get("SoftmaxWithLoss").label_bottoms == (1,)
    assert registry.get("EuclideanLoss").label_bottoms == ()
    assert registry.get("ContrastiveLoss").label_bottoms == (2,)


# ----------------------------------------------------------------------------- SoftmaxWithLoss
def softmax_loss_ref(x, label, axis=1, ignore=None, mode="VALID"):
    prob = softmax(x, axis)
    c = x.shape[axis]
    outer = int(np.prod(x.shape[:axis]))
    inner = int(np.prod(x.shape[axis + 1:]))
    p3 = prob.reshape(outer, c, inner)
    lbl = label.reshape(outer, inner).astype(int)
    loss, count = 0.0, 0
    grad = p3.copy()
    for i in range(outer):
        for j in range(inner):
            if ignore is not None and lbl[i, j] == ignore:
                grad[i, :, j] = 0
                continue
            loss -= np.log(max(p3[i, lbl[i, j], j], FLT_MIN))
            grad[i, lbl[i, j], j] -= 1
            count += 1
    norm = {"FULL": outer * inner, "VALID": count, "BATCH_SIZE": outer, "NONE": 1}[mode]
    norm = max(1.0, norm)
    return loss / norm, grad.reshape(x.shape) / norm, prob


def test_softmax_loss_2d():
    x, label = RNG.randn(4, 5), np.array([0, 3, 4, 1], float)
    layer = make('type: "SoftmaxWithLoss"', [x.shape, label.shape])
    assert layer.top_shapes() == [()]
    loss, (g, gl), _ = run(layer, x, label, weight=1.0)
    ref, ref_g, _ = softmax_loss_ref(x, label)
    np.testing.assert_allclose(loss, ref)
    np.testing.assert_allclose(g, ref_g)
    assert gl is None


@pytest.mark.parametrize("mode,ignore", [("VALID", 255), ("BATCH_SIZE", None), ("FULL", 255),
                                         ("NONE", None)])
def test_softmax_loss_spatial_normalizations(mode, ignore):
    x = RNG.randn(2, 5, 3, 3)
    label = RNG.randint(0, 5, size=(2, 1, 3, 3)).astype(float)
    if ignore is not None:
        label[0, 0, 1, 1] = label[1, 0, 0, 2] = ignore
    text = 'type: "SoftmaxWithLoss" loss_param { normalization: %s %s }' % (
        mode, "" if ignore is None else "ignore_label: %d" % ignore)
    layer = make(text, [x.shape, label.shape])
    loss, (g, _), _ = run(layer, x, label, weight=0.5)
    ref, ref_g, _ = softmax_loss_ref(x, label, ignore=ignore, mode=mode)
    np.testing.assert_allclose(loss, ref)
    np.testing.assert_allclose(g, 0.5 * ref_g)
    if ignore is not None:
        assert np.all(g[0, :, 1, 1] == 0)


@pytest.mark.parametrize("normalize,mode", [("false", "BATCH_SIZE"), ("true", "VALID")])
def test_softmax_loss_legacy_normalize(normalize, mode):
    x = RNG.randn(2, 5, 2, 2)
    label = RNG.randint(0, 5, size=(2, 2, 2)).astype(float)
    layer = make('type: "SoftmaxWithLoss" loss_param { normalize: %s }' % normalize,
                 [x.shape, label.shape])
    loss, _, _ = run(layer, x, label)
    np.testing.assert_allclose(loss, softmax_loss_ref(x, label, mode=mode)[0])
    # an explicit normalization wins over the legacy field
    layer = make('type: "SoftmaxWithLoss" loss_param { normalize: false normalization: FULL }',
                 [x.shape, label.shape])
    np.testing.assert_allclose(run(layer, x, label)[0], softmax_loss_ref(x, label, mode="FULL")[0])


def test_softmax_loss_all_ignored_normalizer_is_one():
    x, label = RNG.randn(2, 3), np.array([7.0, 7.0])
    layer = make('type: "SoftmaxWithLoss" loss_param { ignore_label: 7 }', [x.shape, label.shape])
    loss, (g, _), _ = run(layer, x, label)
    assert loss == 0 and np.all(g == 0)


def test_softmax_loss_axis_and_second_top():
    x = RNG.randn(3, 4, 6)
    label = RNG.randint(0, 6, size=(3, 4)).astype(float)
    layer = make('type: "SoftmaxWithLoss" softmax_param { axis: -1 }', [x.shape, label.shape],
                 tops=2)
    assert layer.top_shapes() == [(), x.shape]
    loss, (g, _), out = run(layer, x, label)
    ref, ref_g, prob = softmax_loss_ref(x, label, axis=2)
    np.testing.assert_allclose(loss, ref)
    np.testing.assert_allclose(g, ref_g)
    np.testing.assert_allclose(out[1].detach().numpy(), prob)
    assert not out[1].requires_grad


def test_softmax_loss_flt_min_clamp_keeps_caffe_gradient():
    x, label = np.array([[0.0, 200.0]], np.float32), np.array([0.0])
    layer = make('type: "SoftmaxWithLoss"', [x.shape, label.shape])
    xt = torch.tensor(x, requires_grad=True)
    loss = layer(xt, torch.tensor(label, dtype=torch.float32))
    loss.backward()
    np.testing.assert_allclose(loss.item(), -np.log(FLT_MIN), rtol=1e-6)
    np.testing.assert_allclose(xt.grad.numpy(), [[-1.0, 1.0]], atol=1e-6)


def test_softmax_loss_checks():
    with pytest.raises(CaffeError) as err:
        make('type: "SoftmaxWithLoss"', [(2, 5, 3, 3), (2, 1, 3, 2)])
    assert "Number of labels must match number of predictions" in str(err.value)
    assert "(18 vs. 12)" in str(err.value)
    assert err.value.where == "softmax_loss_layer.cpp:47"
    with pytest.raises(CaffeError) as err:
        make('type: "SoftmaxWithLoss"', [(4, 5), (3,)])
    assert "The data and label should have the same first dimension." in str(err.value)
    assert err.value.where == "loss_layer.cpp:19"
    with pytest.raises(CaffeError):
        make('type: "SoftmaxWithLoss"', [(4, 5), (4,)], tops=3)


@pytest.mark.parametrize("kind", ["SoftmaxWithLoss", "HingeLoss", "MultinomialLogisticLoss",
                                  "InfogainLoss"])
@pytest.mark.parametrize("bad", [3.0, -1.0])
def test_out_of_range_label_is_refused_on_cpu(kind, bad):
    shapes = [(2, 3), (2,)] + ([(3, 3)] if kind == "InfogainLoss" else [])
    layer = make('type: "%s"' % kind, shapes)
    args = [torch.zeros(2, 3), torch.tensor([0.0, bad])] + [torch.ones(s) for s in shapes[2:]]
    with pytest.raises(CaffeError) as err:
        layer(*args)
    assert "a label is outside [0, 3)" in str(err.value)


# ----------------------------------------------------------------------------- EuclideanLoss
def test_euclidean_loss_both_inputs_get_gradients():
    a, b = RNG.randn(4, 5), RNG.randn(4, 5, 1, 1)
    layer = make('type: "EuclideanLoss"', [a.shape, b.shape])
    loss, (ga, gb), _ = run(layer, a, b, weight=2.0, grads=(0, 1))
    diff = a - b.reshape(4, 5)
    np.testing.assert_allclose(loss, (diff ** 2).sum() / 4 / 2)
    np.testing.assert_allclose(ga, 2.0 * diff / 4)
    np.testing.assert_allclose(gb.reshape(4, 5), -2.0 * diff / 4)


def test_euclidean_loss_dimension_check():
    with pytest.raises(CaffeError) as err:
        make('type: "EuclideanLoss"', [(4, 5), (4, 6)])
    assert "Inputs must have the same dimension." in str(err.value)
    assert err.value.where == "euclidean_loss_layer.cpp:12"


# ----------------------------------------------------------------------------- SigmoidCE
def sce_ref(x, t, ignore=None, mode="BATCH_SIZE"):
    loss = np.zeros_like(x)
    pos = (x >= 0).astype(float)
    per = -(x * (t - pos) - np.log(1 + np.exp(x - 2 * x * pos)))
    grad = 1 / (1 + np.exp(-x)) - t
    valid = np.ones_like(x, bool) if ignore is None else t.astype(int) != ignore
    loss = per[valid].sum()
    grad[~valid] = 0
    norm = {"FULL": x.size, "VALID": valid.sum(), "BATCH_SIZE": x.shape[0], "NONE": 1}[mode]
    norm = max(1.0, norm)
    return loss / norm, grad / norm


def test_sigmoid_cross_entropy_default_batch_size():
    x, t = 3 * RNG.randn(4, 6), RNG.rand(4, 6)
    layer = make('type: "SigmoidCrossEntropyLoss"', [x.shape, t.shape])
    loss, (g, gt), _ = run(layer, x, t)
    ref, ref_g = sce_ref(x, t)
    np.testing.assert_allclose(loss, ref)
    np.testing.assert_allclose(g, ref_g)
    assert gt is None


@pytest.mark.parametrize("text,mode", [
    ("loss_param { ignore_label: -1 normalization: VALID }", "VALID"),
    ("loss_param { ignore_label: -1 normalize: true }", "VALID"),
    ("loss_param { ignore_label: -1 normalize: false }", "BATCH_SIZE"),
    ("loss_param { ignore_label: -1 normalization: FULL }", "FULL"),
])
def test_sigmoid_cross_entropy_ignore_and_modes(text, mode):
    x, t = RNG.randn(4, 6), RNG.rand(4, 6)
    t[0, 1] = t[2, 3] = t[3, 5] = -1
    layer = make('type: "SigmoidCrossEntropyLoss" ' + text, [x.shape, t.shape])
    loss, (g, _), _ = run(layer, x, t)
    ref, ref_g = sce_ref(x, t, -1, mode)
    np.testing.assert_allclose(loss, ref)
    np.testing.assert_allclose(g, ref_g)


def test_sigmoid_cross_entropy_count_check():
    with pytest.raises(CaffeError) as err:
        make('type: "SigmoidCrossEntropyLoss"', [(4, 6), (4, 5)])
    assert "SIGMOID_CROSS_ENTROPY_LOSS layer inputs must have the same count." in str(err.value)
    assert err.value.where == "sigmoid_cross_entropy_loss_layer.cpp:41"


# ----------------------------------------------------------------------------- HingeLoss
@pytest.mark.parametrize("norm", ["L1", "L2"])
def test_hinge_loss(norm):
    x, label = RNG.randn(4, 5), np.array([1.0, 0.0, 4.0, 2.0])
    layer = make('type: "HingeLoss" hinge_loss_param { norm: %s }' % norm, [x.shape, label.shape])
    loss, (g, _), _ = run(layer, x, label, weight=1.5)
    d = x.copy()
    d[np.arange(4), label.astype(int)] *= -1
    d = np.maximum(0, 1 + d)
    sign = np.ones_like(x)
    sign[np.arange(4), label.astype(int)] = -1
    if norm == "L1":
        np.testing.assert_allclose(loss, d.sum() / 4)
        np.testing.assert_allclose(g, 1.5 * sign * np.sign(d) / 4)
    else:
        np.testing.assert_allclose(loss, (d * d).sum() / 4)
        np.testing.assert_allclose(g, 1.5 * 2 * sign * d / 4)


# ----------------------------------------------------------------------------- Multinomial
def test_multinomial_logistic_loss():
    prob, label = softmax(RNG.randn(4, 5), 1), np.array([2.0, 0.0, 4.0, 1.0])
    prob[1, 0] = 0.0   # clamped to 1e-20 in value and in Caffe's gradient
    layer = make('type: "MultinomialLogisticLoss"', [prob.shape, label.shape])
    loss, (g, _), _ = run(layer, prob, label)
    thr = float(np.float32(1e-20))
    picked = np.maximum(prob[np.arange(4), label.astype(int)], thr)
    np.testing.assert_allclose(loss, -np.log(picked).sum() / 4)
    ref_g = np.zeros_like(prob)
    ref_g[np.arange(4), label.astype(int)] = -1.0 / (4 * picked)
    np.testing.assert_allclose(g, ref_g, rtol=1e-6)


def test_multinomial_logistic_label_shape_check():
    with pytest.raises(CaffeError) as err:
        make('type: "MultinomialLogisticLoss"', [(4, 5), (4, 2)])
    assert "bottom[1]->channels() == 1 (2 vs. 1)" in str(err.value)
    assert err.value.where == "multinomial_logistic_loss_layer.cpp:14"


# ----------------------------------------------------------------------------- InfogainLoss
def infogain_ref(x, label, H, axis=1, ignore=None, mode="VALID"):
    prob = softmax(x, axis)
    c = x.shape[axis]
    outer = int(np.prod(x.shape[:axis]))
    inner = int(np.prod(x.shape[axis + 1:]))
    p3 = prob.reshape(outer, c, inner)
    lbl = label.reshape(outer, inner).astype(int)
    loss, count = 0.0, 0
    grad = np.zeros_like(p3)
    for i in range(outer):
        for j in range(inner):
            if ignore is not None and lbl[i, j] == ignore:
                continue
            row = H[lbl[i, j]]
            loss -= (row * np.log(np.maximum(p3[i, :, j], 1e-20))).sum()
            grad[i, :, j] = p3[i, :, j] * row.sum() - row
            count += 1
    norm = {"FULL": outer * inner, "VALID": count, "BATCH_SIZE": outer, "NONE": 1}[mode]
    norm = max(1.0, norm)
    return loss / norm, grad.reshape(x.shape) / norm


def write_blobproto(path, array):
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.extend(array.shape)
    blob.data.extend(array.astype(np.float32).ravel().tolist())
    with open(path, "wb") as f:
        f.write(blob.SerializeToString())


def test_infogain_loss_from_source(tmp_path, monkeypatch):
    H = RNG.rand(5, 5).astype(np.float32)
    write_blobproto(tmp_path / "H.binaryproto", H)
    monkeypatch.chdir(tmp_path)
    x, label = RNG.randn(4, 5), np.array([0.0, 3.0, 4.0, 1.0])
    layer = make('type: "InfogainLoss" infogain_loss_param { source: "H.binaryproto" }',
                 [x.shape, label.shape])
    loss, (g, _), _ = run(layer, x, label)
    ref, ref_g = infogain_ref(x, label, H.astype(np.float64))
    np.testing.assert_allclose(loss, ref, rtol=1e-6)
    np.testing.assert_allclose(g, ref_g, rtol=1e-6, atol=1e-12)


def test_infogain_loss_third_bottom_ignore_and_prob_top():
    H = RNG.rand(4, 4)
    x = RNG.randn(2, 4, 3)
    label = RNG.randint(0, 4, size=(2, 3)).astype(float)
    label[1, 2] = 9
    layer = make('type: "InfogainLoss" loss_param { ignore_label: 9 normalization: BATCH_SIZE }',
                 [x.shape, label.shape, H.shape], tops=2)
    assert layer.top_shapes() == [(), x.shape]
    loss, (g, _, gh), out = run(layer, x, label, H)
    ref, ref_g = infogain_ref(x, label, H, ignore=9, mode="BATCH_SIZE")
    np.testing.assert_allclose(loss, ref)
    np.testing.assert_allclose(g, ref_g, atol=1e-12)
    np.testing.assert_allclose(out[1].detach().numpy(), softmax(x, 1))
    assert gh is None


def test_infogain_loss_checks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CaffeError) as err:
        make('type: "InfogainLoss"', [(4, 5), (4,)])
    assert "Infogain matrix source must be specified." in str(err.value)
    with pytest.raises(CaffeError) as err:
        make('type: "InfogainLoss" infogain_loss_param { source: "nope.binaryproto" }',
             [(4, 5), (4,)])
    assert "File not found: nope.binaryproto" in str(err.value)
    with pytest.raises(CaffeError) as err:
        make('type: "InfogainLoss" loss_param { normalize: true }', [(4, 5), (4,), (5, 5)])
    assert 'normalize is deprecated. use "normalization"' in str(err.value)
    with pytest.raises(CaffeError) as err:
        make('type: "InfogainLoss"', [(4, 5), (4,), (4, 4)])
    assert "infogain->count() == num_labels_*num_labels_ (16 vs. 25)" in str(err.value)


# ----------------------------------------------------------------------------- Contrastive
def contrastive_ref(a, b, sim, margin, legacy):
    n = a.shape[0]
    diff = (a - b).reshape(n, -1)
    d2 = (diff ** 2).sum(1)
    loss = 0.0
    ga = np.zeros_like(diff)
    for i in range(n):
        if int(sim[i]):
            loss += d2[i]
            ga[i] = diff[i] / n
        elif legacy:
            loss += max(margin - d2[i], 0)
            if margin - d2[i] > 0:
                ga[i] = -diff[i] / n
        else:
            d = np.sqrt(d2[i])
            loss += max(margin - d, 0) ** 2
            if margin - d > 0:
                ga[i] = -(margin - d) / (d + 1e-4) * diff[i] / n
    return loss / n / 2, ga.reshape(a.shape)


@pytest.mark.parametrize("legacy", [False, True])
def test_contrastive_loss(legacy):
    a, b = RNG.randn(6, 3, 1, 1), RNG.randn(6, 3, 1, 1)
    sim = np.array([1, 0, 0, 1, 0, 0], float).reshape(6, 1, 1, 1)
    b[1] = a[1]   # distance 0: Caffe's 1e-4 keeps the gradient finite
    layer = make('type: "ContrastiveLoss" contrastive_loss_param { margin: 1.5 %s }'
                 % ("legacy_version: true" if legacy else ""), [a.shape, b.shape, sim.shape])
    loss, (ga, gb, gs), _ = run(layer, a, b, sim, grads=(0, 1))
    ref, ref_ga = contrastive_ref(a, b, sim.ravel(), 1.5, legacy)
    np.testing.assert_allclose(loss, ref)
    np.testing.assert_allclose(ga, ref_ga, atol=1e-12)
    np.testing.assert_allclose(gb, -ref_ga, atol=1e-12)
    assert gs is None


def test_contrastive_loss_shape_checks():
    with pytest.raises(CaffeError) as err:
        make('type: "ContrastiveLoss"', [(6, 3, 1, 1), (6, 4, 1, 1), (6, 1, 1, 1)])
    assert err.value.where == "contrastive_loss_layer.cpp:13"
    with pytest.raises(CaffeError) as err:
        make('type: "ContrastiveLoss"', [(6, 3, 2, 1), (6, 3, 2, 1), (6, 1, 1, 1)])
    assert "bottom[0]->height() == 1 (2 vs. 1)" in str(err.value)
