"""Fidelity: `trainer test` reproduces real Caffe's `caffe test` output (refs lenet_sgd/test.log)."""
import os
import shutil

import caffelog
from conftest import refs_path
from test_lenet_fidelity import run_trainer


def test_caffe_test_log(tmp_path):
    src = refs_path("bvlc")
    shutil.copytree(os.path.join(src, "data"), tmp_path / "data")
    shutil.copytree(os.path.join(src, "lenet_sgd"), tmp_path / "lenet_sgd")
    case = tmp_path / "lenet_sgd"
    # Caffe's own spelling: single-dash gflags
    proc = run_trainer(["test", "-model", "lenet_train_test.prototxt",
                        "-weights", "lenet_iter_150.caffemodel", "-iterations", "3"], case)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = caffelog.parse(open(case / "test.log").read())
    ours = caffelog.parse(proc.stderr)
    assert caffelog.compare(ours, ref) == []
