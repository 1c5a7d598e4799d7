"""Fidelity: every run of refs/bvlc/solvers reproduces real Caffe's training log.

Each case (SGD with each lr policy, Nesterov, AdaGrad, RMSProp, Adam, clipping, L1, average_loss)
trains the same MLP for 100 iterations; losses, lr lines, clipping lines and test outputs must
match Caffe's `train.log` within 1e-3 relative, line by line. The error case must print Caffe's
reason as one fatal line and exit non-zero, without a traceback.
"""
import os
import shutil

import pytest

import caffelog
from conftest import refs_path
from test_lenet_fidelity import run_trainer

RUNS = ["sgd_step", "nesterov", "adagrad", "rmsprop", "adam", "sgd_clip", "sgd_l1", "sgd_poly",
        "sgd_exp", "sgd_sigmoid", "sgd_avgloss"]


def copy_case(tmp_path, name):
    src = refs_path("bvlc")
    shutil.copytree(os.path.join(src, "data"), tmp_path / "data")
    shutil.copytree(os.path.join(src, "solvers", name), tmp_path / "solvers" / name)
    case = tmp_path / "solvers" / name
    for f in case.iterdir():
        if f.name.startswith("mlp_iter_"):
            f.rename(case / ("caffe_" + f.name))
    return case


@pytest.mark.parametrize("name", RUNS)
def test_solver_log_matches_caffe(tmp_path, name):
    case = copy_case(tmp_path, name)
    proc = run_trainer(["train", "--solver=solver.prototxt", "--weights=init.caffemodel"], case)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = caffelog.parse(open(case / "train.log").read())
    ours = caffelog.parse(proc.stderr)
    assert caffelog.compare(ours, ref) == []
    assert (case / "mlp_iter_100.caffemodel").exists()
    assert (case / "mlp_iter_100.solverstate").exists()


def test_negative_sigmoid_gamma_is_refused(tmp_path):
    case = copy_case(tmp_path, "sgd_sigmoid_neg_gamma_error")
    proc = run_trainer(["train", "--solver=solver.prototxt", "--weights=init.caffemodel"], case)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    fatal = [l for l in proc.stderr.splitlines() if l.startswith("F")]
    assert len(fatal) == 1
    assert "sgd_solver.cpp:61] Check failed: this->param_.gamma() >= 0 (-0.1 vs. 0)" in fatal[0]
