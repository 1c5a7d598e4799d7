"""Issue 7, trap 3 (seed 002): params shared by name.

As in Caffe, a param shared by ``param { name }`` is one tensor: the gradients of all its users
are summed into it, the solver updates it once with one learning rate, and the .solverstate holds
one history blob for it. Mismatched lr_mult / decay_mult / shapes are refused with an error naming
the param, both layers and the way out. configs/shared_weights trains out of the box.
"""
import os

import numpy as np
import pytest
import torch

from conftest import ROOT

CONFIG = os.path.join(ROOT, "configs", "shared_weights")
NET = os.path.join(CONFIG, "shared_train_test.prototxt")


def _input_net(text_edit=None, unshare=False):
    """The config's net with its Data layers replaced by an Input layer (fed by the test)."""
    from converters import caffe_pb2
    from converters.prototxt import parse_text, read_net
    param = read_net(NET)
    layers = [lp for lp in param.layer if lp.type != "Data"]
    del param.layer[:]
    inp = param.layer.add()
    parse_text('name: "pairs" type: "Input" top: "pair_data" top: "label" input_param { '
               'shape { dim: 6 dim: 2 dim: 1 dim: 16 } shape { dim: 6 } }', inp)
    for lp in layers:
        param.layer.add().CopyFrom(lp)
    if unshare:
        for lp in param.layer:
            for spec in lp.param:
                spec.ClearField("name")
    if text_edit:
        text_edit(param)
    return param


def _inputs(seed=0):
    rng = np.random.RandomState(seed)
    return {"pair_data": rng.rand(6, 2, 1, 16).astype(np.float32),
            "label": rng.randint(0, 10, size=6).astype(np.float32)}


def test_shared_params_are_one_tensor_and_gradients_add_up():
    from layers.net import Net
    torch.manual_seed(0)
    shared = Net(_input_net(), "TRAIN", log=False)
    a, b = shared.layer_dict["ip1_a"], shared.layer_dict["ip1_b"]
    assert a.blobs[0] is b.blobs[0] and a.blobs[1] is b.blobs[1]
    names = [p.name for p in shared.learnable_params]
    assert names.count("ip1_w") == 1 and names.count("ip1_b") == 1
    assert len(shared.learnable_params) == 4          # ip1_w, ip1_b, joint_ip weights and bias
    # the same net with four independent tensors holding the same values
    plain = Net(_input_net(unshare=True), "TRAIN", log=False)
    for name in ("ip1_a", "ip1_b", "joint_ip"):
        src = shared.layer_dict[name]
        for dst, s in zip(plain.layer_dict[name].blobs, src.blobs):
            with torch.no_grad():
                dst.copy_(s)
    feed = _inputs()
    shared.forward(**feed)
    shared.backward()
    plain.forward(**feed)
    plain.backward()
    for i in range(2):
        total = plain.params["ip1_a"][i].diff + plain.params["ip1_b"][i].diff
        np.testing.assert_allclose(shared.params["ip1_a"][i].diff, total, rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(shared.params["ip1_b"][i].diff,
                                      shared.params["ip1_a"][i].diff)
        assert np.abs(plain.params["ip1_b"][i].diff).sum() > 0    # both users contribute


def test_solver_updates_once_and_keeps_one_history_blob(tmp_path, monkeypatch, glog_capture):
    """SGD without momentum or decay: one iteration moves ip1_w by exactly lr * lr_mult * (sum
    of both users' gradients); the solverstate has one history blob per shared param."""
    from converters.caffemodel import blob_to_array, read_caffemodel, read_solverstate
    from converters.prototxt import read_solver
    from layers.net import Net
    from solvers.solver import Solver
    monkeypatch.chdir(ROOT)
    param = read_solver(os.path.join(CONFIG, "solver.prototxt"))
    param.max_iter = 1
    param.snapshot = 1
    param.momentum = 0
    param.weight_decay = 0
    param.test_interval = 0
    del param.test_iter[:]
    param.snapshot_prefix = str(tmp_path / "shared")
    solver = Solver(param, log_net=False)
    w0 = solver.net.layer_dict["ip1_a"].blobs[0].detach().clone()
    # the gradient of the first batch, from an independent net with the same weights
    probe = Net(NET, "TRAIN", log=False)
    for name in ("ip1_a", "joint_ip"):
        for dst, src in zip(probe.layer_dict[name].blobs, solver.net.layer_dict[name].blobs):
            with torch.no_grad():
                dst.copy_(src)
    probe.forward()
    probe.backward()
    grad = torch.from_numpy(probe.params["ip1_a"][0].diff.copy())
    solver.solve()
    w1 = solver.net.layer_dict["ip1_a"].blobs[0].detach()
    torch.testing.assert_close(w0 - w1, np.float32(param.base_lr) * grad, rtol=1e-4, atol=1e-7)
    state = read_solverstate(str(tmp_path / "shared_iter_1.solverstate"))
    shapes = [blob_to_array(h).shape for h in state.history]
    assert shapes == [(10, 16), (10,), (30, 20), (30,)]
    model = read_caffemodel(str(tmp_path / "shared_iter_1.caffemodel"))
    blobs = {lp.name: [blob_to_array(b) for b in lp.blobs] for lp in model.layer}
    np.testing.assert_array_equal(blobs["ip1_a"][0], blobs["ip1_b"][0])   # Caffe writes both


def _error(edit):
    from converters.errors import CaffeError
    from layers.net import Net
    with pytest.raises(CaffeError) as info:
        Net(_input_net(edit), "TRAIN", log=False)
    return info.value.message


def _ip1_b(param):
    return [lp for lp in param.layer if lp.name == "ip1_b"][0]


def test_seed_lr_mult_mismatch_names_both_layers_and_the_way_out():
    def seed(param):                     # the seed's own numbers: 1 / 2 against 10 / 20
        _ip1_b(param).param[0].lr_mult = 10
        _ip1_b(param).param[1].lr_mult = 20
    msg = _error(seed)
    assert "'ip1_w'" in msg and "'ip1_a'" in msg and "'ip1_b'" in msg
    assert "lr_mult" in msg and "same lr_mult" in msg


def test_decay_mult_mismatch_names_both_layers_and_the_way_out():
    def edit(param):
        for lp in param.layer:
            if lp.name in ("ip1_a", "ip1_b"):
                lp.param[0].decay_mult = 1 if lp.name == "ip1_a" else 0
    msg = _error(edit)
    assert "'ip1_w'" in msg and "'ip1_a'" in msg and "'ip1_b'" in msg
    assert "decay_mult" in msg and "same decay_mult" in msg


def test_shape_mismatch_names_both_layers():
    def edit(param):
        _ip1_b(param).inner_product_param.num_output = 12
    msg = _error(edit)
    assert "'ip1_w'" in msg and "'ip1_a'" in msg and "'ip1_b'" in msg
    assert "10 16" in msg and "12 16" in msg


def test_lr_mult_on_the_owner_only_is_accepted():
    from layers.net import Net

    def edit(param):
        for spec in _ip1_b(param).param:
            spec.ClearField("lr_mult")
    net = Net(_input_net(edit), "TRAIN", log=False)
    lr = {p.name: p.lr_mult for p in net.learnable_params}
    assert lr["ip1_w"] == 1 and lr["ip1_b"] == 2


def test_config_trains_out_of_the_box(tmp_path, monkeypatch, glog_capture):
    from converters.prototxt import read_solver
    from solvers.solver import Solver
    monkeypatch.chdir(ROOT)
    param = read_solver(os.path.join(CONFIG, "solver.prototxt"))
    param.max_iter = 40
    param.display = 0
    param.test_interval = 40
    param.snapshot = 0
    param.snapshot_after_train = False
    solver = Solver(param, log_net=False)
    solver.solve()
    log = glog_capture.getvalue()
    acc = [float(ln.rsplit("=", 1)[1]) for ln in log.splitlines()
           if "Test net output #0: accuracy" in ln]
    assert acc[0] < 0.5 and acc[-1] > 0.9, acc


def test_param_frozen_through_a_sharer_computes_no_gradient():
    """Owner without lr_mult, sharer with lr_mult 0: the shared param's lr_mult is 0 (Caffe's
    AppendParam), so its weight gradient is not computed at all (requires_grad False)."""
    from converters import caffe_pb2
    from converters.prototxt import parse_text
    from layers.net import Net
    text = """
layer { name: "in" type: "Input" top: "a" top: "b" top: "label"
  input_param { shape { dim: 2 dim: 4 } shape { dim: 2 dim: 4 } shape { dim: 2 } } }
layer { name: "ip_a" type: "InnerProduct" bottom: "a" top: "pa" param { name: "w" }
  inner_product_param { num_output: 3 bias_term: false weight_filler { type: "xavier" } } }
layer { name: "ip_b" type: "InnerProduct" bottom: "b" top: "pb" param { name: "w" lr_mult: 0 }
  inner_product_param { num_output: 3 bias_term: false weight_filler { type: "xavier" } } }
layer { name: "sum" type: "Eltwise" bottom: "pa" bottom: "pb" top: "s" }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "s" bottom: "label" top: "loss" }
"""
    net = Net(parse_text(text, caffe_pb2.NetParameter()), "TRAIN", log=False)
    (w,) = net.learnable_params
    assert w.lr_mult == 0
    assert not w.tensor.requires_grad
