"""Unit tests of layers/common.py: shapes, Caffe's checks, and numbers against numpy or
hand-computed values."""
import numpy as np
import pytest
import torch
from google.protobuf import text_format

from converters import caffe_pb2
from converters.errors import CaffeError
from layers import registry


def make(type_name, text="", shapes=((2, 3, 4, 5),), ntop=1, phase="TRAIN", tops=None,
         bottoms=None):
    lp = caffe_pb2.LayerParameter()
    text_format.Parse(text, lp)
    lp.name = "l"
    lp.type = type_name
    lp.bottom.extend(bottoms or ["b%d" % i for i in range(len(shapes))])
    lp.top.extend(tops or ["t%d" % i for i in range(ntop)])
    return registry.get(type_name)(lp, [tuple(s) for s in shapes], phase)


def fails(match, *args, **kwargs):
    with pytest.raises(CaffeError) as info:
        make(*args, **kwargs)
    assert match in str(info.value), str(info.value)
    return info.value


def rand(*shape, seed=0):
    return torch.from_numpy(np.random.RandomState(seed).randn(*shape).astype(np.float32))


def shapes_of(layer, *bottoms):
    out = layer(*bottoms)
    out = out if isinstance(out, tuple) else (out,)
    assert [tuple(t.shape) for t in out] == layer.top_shapes()
    return out


# ------------------------------------------------------------------ InnerProduct
@pytest.mark.parametrize("text,shape,wshape,tshape", [
    ("num_output: 7", (2, 3, 4, 5), (7, 60), (2, 7)),
    ("num_output: 7 transpose: true", (2, 3, 4, 5), (60, 7), (2, 7)),
    ("num_output: 4 axis: 2", (2, 3, 4, 5), (4, 20), (2, 3, 4)),
    ("num_output: 6 axis: -1 bias_term: false", (2, 3, 4, 5), (6, 5), (2, 3, 4, 6)),
])
def test_inner_product(text, shape, wshape, tshape):
    layer = make("InnerProduct", "inner_product_param { %s weight_filler { type: 'gaussian' } "
                 "bias_filler { type: 'gaussian' } }" % text, [shape])
    assert tuple(layer.blobs[0].shape) == wshape
    assert len(layer.blobs) == (1 if "bias_term: false" in text else 2)
    x = rand(*shape)
    (out,) = shapes_of(layer, x)
    axis = len(tshape) - 1
    w = layer.blobs[0].detach().numpy()
    w = w if "transpose" in text else w.T
    ref = x.numpy().reshape(int(np.prod(shape[:axis])), -1) @ w
    if len(layer.blobs) > 1:
        ref = ref + layer.blobs[1].detach().numpy()
    np.testing.assert_allclose(out.detach().numpy(), ref.reshape(tshape), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ Concat / Slice / Split
def test_concat():
    a, b = rand(2, 3, 4, 5), rand(2, 2, 4, 5, seed=1)
    layer = make("Concat", "", [(2, 3, 4, 5), (2, 2, 4, 5)])
    (out,) = shapes_of(layer, a, b)
    torch.testing.assert_close(out, torch.cat([a, b], 1))
    legacy = make("Concat", "concat_param { concat_dim: 0 }", [(2, 3), (4, 3)])
    assert legacy.top_shapes() == [(6, 3)]
    assert make("Concat", "concat_param { axis: -1 }", [(2, 3), (2, 4)]).top_shapes() == [(2, 7)]
    err = fails("All inputs must have the same shape, except at concat_axis.", "Concat", "",
                [(2, 3, 4, 5), (2, 2, 3, 5)])
    assert err.where == "concat_layer.cpp:42" and "(4 vs. 3)" in str(err)
    fails("Either axis or concat_dim should be specified; not both.", "Concat",
          "concat_param { axis: 1 concat_dim: 1 }", [(2, 3), (2, 3)])
    fails("All inputs must have the same #axes.", "Concat", "", [(2, 3), (2, 3, 1)])
    fails("concat_dim out of range.", "Concat", "concat_param { concat_dim: 2 }",
          [(2, 3), (2, 3)])
    fails("axis 2 out of range", "Concat", "concat_param { axis: 2 }", [(2, 3), (2, 3)])


def test_slice():
    x = rand(2, 6, 4)
    layer = make("Slice", "slice_param { axis: 1 slice_point: 1 slice_point: 4 }", [(2, 6, 4)],
                 ntop=3)
    tops = shapes_of(layer, x)
    assert [t.shape[1] for t in tops] == [1, 3, 2]
    torch.testing.assert_close(torch.cat(tops, 1), x)
    equal = make("Slice", "slice_param { axis: 0 }", [(4, 3)], ntop=2)
    assert equal.top_shapes() == [(2, 3), (2, 3)]
    assert make("Slice", "slice_param { slice_dim: 0 }", [(4, 3)], ntop=4).top_shapes() == [
        (1, 3)] * 4
    fails("Number of top blobs (4) should evenly divide input slice axis (6)", "Slice", "",
          [(2, 6)], ntop=4)
    err = fails("slice_point_.size() == top.size() - 1 (1 vs. 2)", "Slice",
                "slice_param { slice_point: 2 }", [(2, 6)], ntop=3)
    assert err.where == "slice_layer.cpp:43"
    fails("slice_point_[i] > prev (2 vs. 3)", "Slice",
          "slice_param { slice_point: 3 slice_point: 2 }", [(2, 6)], ntop=3)
    fails("Either axis or slice_dim should be specified; not both.", "Slice",
          "slice_param { axis: 1 slice_dim: 1 }", [(2, 6)], ntop=2)
    x.requires_grad_(True)
    a, b, c = layer(x)
    (a.sum() + 2 * c.sum()).backward()
    assert x.grad[:, 0].eq(1).all() and x.grad[:, 1:4].eq(0).all() and x.grad[:, 4:].eq(2).all()


def test_split():
    layer = make("Split", "", [(2, 3)], ntop=3)
    x = rand(2, 3).requires_grad_(True)
    tops = shapes_of(layer, x)
    sum(t.sum() * (i + 1) for i, t in enumerate(tops)).backward()
    assert x.grad.eq(6).all()
    fails("Split Layer does not allow in-place computation.", "Split", "", [(2, 3)],
          tops=["b0", "t1"])


# ------------------------------------------------------------------ Eltwise
def test_eltwise_sum_prod():
    a, b, c = rand(2, 3, seed=1), rand(2, 3, seed=2), rand(2, 3, seed=3)
    s = make("Eltwise", "eltwise_param { operation: SUM coeff: 1 coeff: -0.5 coeff: 2 }",
             [(2, 3)] * 3)
    torch.testing.assert_close(s(a, b, c), a - 0.5 * b + 2 * c)
    plain = make("Eltwise", "", [(2, 3)] * 2)
    torch.testing.assert_close(plain(a, b), a + b)
    p = make("Eltwise", "eltwise_param { operation: PROD }", [(2, 3)] * 3)
    ag, bg, cg = (t.clone().requires_grad_(True) for t in (a, b, c))
    out = p(ag, bg, cg)
    torch.testing.assert_close(out, a * b * c)
    out.sum().backward()
    torch.testing.assert_close(ag.grad, b * c)
    fails("Eltwise Layer takes one coefficient per bottom blob.", "Eltwise",
          "eltwise_param { coeff: 1 }", [(2, 3)] * 2)
    fails("Eltwise layer only takes coefficients for summation.", "Eltwise",
          "eltwise_param { operation: PROD coeff: 1 coeff: 1 }", [(2, 3)] * 2)
    err = fails("bottom[i]->shape() == bottom[0]->shape()", "Eltwise", "", [(2, 3), (3, 2)])
    assert err.where == "eltwise_layer.cpp:34"
    fails("takes at least 2 bottom", "Eltwise", "", [(2, 3)])


def test_eltwise_max_gradient_follows_caffe_mask():
    layer = make("Eltwise", "eltwise_param { operation: MAX }", [(4,)] * 3)
    a = torch.tensor([1.0, 2.0, 5.0, 0.0], requires_grad=True)
    b = torch.tensor([1.0, 3.0, 5.0, 0.0], requires_grad=True)
    c = torch.tensor([0.0, 3.0, 5.0, 1.0], requires_grad=True)
    out = layer(a, b, c)
    assert out.tolist() == [1.0, 3.0, 5.0, 1.0]
    out.backward(torch.tensor([1.0, 10.0, 100.0, 1000.0]))
    # a tie between bottoms 0 and 1 goes to bottom 1; later bottoms must be strictly greater
    assert a.grad.tolist() == [0, 0, 0, 0]
    assert b.grad.tolist() == [1, 10, 100, 0]
    assert c.grad.tolist() == [0, 0, 0, 1000]


# ------------------------------------------------------------------ Flatten / Reshape / Crop
def test_flatten():
    x = rand(2, 3, 4, 5)
    (out,) = shapes_of(make("Flatten", "", [(2, 3, 4, 5)]), x)
    assert out.shape == (2, 60) and out.data_ptr() == x.data_ptr()
    assert make("Flatten", "flatten_param { axis: 2 end_axis: 3 }",
                [(2, 3, 4, 5)]).top_shapes() == [(2, 3, 20)]
    assert make("Flatten", "flatten_param { axis: 0 end_axis: -2 }",
                [(2, 3, 4, 5)]).top_shapes() == [(24, 5)]
    fails("Flatten Layer does not allow in-place computation.", "Flatten", "", [(2, 3)],
          tops=["b0"])


@pytest.mark.parametrize("text,shape,top", [
    ("shape { dim: 0 dim: -1 dim: 2 }", (2, 3, 4, 5), (2, 30, 2)),
    ("axis: 2 num_axes: 2 shape { dim: 10 dim: 2 }", (2, 2, 4, 5), (2, 2, 10, 2)),
    ("axis: 1 num_axes: 0 shape { dim: 1 }", (2, 3), (2, 1, 3)),
    ("axis: -1 shape { dim: 1 }", (2, 3), (2, 3, 1)),
    ("shape { dim: -1 }", (2, 3, 4), (24,)),
    ("axis: 1 shape { dim: 0 dim: 2 dim: -1 }", (2, 3, 4, 5), (2, 3, 2, 10)),
])
def test_reshape(text, shape, top):
    layer = make("Reshape", "reshape_param { %s }" % text, [shape])
    x = rand(*shape)
    (out,) = shapes_of(layer, x)
    assert out.shape == top and out.data_ptr() == x.data_ptr()


def test_reshape_checks():
    fails("new shape contains multiple -1 dims", "Reshape",
          "reshape_param { shape { dim: -1 dim: -1 } }", [(2, 3)])
    err = fails("bottom count (6) must be divisible by the product of the specified dimensions "
                "(4)", "Reshape", "reshape_param { shape { dim: 4 dim: -1 } }", [(2, 3)])
    assert err.where == "reshape_layer.cpp:80"
    fails("output count must match input count", "Reshape",
          "reshape_param { shape { dim: 5 } }", [(2, 3)])
    fails("new shape contains a 0, but there was no corresponding bottom axis to copy",
          "Reshape", "reshape_param { axis: 2 shape { dim: 0 } }", [(2, 3)])
    fails("end_axis = axis + num_axes is out of range", "Reshape",
          "reshape_param { axis: 1 num_axes: 2 shape { dim: 3 } }", [(2, 3)])
    fails("Reshape Layer does not allow in-place computation.", "Reshape",
          "reshape_param { shape { dim: -1 } }", [(2, 3)], tops=["b0"])


def test_crop():
    big = rand(2, 3, 7, 8)
    layer = make("Crop", "crop_param { axis: 2 offset: 1 offset: 2 }", [(2, 3, 7, 8),
                                                                         (2, 3, 4, 5)])
    (out,) = shapes_of(layer, big, torch.zeros(2, 3, 4, 5))
    torch.testing.assert_close(out, big[:, :, 1:5, 2:7])
    one = make("Crop", "crop_param { axis: 1 offset: 1 }", [(2, 3, 7, 8), (2, 2, 4, 5)])
    torch.testing.assert_close(one(big, torch.zeros(2, 2, 4, 5)), big[:, 1:3, 1:5, 1:6])
    default = make("Crop", "", [(2, 3, 7, 8), (9, 9, 4, 5)])
    assert default.top_shapes() == [(2, 3, 4, 5)]
    fails("number of offset values specified must be equal to the number of dimensions "
          "following axis.", "Crop", "crop_param { axis: 1 offset: 1 offset: 2 }",
          [(2, 3, 7, 8), (2, 2, 4, 5)])
    err = fails("the crop for dimension 3 is out-of-bounds with size 5 and offset 4", "Crop",
                "crop_param { offset: 1 offset: 4 }", [(2, 3, 7, 8), (2, 2, 4, 5)])
    assert err.where == "crop_layer.cpp:63"
    fails("takes 2 bottom", "Crop", "", [(2, 3)])


# ------------------------------------------------------------------ Scale / Bias
def test_scale_learned_defaults_and_bias():
    x = rand(2, 3, 4, 5)
    layer = make("Scale", "scale_param { bias_term: true }", [(2, 3, 4, 5)])
    assert [tuple(b.shape) for b in layer.blobs] == [(3,), (3,)]
    assert layer.blobs[0].eq(1).all() and layer.blobs[1].eq(0).all()
    with torch.no_grad():
        layer.blobs[0].copy_(torch.tensor([1.0, 2.0, 3.0]))
        layer.blobs[1].copy_(torch.tensor([0.5, 0.0, -1.0]))
    (out,) = shapes_of(layer, x)
    ref = x * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1) + torch.tensor(
        [0.5, 0.0, -1.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(out, ref)
    hw = make("Scale", "scale_param { axis: 2 num_axes: -1 }", [(2, 3, 4, 5)])
    assert tuple(hw.blobs[0].shape) == (4, 5)
    scalar = make("Scale", "scale_param { num_axes: 0 filler { type: 'constant' value: 3 } }",
                  [(2, 3)])
    assert tuple(scalar.blobs[0].shape) == ()
    torch.testing.assert_close(scalar(torch.ones(2, 3)), torch.full((2, 3), 3.0))


def test_scale_two_bottoms_and_gradient():
    x = rand(2, 3, 4)
    s = rand(2, 3, seed=1)
    layer = make("Scale", "scale_param { axis: 0 }", [(2, 3, 4), (2, 3)])
    assert len(layer.blobs) == 0
    xg, sg = x.clone().requires_grad_(True), s.clone().requires_grad_(True)
    out = layer(xg, sg)
    torch.testing.assert_close(out, x * s[:, :, None])
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(sg.grad, x.sum(2))
    with_bias = make("Scale", "scale_param { axis: 0 bias_term: true bias_filler { type: "
                     "'constant' value: 1 } }", [(2, 3, 4), (2, 3)])
    assert [tuple(b.shape) for b in with_bias.blobs] == [(2, 3)]
    torch.testing.assert_close(with_bias(x, s), x * s[:, :, None] + 1)
    scalar = make("Scale", "", [(2, 3, 4), ()])
    torch.testing.assert_close(scalar(x, torch.tensor(2.0)), 2 * x)
    err = fails("dimension mismatch between bottom[0]->shape(1) and scale->shape(0)", "Scale",
                "", [(2, 3, 4), (4,)])
    assert err.where == "scale_layer.cpp:92"
    fails("scale blob's shape extends past bottom[0]'s shape when applied starting with "
          "bottom[0] axis = 2", "Scale", "scale_param { axis: 2 num_axes: 2 }", [(2, 3, 4)])
    fails("num_axes must be non-negative, or -1 to extend to the end of bottom[0]", "Scale",
          "scale_param { num_axes: -2 }", [(2, 3, 4)])


def test_bias():
    x = rand(2, 3, 4)
    learned = make("Bias", "bias_param { filler { type: 'constant' value: 2 } }", [(2, 3, 4)])
    assert tuple(learned.blobs[0].shape) == (3,)
    torch.testing.assert_close(learned(x), x + 2)
    hw = make("Bias", "bias_param { axis: 1 }", [(2, 3, 4), (3, 4)])
    b = rand(3, 4, seed=1)
    torch.testing.assert_close(hw(x, b), x + b)
    default = make("Bias", "", [(2, 3, 4)])
    assert default.blobs[0].eq(0).all()
    fails("bias blob's shape extends past", "Bias", "bias_param { axis: 2 num_axes: 2 }",
          [(2, 3, 4)])
    fails("dimension mismatch between bottom[0]->shape(1) and bias->shape(0)", "Bias", "",
          [(2, 3, 4), (4,)])


# ------------------------------------------------------------------ Tile / Reduction
def test_tile():
    x = rand(2, 3, 4)
    layer = make("Tile", "tile_param { axis: 1 tiles: 2 }", [(2, 3, 4)])
    (out,) = shapes_of(layer, x)
    torch.testing.assert_close(out, torch.cat([x, x], 1))
    last = make("Tile", "tile_param { axis: -1 tiles: 3 }", [(2, 3, 4)])
    torch.testing.assert_close(last(x), torch.cat([x, x, x], 2))
    fails("Number of tiles must be specified", "Tile", "", [(2, 3)])
    fails("Number of tiles must be positive.", "Tile", "tile_param { tiles: 0 }", [(2, 3)])


@pytest.mark.parametrize("op,axis,coeff", [("SUM", 1, 1), ("ASUM", 2, 0.5), ("SUMSQ", 0, 1),
                                           ("MEAN", -1, 2)])
def test_reduction(op, axis, coeff):
    x = rand(2, 3, 4, 5)
    layer = make("Reduction", "reduction_param { operation: %s axis: %d coeff: %s }"
                 % (op, axis, coeff), [(2, 3, 4, 5)])
    xg = x.clone().requires_grad_(True)
    (out,) = shapes_of(layer, xg)
    a = axis % 4
    flat = x.numpy().reshape(x.shape[:a] + (-1,)).astype(np.float64)
    ref = {"SUM": flat.sum(-1), "ASUM": np.abs(flat).sum(-1), "SUMSQ": (flat ** 2).sum(-1),
           "MEAN": flat.mean(-1)}[op] * coeff
    assert out.shape == x.shape[:a]
    np.testing.assert_allclose(out.detach().numpy(), ref, rtol=1e-5)
    out.sum().backward()
    grad = {"SUM": np.ones_like(flat), "ASUM": np.sign(flat), "SUMSQ": 2 * flat,
            "MEAN": np.ones_like(flat) / flat.shape[-1]}[op] * coeff
    np.testing.assert_allclose(xg.grad.numpy(), grad.reshape(x.shape), rtol=1e-5)


def test_reduction_default_is_scalar():
    layer = make("Reduction", "", [(2, 3)])
    assert layer.top_shapes() == [()]
    assert layer(torch.ones(2, 3)).dim() == 0


# ------------------------------------------------------------------ Embed / Parameter / Silence
def test_embed():
    layer = make("Embed", "embed_param { num_output: 4 input_dim: 7 weight_filler { type: "
                 "'gaussian' } bias_filler { type: 'gaussian' } }", [(5,)])
    assert [tuple(b.shape) for b in layer.blobs] == [(7, 4), (4,)]
    assert layer.label_bottoms == (0,)
    idx = torch.tensor([0.0, 3.0, 6.0, 3.0, 1.0])
    (out,) = shapes_of(layer, idx)
    w, b = layer.blobs
    torch.testing.assert_close(out, w[[0, 3, 6, 3, 1]] + b)
    out.backward(torch.ones_like(out))
    assert w.grad[:, 0].tolist() == [1, 1, 0, 2, 0, 0, 1]
    assert b.grad.tolist() == [5, 5, 5, 5]
    fails("EmbedLayer num_output must be positive.", "Embed", "embed_param { input_dim: 3 }",
          [(5,)])
    fails("EmbedLayer input_dim must be positive.", "Embed", "embed_param { num_output: 3 }",
          [(5,)])


def test_parameter_and_silence():
    layer = make("Parameter", "parameter_param { shape { dim: 2 dim: 3 } }", [])
    (out,) = shapes_of(layer)
    assert out.shape == (2, 3) and out.eq(0).all()
    out.sum().backward()
    assert layer.blobs[0].grad.eq(1).all()
    silence = make("Silence", "", [(2, 3), (4,)], ntop=0)
    assert silence(torch.ones(2, 3), torch.ones(4)) == () and silence.top_shapes() == []
    fails("produces 0 top", "Silence", "", [(2, 3)], ntop=1)


# ------------------------------------------------------------------ ArgMax / Accuracy
def test_argmax():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.9], [2.0, -1.0, 0.5, 1.0]])
    plain = make("ArgMax", "", [(2, 4)])
    (out,) = shapes_of(plain, scores)
    # ties go to the larger index, as Caffe's std::greater on (value, index) pairs
    assert out.shape == (2, 1, 1) and out.flatten().tolist() == [3.0, 0.0]
    top2 = make("ArgMax", "argmax_param { top_k: 2 out_max_val: true }", [(2, 4)])
    (out,) = shapes_of(top2, scores)
    np.testing.assert_array_equal(out.numpy(), np.array(
        [[[3.0, 1.0], [0.9, 0.9]], [[0.0, 3.0], [2.0, 1.0]]], np.float32))
    s3 = rand(2, 5, 3)
    axis = make("ArgMax", "argmax_param { axis: 1 top_k: 2 }", [(2, 5, 3)])
    (out,) = shapes_of(axis, s3)
    ref = np.argsort(-s3.numpy(), axis=1, kind="stable")[:, :2]
    np.testing.assert_array_equal(out.numpy(), ref)
    vals = make("ArgMax", "argmax_param { axis: 1 out_max_val: true }", [(2, 5, 3)])
    torch.testing.assert_close(vals(s3), s3.amax(1, keepdim=True))
    assert make("ArgMax", "", [(2, 3, 4, 5)]).top_shapes() == [(2, 1, 1, 1)]
    fails("top_k must be less than or equal to the dimension of the flattened bottom blob per "
          "instance.", "ArgMax", "argmax_param { top_k: 5 }", [(2, 4)])
    fails("top_k must be less than or equal to the dimension of the axis.", "ArgMax",
          "argmax_param { top_k: 6 axis: 1 }", [(2, 5, 3)])
    fails("top k must not be less than 1.", "ArgMax", "argmax_param { top_k: 0 }", [(2, 4)])


def test_accuracy():
    scores = torch.tensor([[0.1, 0.9, 0.3], [0.5, 0.2, 0.4], [0.3, 0.3, 0.1], [0.2, 0.1, 0.7]])
    label = torch.tensor([1.0, 2.0, 1.0, 0.0])
    top1 = make("Accuracy", "", [(4, 3), (4,)])
    (acc,) = shapes_of(top1, scores, label)
    # sample 2: tie between classes 0 and 1 counts as beaten (>=), so only sample 0 is right
    assert acc.dim() == 0 and float(acc) == 0.25
    top2 = make("Accuracy", "accuracy_param { top_k: 2 }", [(4, 3), (4,)])
    assert float(top2(scores, label)) == 1.0      # every true class is within 2 (ties count)
    per = make("Accuracy", "accuracy_param { ignore_label: 2 }", [(4, 3), (4,)], ntop=2)
    acc, per_class = shapes_of(per, scores, label)
    assert abs(float(acc) - 1 / 3) < 1e-7
    assert per_class.tolist() == [0.0, 0.5, 0.0]
    spatial = make("Accuracy", "", [(2, 3, 2), (2, 2)])
    s = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0], [1.0, 2.0]]])
    assert float(spatial(s, torch.tensor([[0.0, 1.0], [2.0, 0.0]]))) == 0.75
    none = make("Accuracy", "accuracy_param { ignore_label: 0 }", [(2, 2), (2,)])
    assert float(none(torch.ones(2, 2), torch.zeros(2))) == 0.0
    err = fails("Number of labels must match number of predictions", "Accuracy", "",
                [(4, 3), (3,)])
    assert err.where == "accuracy_layer.cpp:31"
    fails("top_k must be less than or equal to the number of classes.", "Accuracy",
          "accuracy_param { top_k: 4 }", [(4, 3), (4,)])


# ------------------------------------------------------------------ Dropout
def test_dropout():
    x = torch.ones(20000)
    train = make("Dropout", "dropout_param { dropout_ratio: 0.2 }", [(20000,)])
    out = train(x)
    kept = out != 0
    assert torch.allclose(out[kept], torch.tensor(1.25))
    assert 0.78 < float(kept.float().mean()) < 0.82
    test = make("Dropout", "dropout_param { dropout_ratio: 0.2 }", [(20000,)], phase="TEST")
    assert test(x) is x
    with train.inferring():
        assert train(x) is x
    fails("dropout_ratio must be in [0, 1)", "Dropout", "dropout_param { dropout_ratio: 1 }",
          [(3,)])


def test_registered_names():
    for name in ("InnerProduct", "INNER_PRODUCT", "Concat", "Slice", "Split", "Eltwise",
                 "Flatten", "Reshape", "Crop", "Scale", "Bias", "Tile", "Reduction", "Embed",
                 "Silence", "Parameter", "ArgMax", "Accuracy", "Dropout", "Convolution",
                 "Deconvolution", "Pooling", "SPP", "Im2col", "POOLING", "CONVOLUTION"):
        assert registry.get(name).type_name is not None
