"""Issue 7, trap 2 (seed 001): "my frozen net still drifts".

configs/teacher_bn holds the user's teacher net (BatchNorm with use_global_stats unset, everything
else frozen, base_lr 0) and the same net with the answer's fix (use_global_stats: true). Trained for
a few iterations on the CPU: without the fix the test loss drifts and exactly one W line names the
BatchNorm; with the fix the test loss is the same at every test and no W line is printed.
"""
import os
import re

import numpy as np
import pytest
import torch

from conftest import ROOT

TEACHER = os.path.join(ROOT, "configs", "teacher_bn")
TEST_LOSS = re.compile(r"Test net output #0: tea_soft_loss = (\S+)")


def _train(solver_file, glog_capture, monkeypatch, base_lr=None, max_iter=4):
    from converters.prototxt import read_solver
    from solvers.solver import Solver
    monkeypatch.chdir(ROOT)           # the config's paths are relative to the repository root
    param = read_solver(os.path.join(TEACHER, solver_file))
    param.max_iter = max_iter
    if base_lr is not None:
        param.base_lr = base_lr
    solver = Solver(param, log_net=False)
    bn = solver.net.layer_dict["res2_1a_1_bn"]
    before = [b.detach().clone() for b in bn.blobs]
    solver.solve()
    after = [b.detach().clone() for b in bn.blobs]
    log = glog_capture.getvalue()
    warnings = [ln for ln in log.splitlines() if ln.startswith("W")]
    losses = [float(v) for v in TEST_LOSS.findall(log)]
    return warnings, losses, before, after


def test_seed_teacher_drifts_and_warns_once(glog_capture, monkeypatch):
    warnings, losses, before, after = _train("solver.prototxt", glog_capture, monkeypatch)
    assert len(warnings) == 1, warnings
    w = warnings[0]
    assert "'res2_1a_1_bn'" in w and "use_global_stats: true" in w and "base_lr is 0" in w
    # the seed's Scale freezes gamma only: the line says how to freeze its bias too
    assert "res2_1a_1_scale" in w and "bias" in w
    assert len(losses) == 5                       # iterations 0..4 (test_initialization + 4)
    assert len(set(losses)) > 1, losses           # drifts although base_lr is 0
    assert not torch.equal(before[0], after[0])   # running mean overwritten
    assert float(after[2]) != float(before[2])    # moving-average factor moved


def test_fixed_teacher_stays_fixed_without_warning(glog_capture, monkeypatch):
    warnings, losses, before, after = _train("solver_fixed.prototxt", glog_capture, monkeypatch)
    assert warnings == []
    assert len(losses) == 5
    assert len(set(losses)) == 1, losses
    for b, a in zip(before, after):
        assert torch.equal(b, a)


def test_teacher_with_nonzero_base_lr_still_warned(glog_capture, monkeypatch):
    """base_lr > 0: nothing connected to the BatchNorm trains (lr_mult 0, and the loss has
    loss_weight 0 so the Scale's bias gets no gradient): still a frozen teacher."""
    warnings, losses, _, _ = _train("solver.prototxt", glog_capture, monkeypatch, base_lr=0.1,
                                    max_iter=2)
    assert len(warnings) == 1 and "no layer above or below it trains" in warnings[0]
    assert len(set(losses)) > 1


# ----------------------------------------------------------------------------- unit cases
NET = """
layer { name: "data" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 4 dim: 3 dim: 8 dim: 8 } shape { dim: 4 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" %(conv)s
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" %(bn)s }
layer { name: "scale" type: "Scale" bottom: "conv" top: "conv" %(scale)s
  scale_param { bias_term: true } }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip" %(ip)s
  inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""
FROZEN = "param { lr_mult: 0 } param { lr_mult: 0 }"


def _found(base_lr=0.01, conv="", bn="", scale="", ip=""):
    from converters import caffe_pb2
    from converters.prototxt import parse_text
    from layers.net import Net
    from solvers.traps import frozen_batchnorm_layers
    text = NET % dict(conv=conv, bn=bn, scale=scale, ip=ip)
    net = Net(parse_text(text, caffe_pb2.NetParameter()), "TRAIN", log=False)
    return frozen_batchnorm_layers(net, base_lr)


def test_normal_finetuning_is_not_a_trap():
    assert _found() == []
    assert _found(conv=FROZEN) == []           # frozen backbone, trained head: BN adapts, fine


def test_use_global_stats_is_never_a_trap():
    assert _found(base_lr=0, bn="batch_norm_param { use_global_stats: true }") == []


def test_frozen_scale_is_a_trap_even_when_the_head_trains():
    found = _found(scale=FROZEN)
    assert len(found) == 1 and found[0][0] == "bn" and "'scale' is frozen" in found[0][1]


def test_everything_frozen_is_a_trap():
    found = _found(conv=FROZEN, scale=FROZEN, ip=FROZEN)
    assert len(found) == 1
    assert "no layer above or below it trains" in found[0][1]


def test_batchnorm_without_scale_in_a_frozen_backbone_is_a_trap():
    """Frozen conv -> BatchNorm (Caffe's idiomatic lr_mult 0 on its three blobs, no Scale) ->
    trained head: nothing of the backbone trains, yet its statistics move."""
    text = NET.replace('layer { name: "scale" type: "Scale" bottom: "conv" top: "conv" '
                       '%(scale)s\n  scale_param { bias_term: true } }\n', '')
    from converters import caffe_pb2
    from converters.prototxt import parse_text
    from layers.net import Net
    from solvers.traps import frozen_batchnorm_layers
    bn_idiom = " ".join(["param { lr_mult: 0 decay_mult: 0 }"] * 3)
    net = Net(parse_text(text % dict(conv=FROZEN, bn=bn_idiom, ip=""),
                         caffe_pb2.NetParameter()), "TRAIN", log=False)
    found = frozen_batchnorm_layers(net, 0.01)
    assert len(found) == 1 and "frozen part of the net" in found[0][1] and "'conv'" in found[0][1]
    unfrozen = Net(parse_text(text % dict(conv="", bn=bn_idiom, ip=""),
                              caffe_pb2.NetParameter()), "TRAIN", log=False)
    assert frozen_batchnorm_layers(unfrozen, 0.01) == []


def test_base_lr_zero_is_a_trap():
    found = _found(base_lr=0)
    assert len(found) == 1 and "base_lr is 0" in found[0][1]


def test_config_is_small_and_complete():
    total = 0
    for dirpath, _, files in os.walk(TEACHER):
        for f in files:
            total += os.path.getsize(os.path.join(dirpath, f))
    assert total < 2 * 1024 * 1024
    lines = open(os.path.join(TEACHER, "train.txt")).read().split("\n")
    assert all(os.path.isfile(os.path.join(TEACHER, "images", ln.split()[0]))
               for ln in lines if ln.strip())
    from converters.caffemodel import blob_to_array, read_caffemodel
    model = read_caffemodel(os.path.join(TEACHER, "teacher.caffemodel"))
    blobs = {lp.name: [blob_to_array(b) for b in lp.blobs] for lp in model.layer}
    assert float(blobs["res2_1a_1_bn"][2][0]) == 1.0          # moving-average factor 1
    assert np.all(blobs["res2_1a_1_bn"][1] > 0)


def test_unlearned_global_stats_are_reported():
    """Seed 003: use_global_stats true while training from scratch divides by sqrt(eps)."""
    from converters import caffe_pb2
    from converters.prototxt import parse_text
    from layers.net import Net
    from solvers.traps import unlearned_global_stats_layers
    text = """
    layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 dim: 4 dim: 4 } } }
    layer { name: "bn_fixed" type: "BatchNorm" bottom: "x" top: "a"
            batch_norm_param { use_global_stats: true } }
    layer { name: "bn_batch" type: "BatchNorm" bottom: "x" top: "b" }
    """
    net = Net(parse_text(text, caffe_pb2.NetParameter(), "t"), "TRAIN", log=False)
    assert unlearned_global_stats_layers(net) == ["bn_fixed"]
    import torch
    with torch.no_grad():
        net.layer_dict["bn_fixed"].blobs[2].fill_(1.0)     # statistics loaded from a caffemodel
    assert unlearned_global_stats_layers(net) == []
