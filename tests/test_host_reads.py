"""The training loop reads nothing back from the device except what it logs (issue #5).

On a GPU every read of a tensor's value on the host (``float(t)``, ``.item()``, ``.cpu()``, a
boolean mask index, ``nonzero`` ...) waits for all queued kernels. ``Solver.step`` keeps each
iteration's loss on the device and reads the unread ones together every ``sync_every``
iterations (16 on a GPU, 1 on the CPU where reading is free), on display iterations, at
snapshots and at the end. These tests run on the CPU with ``sync_every = 16`` and watch every
host read with a ``TorchFunctionMode``: outside read iterations there must be none, in any
layer of the example nets. They also check that reading late changes no logged number and that
a NaN read late still saves a finite state. (tests/test_cuda.py checks the same on a GPU with
``torch.cuda.set_sync_debug_mode``.)
"""
import json
import os
import re
import traceback

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from conftest import ROOT

HOST_READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu",
              "numpy", "nonzero", "masked_select", "unique", "argwhere"}


class HostReads(TorchFunctionMode):
    """Records (iteration, solver.read_due, what, where) for every host read of a tensor."""

    def __init__(self, solver):
        super().__init__()
        self.solver = solver
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        masked = name in ("__getitem__", "__setitem__") and any(
            isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in args[1:2])
        if name in HOST_READS or masked:
            frame = traceback.extract_stack(limit=3)[0]
            self.seen.append((self.solver.iter, getattr(self.solver, "read_due", None), name,
                              "%s:%s" % (os.path.relpath(frame.filename, ROOT), frame.name)))
        return func(*args, **(kwargs or {}))


def _param(config, max_iter, batch=None, **fields):
    from converters.prototxt import read_net, read_solver
    path = os.path.join(ROOT, "configs", config, "solver.prototxt")
    param = read_solver(path)
    if batch:
        net = read_net(os.path.join(ROOT, param.net or param.train_net))
        for layer in net.layer:
            if layer.type in ("Data", "AnnotatedData"):
                layer.data_param.batch_size = batch
        param.ClearField("net")
        param.ClearField("train_net")
        param.net_param.CopyFrom(net)
    param.max_iter = max_iter
    param.test_interval = 0
    param.ClearField("test_iter")
    param.snapshot = 0
    param.snapshot_after_train = False
    param.display = 0
    for k, v in fields.items():
        setattr(param, k, v)
    return param


def _solver(param, sync_every):
    from solvers.solver import Solver
    solver = Solver(param, log_net=False)
    solver.sync_every = sync_every
    return solver


def _release(solver):
    from solvers.speed import release
    release(solver)


@pytest.mark.parametrize("config,iters", [("lenet", 18), ("resnet_digits", 18),
                                          ("number_plate_ssd", 18)])
def test_no_host_read_outside_read_iterations(config, iters, monkeypatch, glog_capture):
    monkeypatch.chdir(ROOT)
    solver = _solver(_param(config, iters, batch=4), sync_every=16)
    try:
        with HostReads(solver) as probe:
            solver.step(iters)
    finally:
        _release(solver)
    stray = [r for r in probe.seen if not r[1]
             # on the CPU the data layer's tops are the host batch itself; on a GPU MultiBoxLoss
             # reads the ground truth from the data layer's host_copy (test below)
             and not r[3].endswith("layers/ssd.py:forward")]
    assert not stray, stray
    reads = sorted({r[0] for r in probe.seen if r[1]})
    assert reads == [15, iters - 1], probe.seen
    assert not solver._unread and len(solver.losses) == solver.param.average_loss


def test_multibox_reads_ground_truth_from_the_host_copy():
    """A device gt top carries the data layer's host batch; MultiBoxLoss reads that, not the
    device tensor (which, on a GPU, would wait for the forward so far)."""
    from converters import caffe_pb2
    from converters.prototxt import parse_text
    from layers import registry
    text = ('name: "mbox_loss" type: "MultiBoxLoss" bottom: "loc" bottom: "conf" '
            'bottom: "prior" bottom: "label" top: "loss" multibox_loss_param { '
            'num_classes: 2 background_label_id: 0 overlap_threshold: 0.5 }')
    param = parse_text(text, caffe_pb2.LayerParameter(), "layer")
    layer = registry.get("MultiBoxLoss")(param, [(1, 8), (1, 4), (1, 2, 8), (1, 1, 1, 8)],
                                         "TRAIN")
    host = torch.tensor([[[[0, 1, 0, 0.1, 0.1, 0.4, 0.4, 0]]]], dtype=torch.float32)
    device_view = torch.full_like(host, float("nan"))   # what must not be read
    device_view.host_copy = host
    gts = layer._ground_truth(device_view, torch.device("cpu"), torch.float32)
    boxes, labels, _ = gts[0]
    assert labels == [1]
    assert torch.allclose(boxes, torch.tensor([[0.1, 0.1, 0.4, 0.4]]))


def _train_lines(solver, iters):
    from converters import glog
    import io
    buf = io.StringIO()
    glog.configure(stream=buf, min_level=0)
    try:
        solver.step(iters)
    finally:
        glog._State.stream = None
    return [re.sub(r"^\S+ \S+ \d+ ", "", line) for line in buf.getvalue().splitlines()
            if "loss = " in line and "iter/s" in line]


def test_reading_late_logs_the_same_numbers(monkeypatch, tmp_path):
    """sync_every 16 against 1: the same smoothed losses (average_loss window across reads),
    the same snapshot sidecar window, the same weights."""
    monkeypatch.chdir(ROOT)
    results = []
    for sync_every in (1, 16):
        prefix = str(tmp_path / ("s%d" % sync_every) / "lenet")
        os.makedirs(os.path.dirname(prefix))
        param = _param("lenet", 40, batch=16, display=10, average_loss=7, snapshot=25,
                       snapshot_prefix=prefix, random_seed=5)
        torch.manual_seed(5)
        solver = _solver(param, sync_every)
        try:
            lines = _train_lines(solver, 40)
            with open(prefix + "_iter_25.solverstate.trainer") as f:
                side = json.load(f)
            weights = [lp.tensor.detach().clone() for lp in solver.net.learnable_params]
        finally:
            _release(solver)
        results.append((lines, side["losses"], side["smoothed_loss"], weights))
    (a_lines, a_win, a_smooth, a_w), (b_lines, b_win, b_smooth, b_w) = results
    timing = re.compile(r"\(.* iter/s, .*s/\d+ iters\)")
    assert [timing.sub("", x) for x in a_lines] == [timing.sub("", x) for x in b_lines]
    assert len(a_lines) == 4
    assert a_win == b_win and len(a_win) == 7 and a_smooth == b_smooth
    for x, y in zip(a_w, b_w):
        assert torch.equal(x, y)


@pytest.mark.parametrize("sync_every,nan_at,expect_state", [
    (16, 1, 0),      # NaN read 14 iterations late: the start state (the only checkpoint)
    (1, 21, 15),     # read at once: the checkpoint taken at iteration 15
    (16, 21, 15),    # read at 31: the checkpoint of the read at 15
])
def test_nan_read_late_saves_the_last_checkpoint(monkeypatch, tmp_path, sync_every, nan_at,
                                                 expect_state):
    from converters.caffemodel import blob_to_array, read_caffemodel, read_solverstate
    from solvers.solver import NonFiniteLoss
    monkeypatch.chdir(ROOT)
    prefix = str(tmp_path / "lenet")
    # multistep: lr 0.01, then 1e30 from iteration nan_at - 1 (the loss of nan_at is NaN)
    param = _param("lenet", 40, batch=16, snapshot_prefix=prefix, lr_policy="multistep",
                   gamma=1e32, average_loss=20)
    param.stepvalue.append(nan_at - 1)
    solver = _solver(param, sync_every)
    try:
        with pytest.raises(NonFiniteLoss) as err:
            solver.step(40)
    finally:
        _release(solver)
    msg = str(err.value)
    it = int(re.match(r"Iteration (\d+): loss is", msg).group(1))
    assert it == nan_at, msg
    assert ("Read at iteration" in msg) == (sync_every > 1), msg
    name = "lenet_iter_%d_last_finite" % expect_state
    assert name + ".caffemodel" in msg, msg
    net = read_caffemodel(os.path.join(str(tmp_path), name + ".caffemodel"))
    assert all(np.isfinite(blob_to_array(b)).all() for layer in net.layer for b in layer.blobs)
    state = read_solverstate(os.path.join(str(tmp_path), name + ".solverstate"))
    assert state.iter == expect_state
    history = [blob_to_array(h) for h in state.history]
    assert all(np.isfinite(h).all() for h in history)
    assert (expect_state == 0) == all(not h.any() for h in history)   # real momentum after 0
    # the smoothing window of the state before iteration N: the losses of 0..N-1 (a resumed run
    # computes iteration N's again)
    with open(os.path.join(str(tmp_path), name + ".solverstate.trainer")) as f:
        assert len(json.load(f)["losses"]) == expect_state
