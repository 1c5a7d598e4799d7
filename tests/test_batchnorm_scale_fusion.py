"""BatchNorm + in-place Scale run as one batch_norm with an affine (Net._fusable_batchnorm_scale).

The fused pair must give what the two layers give apart, forward and backward (tops, param
diffs, bottom diffs, BatchNorm's moving sums), must really skip the Scale's own arithmetic, and
must not fuse where a blob version Caffe shows would change or a gradient would flow that Caffe
stops.
"""
import pytest
import torch

from converters import caffe_pb2
from converters.prototxt import parse_text
from layers.common import Scale
from layers.net import Net

HEAD = '''
name: "bnscale"
force_backward: true
layer { name: "data" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 4 dim: 3 dim: 6 dim: 6 } shape { dim: 4 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 5 kernel_size: 3 weight_filler { type: "gaussian" std: 0.3 } } }
'''
BN = '''layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "%(bn_top)s" %(bn_param)s }
'''
SCALE = '''layer { name: "scale" type: "Scale" bottom: "%(bn_top)s" top: "%(scale_top)s"
  %(propagate)s scale_param { bias_term: %(bias)s %(axis)s filler { type: "uniform" min: 0.5 max: 2 }
  bias_filler { type: "uniform" min: -1 max: 1 } } }
'''
TAIL = '''layer { name: "relu" type: "ReLU" bottom: "%(scale_top)s" top: "%(scale_top)s" }
layer { name: "ip" type: "InnerProduct" bottom: "%(scale_top)s" top: "ip"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
'''


def net_text(bn_top="conv", scale_top=None, bias="true", global_stats=False, propagate="",
             axis=""):
    fields = dict(bn_top=bn_top, scale_top=scale_top or bn_top, bias=bias, propagate=propagate,
                  axis=axis, bn_param=("batch_norm_param { use_global_stats: true }"
                                       if global_stats else ""))
    return HEAD + BN % fields + SCALE % fields + TAIL % fields


def build(text):
    return Net(parse_text(text, caffe_pb2.NetParameter(), "net"), "TRAIN", log=False)


def twins(text, device="cpu"):
    torch.manual_seed(0)
    fused = build(text).to(device)
    plain = build(text).to(device)
    with torch.no_grad():
        for a, b in zip(fused.parameters(), plain.parameters()):
            b.copy_(a)
        for layer in fused.layer_modules:        # non-trivial moving sums for global stats
            if type(layer).__name__ == "BatchNorm":
                for blob, value in zip(layer.blobs, (torch.rand(5), torch.rand(5) + 0.5,
                                                     torch.tensor([2.0]))):
                    value = value.to(blob.device)
                    blob.copy_(value)
        for a, b in zip(fused.layer_dict["bn"].blobs, plain.layer_dict["bn"].blobs):
            b.copy_(a)
    plain._bn_scale_pairs = []
    return fused, plain


def step(net, feed):
    for p in net.parameters():
        p.grad = None
    device = next(net.parameters()).device
    feed = {k: v.to(device) for k, v in feed.items()}
    x = feed["data"].clone().requires_grad_(True)
    loss = net.run(inputs=dict(feed, data=x))
    loss.backward()
    return loss.detach(), x.grad


def assert_same_step(fused, plain, fused_out, plain_out):
    """The loss, the data diff, every param and every param diff of the two nets agree."""
    (la, ga), (lb, gb) = fused_out, plain_out
    assert torch.allclose(la, lb, rtol=1e-5, atol=1e-6)
    assert torch.allclose(ga, gb, rtol=1e-4, atol=1e-6)
    for (name, a), (_, b) in zip(fused.named_parameters(), plain.named_parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name
        if a.grad is not None or b.grad is not None:
            assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), name


FEED = {"data": torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1)),
        "label": torch.tensor([0.0, 1.0, 2.0, 1.0])}


@pytest.mark.parametrize("kwargs", [dict(), dict(bn_top="bn"), dict(bias="false"),
                                    dict(global_stats=True), dict(axis="axis: 1 num_axes: 1")])
def test_fused_equals_apart(kwargs, monkeypatch):
    fused, plain = twins(net_text(**kwargs))
    assert len(fused._bn_scale_pairs) == 1
    calls = []
    real = Scale.affine
    monkeypatch.setattr(Scale, "affine", lambda self, *a: calls.append(1) or real(self, *a))
    for _ in range(2):               # twice: the moving sums feed nothing back, but must match
        la, ga = step(fused, FEED)
        n_fused = len(calls)
        lb, gb = step(plain, FEED)
        assert n_fused == 0 and len(calls) == 1, "the fused run must not call Scale.affine"
        calls.clear()
        assert_same_step(fused, plain, (la, ga), (lb, gb))
    # after the run both layers are plain modules again (profiling, export call them one by one)
    bn, scale = fused._bn_scale_pairs[0]
    assert bn.fused_scale == () and scale.fused is False


@pytest.mark.parametrize("kwargs", [
    dict(scale_top="scaled"),                          # BatchNorm's top stays visible
    dict(propagate="propagate_down: false"),           # Caffe stops the gradient at the Scale
    dict(axis="axis: 0 num_axes: 0"),                  # one scalar scale, not per channel
])
def test_not_fused(kwargs):
    # without force_backward (which overrides propagate_down, as in Caffe's net.cpp)
    fused, plain = twins(net_text(**kwargs).replace("force_backward: true", ""))
    assert fused._bn_scale_pairs == []


def test_pycaffe_runs_keep_the_layers_apart():
    """forward() (retain) shows BatchNorm's own top and diff as Caffe would: not fused."""
    fused, plain = twins(net_text(bn_top="bn"))
    fused.forward(data=FEED["data"].numpy(), label=FEED["label"].numpy())
    fused.backward()
    plain.forward(data=FEED["data"].numpy(), label=FEED["label"].numpy())
    plain.backward()
    for name in ("bn", "ip"):
        assert (fused.blobs[name].diff == plain.blobs[name].diff).all()
        assert (fused.blobs[name].data == plain.blobs[name].data).all()


def test_shared_scale_params_are_read_at_run_time():
    """The fused BatchNorm reads the Scale's current blobs (the solver's test net swaps in the
    train net's tensors after building)."""
    fused, _ = twins(net_text())
    scale = fused.layer_dict["scale"]
    before = fused.run(inputs=FEED).detach()
    with torch.no_grad():
        scale.scale.mul_(3.0)
    after = fused.run(inputs=FEED).detach()
    assert not torch.allclose(before, after)
