"""The example configs train out of the box: `trainer train --solver=configs/<x>/solver.prototxt`
run from the repository root (as their READMEs say), shortened with `--iterations N`, learns:
the training loss goes down and the test accuracy ends well above chance (10 classes).

Each run uses a temporary copy of the config's solver whose snapshot_prefix points into tmp_path
(and a shorter test: test_interval N, 2 test batches), so nothing is written into configs/.
"""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from google.protobuf import text_format

import caffelog
from conftest import ROOT

CONFIGS = [
    # config dir, solver, iterations: enough to get well above chance on 2 CPU cores quickly
    ("lenet", "configs/lenet/solver.prototxt", 60),
    ("resnet_digits", "configs/resnet_digits/solver.prototxt", 40),
]


def run_trainer(args, cwd, timeout=300):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "cli"] + args, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _snapshot_files():
    out = set()
    for name, _, _ in CONFIGS:
        d = os.path.join(ROOT, "configs", name, "snapshots")
        if os.path.isdir(d):
            out |= {os.path.join(d, f) for f in os.listdir(d)}
    return out


@pytest.mark.parametrize("name,solver,iterations", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_config_trains_out_of_the_box(name, solver, iterations, tmp_path):
    from converters import caffe_pb2
    param = caffe_pb2.SolverParameter()
    text_format.Parse(open(os.path.join(ROOT, solver)).read(), param)
    assert not os.path.isabs(param.net) and os.path.exists(os.path.join(ROOT, param.net))
    param.snapshot_prefix = str(tmp_path / name)
    param.snapshot = 0
    param.display = 1
    param.test_interval = iterations
    del param.test_iter[:]
    param.test_iter.append(2)
    copy = tmp_path / "solver.prototxt"
    copy.write_text(text_format.MessageToString(param))
    before = _snapshot_files()

    proc = run_trainer(["train", "--solver=%s" % copy, "--iterations=%d" % iterations], ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = caffelog.parse(proc.stderr)

    losses = caffelog.iteration_losses(log)
    assert sorted(losses) == list(range(iterations))
    first = np.mean([losses[i] for i in range(5)])
    last = np.mean([losses[i] for i in range(iterations - 5, iterations)])
    assert first > 1.8 and last < 0.7 * first, (first, last)

    tests = [(int(m.group(1)), float(a.group(1)))
             for m, a in _test_passes(proc.stderr)]
    assert tests and tests[-1][0] == iterations, tests
    final_accuracy = tests[-1][1]
    assert final_accuracy > 0.35, tests           # chance is 0.1
    if len(tests) > 1:                            # LeNet tests at iteration 0 too
        assert tests[0][0] == 0 and final_accuracy > tests[0][1] + 0.2, tests

    assert (tmp_path / ("%s_iter_%d.caffemodel" % (name, iterations))).exists()
    assert (tmp_path / ("%s_iter_%d.solverstate" % (name, iterations))).exists()
    assert _snapshot_files() == before            # nothing written into configs/


def _test_passes(text):
    """(Testing-net match, accuracy match) per test pass, in order."""
    passes = []
    for block in re.split(r"(?=Iteration \d+, Testing net)", text)[1:]:
        m = re.match(r"Iteration (\d+), Testing net", block)
        a = re.search(r"Test net output #\d+: accuracy = (\S+)", block)
        if m and a:
            passes.append((m, a))
    return passes


def test_resnet_config_is_a_resnet():
    """The ResNet example uses what it claims: BatchNorm + Scale after bias-free convolutions,
    Eltwise SUM shortcuts, global average pooling, and learns nothing in BatchNorm."""
    from layers.net import Net
    net = Net(os.path.join(ROOT, "configs", "resnet_digits", "resnet_train_test.prototxt"),
              phase="TEST", log=False)
    types = net.layer_types
    assert types.count("Eltwise") == 3 and types.count("BatchNorm") == types.count("Scale") == 9
    assert {"Pooling", "InnerProduct", "SoftmaxWithLoss", "Accuracy", "ReLU"} <= set(types)
    assert net.blob_shapes["pool5"] == (100, 64, 1, 1)
    assert net.blob_shapes["res4a"] == (100, 64, 4, 4)
    conv = [net.layer_dict[n] for n, t in zip(net.layer_names, types) if t == "Convolution"]
    assert conv and all(len(c.blobs) == 1 for c in conv)          # bias_term: false
