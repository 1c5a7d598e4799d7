"""Fidelity: `trainer train` on refs/bvlc/lenet_sgd reproduces real Caffe's log and snapshot.

The case directory is copied to a temporary directory (snapshots are written next to the solver),
then the CLI runs exactly as Caffe was run: `train --solver=solver.prototxt
--weights=init.caffemodel` from inside the case directory.
"""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import caffelog
from conftest import ROOT, refs_path
from refcheck import backward_lines, mismatch


def run_trainer(args, cwd, timeout=600):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "cli"] + args, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return proc


@pytest.fixture(scope="module")
def lenet_case(tmp_path_factory):
    src = refs_path("bvlc")
    root = tmp_path_factory.mktemp("bvlc")
    shutil.copytree(os.path.join(src, "data"), root / "data")
    shutil.copytree(os.path.join(src, "lenet_sgd"), root / "lenet_sgd")
    case = root / "lenet_sgd"
    for f in case.iterdir():   # our own outputs must not be mistaken for Caffe's
        if f.name.startswith(("lenet_iter_", "lenet_resumed_iter_")):
            f.rename(case / ("caffe_" + f.name))
    proc = run_trainer(["train", "--solver=solver.prototxt", "--weights=init.caffemodel"], case)
    return case, proc


def test_exit_code(lenet_case):
    case, proc = lenet_case
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_log_matches_caffe_line_by_line(lenet_case):
    case, proc = lenet_case
    ref = caffelog.parse(open(case / "train.log").read())
    ours = caffelog.parse(proc.stderr)
    assert caffelog.compare(ours, ref) == []


def test_every_loss_and_lr(lenet_case):
    case, proc = lenet_case
    ref = caffelog.parse(open(case / "train.log").read())
    ours = caffelog.parse(proc.stderr)
    ref_losses, our_losses = caffelog.iteration_losses(ref), caffelog.iteration_losses(ours)
    assert sorted(our_losses) == sorted(ref_losses) == list(range(150))
    for it in ref_losses:
        assert abs(our_losses[it] - ref_losses[it]) <= 1e-3 * abs(ref_losses[it]), it


def test_needs_backward_lines(lenet_case):
    case, proc = lenet_case
    assert backward_lines(proc.stderr) == backward_lines(open(case / "train.log").read())


def test_snapshot_matches_caffe(lenet_case):
    from converters.caffemodel import blob_to_array, read_caffemodel, read_solverstate
    case, proc = lenet_case
    ours = read_caffemodel(str(case / "lenet_iter_150.caffemodel"))
    ref = read_caffemodel(str(case / "caffe_lenet_iter_150.caffemodel"))
    ref_layers = {l.name: l for l in ref.layer}
    compared = 0
    for layer in ours.layer:
        for i, blob in enumerate(layer.blobs):
            m = mismatch(blob_to_array(blob), blob_to_array(ref_layers[layer.name].blobs[i]),
                         rtol=1e-3, atol_scale=1e-4)
            assert m is None, (layer.name, i, m)
            compared += 1
    assert compared == 8
    s_ours = read_solverstate(str(case / "lenet_iter_150.solverstate"))
    s_ref = read_solverstate(str(case / "caffe_lenet_iter_150.solverstate"))
    assert s_ours.iter == s_ref.iter == 150
    assert len(s_ours.history) == len(s_ref.history)
    for h1, h2 in zip(s_ours.history, s_ref.history):
        assert mismatch(blob_to_array(h1), blob_to_array(h2), rtol=1e-3, atol_scale=1e-3) is None


def test_resume_from_caffe_solverstate(lenet_case):
    """`--snapshot` of Caffe's own solverstate: Caffe's data restarts from the first record."""
    case, proc = lenet_case
    assert proc.returncode == 0
    # Resume from Caffe's own files, under the names Caffe's solverstate refers to.
    for ext in (".caffemodel", ".solverstate"):
        shutil.copy(case / ("caffe_lenet_iter_150" + ext), case / ("lenet_iter_150" + ext))
    resumed = run_trainer(["train", "--solver=solver_resume.prototxt",
                           "--snapshot=lenet_iter_150.solverstate"], case)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ref = caffelog.parse(open(case / "train_resume.log").read())
    ours = caffelog.parse(resumed.stderr)
    # Our first run left a .trainer sidecar (data position) beside the name; it belongs to our
    # solverstate, not to Caffe's, so it must be ignored with a warning.
    warnings = [e for e in ours if e[0] == "W"]
    assert len(warnings) == 1 and "does not belong to this solverstate" in warnings[0][2]
    assert caffelog.compare([e for e in ours if e[0] != "W"], ref) == []


def _parse_log_like_caffe_tools(text):
    """What Caffe's tools/extra/parse_log.py extracts: its regexes, its 'Solving' start line and
    its timestamp parsing (month/day from the glog prefix, then the time)."""
    import re
    regex_iteration = re.compile(r"Iteration (\d+)")
    regex_train = re.compile(r"Train net output #(\d+): (\S+) = ([\.\deE+-]+)")
    regex_test = re.compile(r"Test net output #(\d+): (\S+) = ([\.\deE+-]+)")
    regex_lr = re.compile(r"lr = ([-+]?[0-9]*\.?[0-9]+([eE]?[-+]?[0-9]+)?)")
    started, iteration, rows = False, -1, []
    for line in text.splitlines():
        if "Solving" in line:
            started = True
            stamp = line.strip().split()[0:2]
            int(stamp[0][1:3]), int(stamp[0][3:5])       # month, day: must parse
        if not started:
            continue
        m = regex_iteration.search(line)
        if m:
            iteration = int(m.group(1))
        for kind, rx in (("train", regex_train), ("test", regex_test)):
            m = rx.search(line)
            if m:
                rows.append((kind, iteration, m.group(2), float(m.group(3))))
        m = regex_lr.search(line)
        if m:
            rows.append(("lr", iteration, "lr", float(m.group(1))))
    return started, rows


def test_caffe_parse_log_reads_our_log(lenet_case):
    case, proc = lenet_case
    ours_started, ours = _parse_log_like_caffe_tools(proc.stderr)
    ref_started, ref = _parse_log_like_caffe_tools(open(case / "train.log").read())
    assert ours_started and ref_started
    assert [r[:3] for r in ours] == [r[:3] for r in ref]
    for a, b in zip(ours, ref):
        assert abs(a[3] - b[3]) <= 1e-3 * abs(b[3]) + 1e-7, (a, b)
