"""Activation memory (issue #5): no copy of a blob that Caffe would not keep.

Counted as benchmarks/memory.py counts (each untyped storage once, parameters never): what autograd
saves for backward, and the blobs the Net holds after forward. Deterministic, no timing.

Our in-place layers compute out of place (F.relu, F.dropout, F.batch_norm, torch.addcmul) and the
Net rebinds the blob name to the new tensor (layers/net.py: "a top named as its bottom rebinds the
blob name"); true in-place ops would break autograd in most of Caffe's chains (ReLU saves its
output, BatchNorm its input, Scale its input, so Dropout, Scale or a second in-place layer cannot
overwrite them). So an in-place chain is one blob name bound to one tensor, its last version; an
earlier version lives on only while autograd needs it, exactly as in a hand-written torch module.
"""
import os
import sys

import torch
import torch.nn.functional as F

from converters import caffe_pb2
from converters.prototxt import parse_text
from layers.net import Net

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import memory  # noqa: E402

CPU = torch.device("cpu")


def test_lenet_saves_no_more_than_hand_written():
    trainer, hand = memory.measure_pair(memory.lenet_pair, 64, CPU, peak=False)
    assert trainer["saved"] <= 1.05 * hand["saved"], (trainer, hand)
    assert trainer["live"] <= 1.05 * hand["live"], (trainer, hand)


def test_resnet_block_saves_no_more_than_hand_written():
    trainer, hand = memory.measure_pair(memory.resnet_pair, 8, CPU, peak=False)
    assert trainer["saved"] <= 1.05 * hand["saved"], (trainer, hand)


CHAIN = """
name: "InPlaceChain"
layer { name: "data" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 4 dim: 3 dim: 8 dim: 8 } shape { dim: 4 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 6 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "drop" type: "Dropout" bottom: "conv" top: "conv"
  dropout_param { dropout_ratio: 0.5 } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }
layer { name: "scale" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true } }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
  inner_product_param { num_output: 5 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


def chain_net():
    torch.manual_seed(0)
    net = Net(parse_text(CHAIN, caffe_pb2.NetParameter(), "chain"), "TRAIN", log=False)
    feed = {"data": torch.rand(4, 3, 8, 8), "label": torch.tensor([0., 1., 2., 3.])}
    return net, feed


def test_in_place_chain_holds_one_tensor_per_blob():
    net, feed = chain_net()
    tops = {}
    for li, layer in enumerate(net.layer_modules):   # each version of every top, by layer
        layer.register_forward_hook(
            lambda m, args, out, name=net.layer_names[li]: tops.__setitem__(name, out))
    loss, saved = memory.saved_for_backward(lambda: net.run(inputs=feed),
                                            memory.module_state(net))
    # Caffe keeps one blob per top name: conv (4 layers in place on it), ip, loss
    held = memory.net_blobs(net)
    assert len(held) == 3
    assert net._data["conv"] is tops["scale"]       # the name is bound to the last version
    assert not net._first                           # no earlier version is held on the side
    # an earlier version outlives the forward only where autograd saved it (ReLU its output,
    # BatchNorm its input, InnerProduct its input); nothing keeps the pre-ReLU convolution output (the
    # hooks' ``tops`` hold every version, so no storage address is reused in between)
    keys = {name: memory.storage_key(t)[0] for name, t in tops.items() if name != "data"}
    assert keys["relu"] in saved and keys["drop"] in saved and keys["bn"] in saved
    assert keys["conv"] not in saved and keys["conv"] not in held
    # BatchNorm and its in-place Scale run fused (one batch_norm with the affine: the Scale
    # passes the BatchNorm's top through), so they make one version; the others are distinct
    # storages: no layer of the chain returned its bottom's memory
    assert tops["bn"] is tops["scale"]
    assert len({keys[n] for n in ("conv", "relu", "drop", "bn")}) == 4
    loss.backward()
    assert net.layer_dict["conv"].blobs[0].grad is not None


def test_in_place_chain_saves_no_more_than_hand_written():
    net, feed = chain_net()
    _, trainer = memory.saved_for_backward(lambda: net.run(inputs=feed), memory.module_state(net))
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 6, 3)
    gamma, beta = torch.nn.Parameter(torch.ones(6)), torch.nn.Parameter(torch.zeros(6))
    ip = torch.nn.Linear(6 * 6 * 6, 5)
    x, y = feed["data"], feed["label"].long()

    def forward():
        h = F.dropout(F.relu(conv(x)), 0.5, True)
        h = F.batch_norm(h, None, None, training=True)
        h = h * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)
        return F.cross_entropy(ip(h.flatten(1)), y)
    _, hand = memory.saved_for_backward(
        forward, list(conv.parameters()) + list(ip.parameters()) + [gamma, beta])
    assert sum(trainer.values()) <= 1.05 * sum(hand.values()), (trainer, hand)


def test_pycaffe_forward_keeps_the_first_version_for_its_diff():
    """net.forward() (retain): blobs[name].diff of an in-place blob is the first version's, as in
    Caffe, whose backward writes the chain's bottom diff into the one shared blob."""
    net, feed = chain_net()
    net.forward(**{k: v.numpy() for k, v in feed.items()})
    assert net._first["conv"] is not net._data["conv"]
    net.backward()
    assert net.blobs["conv"].diff.any()


VIEWS = """
name: "Views"
layer { name: "data" type: "Input" top: "data"
  input_param { shape { dim: 2 dim: 3 dim: 4 dim: 4 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "flat" type: "Flatten" bottom: "conv" top: "flat" }
layer { name: "shape" type: "Reshape" bottom: "conv" top: "shape"
  reshape_param { shape { dim: 0 dim: -1 } } }
layer { name: "concat" type: "Concat" bottom: "flat" top: "cat" }
layer { name: "slice" type: "Slice" bottom: "shape" top: "s0" top: "s1" slice_param { axis: 0 } }
"""


def test_split_flatten_reshape_slice_are_views():
    """Where Caffe's top shares its bottom's data (Split, Flatten, Reshape, Slice along axis 0,
    a one-bottom Concat), ours is a view of the same storage."""
    net = Net(parse_text(VIEWS, caffe_pb2.NetParameter(), "views"), "TRAIN", log=False)
    net.run(inputs={"data": torch.rand(2, 3, 4, 4)})
    assert "conv_conv_0_split" in net.layer_names
    conv = memory.storage_key(net._data["conv"])[0]
    for name in ("conv_conv_0_split_0", "conv_conv_0_split_1", "flat", "shape", "cat",
                 "s0", "s1"):
        assert memory.storage_key(net._data[name])[0] == conv, name
    assert len(memory.net_blobs(net)) == 1
