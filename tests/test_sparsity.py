"""Issue 7, trap 4 (seed 004): `trainer train --keep-sparsity` keeps pruned weights pruned.

A LeNet-like net (configs/pruned) is pruned by magnitude with the config's script, then trained a
few iterations with SGD (momentum + weight decay) and with Adam: every weight that was zero in the
loaded caffemodel is exactly zero in the snapshot (and its solver history too), the others move,
and the log reports each layer's sparsity at start and at each snapshot. Without the flag the same
run revives pruned weights (so the check above is not vacuous). The masks are torch ops on the
params' device: the GPU path is the same code.
"""
import importlib.util
import os

import numpy as np
import pytest
import torch

from conftest import ROOT
from test_explain import run_cli

CONFIG = os.path.join(ROOT, "configs", "pruned")
NET = os.path.join(CONFIG, "lenet_train_test.prototxt")
PRUNED = ("conv1", "conv2", "ip1", "ip2")


def _prune_module():
    spec = importlib.util.spec_from_file_location("prune_caffemodel",
                                                  os.path.join(CONFIG, "prune_caffemodel.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A pruned caffemodel of the config's net (random init, 60% zeros, ip1 at 90%)."""
    from layers.net import Net
    root = tmp_path_factory.mktemp("pruned")
    old = os.getcwd()
    os.chdir(ROOT)
    try:
        torch.manual_seed(3)
        Net(NET, "TRAIN", log=False).save(str(root / "dense.caffemodel"))
    finally:
        os.chdir(old)
    report = _prune_module().prune_caffemodel(str(root / "dense.caffemodel"),
                                              str(root / "pruned.caffemodel"), 0.6,
                                              {"ip1": 0.9}, log=None)
    assert set(report) == set(PRUNED)
    return root, str(root / "pruned.caffemodel")


def _weights(path):
    from converters.caffemodel import blob_to_array, read_caffemodel
    return {lp.name: [blob_to_array(b) for b in lp.blobs] for lp in read_caffemodel(path).layer
            if len(lp.blobs)}


SOLVER = """net: "%(net)s"
type: "%(type)s"
base_lr: %(lr)s
momentum: 0.9
momentum2: 0.999
weight_decay: 0.01
lr_policy: "fixed"
display: 1
max_iter: 4
snapshot: 2
snapshot_prefix: "%(prefix)s"
random_seed: 5
"""


def _train(tmp_path, weights, kind, keep=True, lr="0.05"):
    net = tmp_path / "net.prototxt"          # the config's net with smaller batches (faster)
    net.write_text(open(NET).read().replace("batch_size: 64", "batch_size: 16"))
    solver = tmp_path / ("solver_%s.prototxt" % kind)
    prefix = tmp_path / ("run_%s_%s" % (kind, keep))
    solver.write_text(SOLVER % dict(net=net, type=kind, lr=lr, prefix=prefix))
    args = ["train", "--solver", str(solver), "--weights", weights]
    if keep:
        args.append("--keep-sparsity")
    res = run_cli(args)
    assert res.exit_code == 0, res.output[-3000:]
    return res.output, str(prefix)


@pytest.mark.parametrize("kind,lr", [("SGD", "0.05"), ("Adam", "0.01")])
def test_pruned_weights_stay_zero(tmp_path, pruned, kind, lr):
    from converters.caffemodel import blob_to_array, read_solverstate
    _, model = pruned
    before = _weights(model)
    log, prefix = _train(tmp_path, model, kind, lr=lr)
    after = _weights(prefix + "_iter_4.caffemodel")
    for name in PRUNED:
        w0, w1 = before[name][0], after[name][0]
        zero = w0 == 0
        assert zero.mean() > 0.55
        assert np.all(w1[zero] == 0), name                       # exactly zero, sign included
        assert not np.any(np.signbit(w1[zero])), name
        assert np.mean(w1[~zero] != w0[~zero]) > 0.9, name       # the others train
        assert not np.array_equal(before[name][1], after[name][1])   # biases are not masked
    # momentum / Adam histories of pruned weights stay zero too (one set per history kind)
    state = read_solverstate(prefix + "_iter_4.solverstate")
    hist = [blob_to_array(h) for h in state.history]
    n = len(hist) // (2 if kind == "Adam" else 1)
    order = [(name, i) for name in ("conv1", "conv2", "ip1", "ip2") for i in range(2)]
    assert n == len(order)
    for k in range(len(hist)):
        name, i = order[k % n]
        if i == 0:
            assert np.all(hist[k][before[name][0] == 0] == 0), (k, name)
            assert np.any(hist[k] != 0)
    # the log: per layer at start and at each snapshot (iterations 2 and 4)
    for name in PRUNED:
        zeros, total = int((before[name][0] == 0).sum()), before[name][0].size
        start = "Sparsity at start: layer %s: %d of %d weights are zero" % (name, zeros, total)
        snap = ("Sparsity at snapshot: layer %s: %d of %d weights are zero (%.2f%%), %d kept at "
                "zero" % (name, zeros, total, 100.0 * zeros / total, zeros))
        assert log.count(start) == 1, start
        assert log.count(snap) == 2, snap
    assert "--keep-sparsity: no weight" not in log
    mid = _weights(prefix + "_iter_2.caffemodel")
    for name in PRUNED:
        assert np.all(mid[name][0][before[name][0] == 0] == 0)


def test_without_the_flag_pruned_weights_revive(tmp_path, pruned):
    _, model = pruned
    before = _weights(model)
    log, prefix = _train(tmp_path, model, "SGD", keep=False)
    after = _weights(prefix + "_iter_4.caffemodel")
    revived = sum(int(np.sum(after[n][0][before[n][0] == 0] != 0)) for n in PRUNED)
    assert revived > 0
    assert "Sparsity at" not in log


def test_nothing_pruned_is_warned(tmp_path, pruned):
    root, _ = pruned
    log, _ = _train(tmp_path, str(root / "dense.caffemodel"), "SGD")
    warnings = [ln for ln in log.splitlines() if ln.startswith("W")]
    assert len(warnings) == 1 and "--keep-sparsity: no weight" in warnings[0]


def test_prune_weights_by_magnitude():
    prune = _prune_module()
    w = np.array([[0.5, -0.1, 0.3], [-0.7, 0.05, -0.2]], np.float32)
    out = prune.prune_weights(w, 0.5)
    np.testing.assert_array_equal(out, np.array([[0.5, 0, 0.3], [-0.7, 0, 0]], np.float32))
    assert np.all(prune.prune_weights(w, 0.0) == w)
    assert np.all(prune.prune_weights(w, 1.0) == 0)
