"""Data parallelism (solvers/parallel.py): `trainer train --cpu-procs 2` (gloo) against one process
with the doubled batch.

Caffe's multi-GPU semantics: each process reads its own batch (Data layer ``Skip``: records with
offset % W == rank), the gradients are summed and scaled by 1/W, every process applies the same
update. So two processes with batch B follow the same trajectory as one with batch 2B; our log
shows the mean loss / train outputs over the processes, so the whole log (losses, train and test
outputs) matches within float rounding.
"""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

NET = """
name: "TinyMLP"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  transform_param { scale: 0.00390625 }
  data_param { source: "%(train)s" batch_size: %(batch)d backend: LMDB } }
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }
  transform_param { scale: 0.00390625 }
  data_param { source: "%(test)s" batch_size: 25 backend: LMDB } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  param { lr_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  inner_product_param { num_output: 16 weight_filler { type: "xavier" }
                        bias_filler { type: "constant" value: 0.01 } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  param { lr_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "accuracy" type: "Accuracy" bottom: "ip2" bottom: "label" top: "accuracy"
  include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""

SOLVER = """
net: "%(net)s"
test_iter: 2
test_interval: 8
base_lr: 0.1
momentum: 0.9
weight_decay: 0.0005
lr_policy: "step"
gamma: 0.5
stepsize: 10
display: 1
max_iter: %(max_iter)d
snapshot: %(snapshot)d
snapshot_prefix: "%(prefix)s"
random_seed: 1701
"""


def _datum(arr, label):
    from converters import caffe_pb2
    d = caffe_pb2.Datum()
    d.channels, d.height, d.width = arr.shape
    d.data = arr.tobytes()
    d.label = int(label)
    return d.SerializeToString()


def _lmdb(path, n, seed):
    import lmdb
    rng = np.random.RandomState(seed)
    labels = rng.randint(0, 3, size=n)
    # images that depend on the label, so that the net learns something
    base = rng.randint(0, 256, size=(3, 1, 4, 4))
    images = np.clip(base[labels] + rng.randint(-60, 60, size=(n, 1, 4, 4)), 0, 255)
    env = lmdb.open(str(path), map_size=1 << 24, lock=False)
    with env.begin(write=True) as txn:
        for i in range(n):
            txn.put(("%08d" % i).encode(), _datum(images[i].astype(np.uint8), labels[i]))
    env.close()
    return str(path)


def make_case(tmp_path, name, batch, max_iter=20, snapshot=0):
    d = tmp_path / name
    d.mkdir()
    # 101 records: batches wrap around the database at different places for B and 2B
    train = _lmdb(tmp_path / ("train_%s" % name), 101, seed=1)
    test = _lmdb(tmp_path / ("test_%s" % name), 50, seed=2)
    (d / "net.prototxt").write_text(NET % {"train": train, "test": test, "batch": batch})
    (d / "solver.prototxt").write_text(SOLVER % {
        "net": str(d / "net.prototxt"), "max_iter": max_iter, "snapshot": snapshot,
        "prefix": str(d / "mlp")})
    return d


def run_trainer(args, cwd, timeout=600, extra_env=None):
    env = dict(os.environ)
    env.update(extra_env or {})
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "cli"] + args, cwd=str(cwd), env=env,
                          capture_output=True, text=True, timeout=timeout)


NUMBERED = re.compile(
    r"\] (Iteration \d+, loss = \S+|    Train net output #\d+: \S+ = \S+|"
    r"    Test net output #\d+: \S+ = \S+|Iteration \d+, Testing net \(#\d+\)|"
    r"Iteration \d+ \(.*\), loss = \S+)")


def numbered_lines(log):
    out = []
    for line in log.splitlines():
        m = NUMBERED.search(line)
        if m:
            text = re.sub(r"\(.* iters\)", "(T)", m.group(1))
            out.append(text)
    return out


NUMBER = re.compile(r"[-+]?\d*\.?\d+(?:e[-+]?\d+)?")


def close(a, b, rtol):
    ta, tb = NUMBER.split(a), NUMBER.split(b)
    na = [float(x) for x in NUMBER.findall(a)]
    nb = [float(x) for x in NUMBER.findall(b)]
    if ta != tb or len(na) != len(nb):
        return False
    return all(abs(x - y) <= rtol * max(abs(x), abs(y)) + 1e-7 for x, y in zip(na, nb))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parallel")
    one = make_case(tmp, "one", batch=16, snapshot=10)
    two = make_case(tmp, "two", batch=8, snapshot=10)
    p1 = run_trainer(["train", "--solver", str(one / "solver.prototxt")], one)
    p2 = run_trainer(["train", "--solver", str(two / "solver.prototxt"), "--cpu-procs", "2"], two)
    return tmp, one, two, p1, p2


def test_two_processes_exit_cleanly(runs):
    tmp, one, two, p1, p2 = runs
    assert p1.returncode == 0, p1.stderr[-3000:]
    assert p2.returncode == 0, p2.stderr[-3000:]
    assert "Starting 2 CPU processes (gloo)" in p2.stderr


def test_log_matches_one_process_with_doubled_batch(runs):
    tmp, one, two, p1, p2 = runs
    a, b = numbered_lines(p1.stderr), numbered_lines(p2.stderr)
    assert len(a) == len(b) > 45
    bad = [(x, y) for x, y in zip(a, b) if not close(x, y, 1e-4)]
    assert not bad, bad[:5]


def test_only_root_logs_and_snapshots(runs):
    tmp, one, two, p1, p2 = runs
    log = p2.stderr
    assert log.count("] Solving TinyMLP") == 1
    assert log.count("Snapshotting to binary proto file") == 2     # iterations 10 and 20
    assert log.count("] Optimization Done.") == 2                 # solver.cpp:332 + caffe.cpp:250
    pids = {m.group(1) for m in re.finditer(r"^I\d{4} \S+ +(\d+) (?:solver|net)\.cpp", log, re.M)}
    assert len(pids) == 1
    assert sorted(f.name for f in two.iterdir() if f.name.startswith("mlp_iter_")) == [
        "mlp_iter_10.caffemodel", "mlp_iter_10.solverstate", "mlp_iter_10.solverstate.trainer",
        "mlp_iter_20.caffemodel", "mlp_iter_20.solverstate", "mlp_iter_20.solverstate.trainer"]


def test_snapshot_weights_match_one_process(runs):
    from converters.caffemodel import blob_to_array, read_caffemodel
    tmp, one, two, p1, p2 = runs
    a = read_caffemodel(str(one / "mlp_iter_20.caffemodel"))
    b = read_caffemodel(str(two / "mlp_iter_20.caffemodel"))
    for la, lb in zip(a.layer, b.layer):
        for x, y in zip(la.blobs, lb.blobs):
            np.testing.assert_allclose(blob_to_array(y), blob_to_array(x), rtol=1e-4, atol=1e-6)


def test_resume_two_processes_continues_the_data(runs):
    """A 2-process run resumed from its iteration-10 snapshot logs what the uninterrupted run
    logged for iterations 10..20 (the data position is rounded up to the end of the round)."""
    tmp, one, two, p1, p2 = runs
    resumed = run_trainer(["train", "--solver", str(two / "solver.prototxt"), "--cpu-procs", "2",
                           "--snapshot", str(two / "mlp_iter_10.solverstate")], two)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    full = [x for x in numbered_lines(p2.stderr) if _iteration(x) is None or _iteration(x) > 10]
    again = [x for x in numbered_lines(resumed.stderr)
             if _iteration(x) is None or _iteration(x) > 10]
    tail = full[-len(again):]
    bad = [(x, y) for x, y in zip(again, tail) if not close(x, y, 1e-4)]
    assert not bad, bad[:5]


def _iteration(text):
    m = re.match(r"Iteration (\d+)", text)
    return int(m.group(1)) if m else None


def test_gpu_flag_without_cuda_is_refused_for_spawn():
    import torch
    from converters import caffe_pb2
    from converters.errors import CaffeError
    from solvers.parallel import train_data_parallel
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    with pytest.raises(CaffeError, match="--cpu-procs"):
        train_data_parallel(caffe_pb2.SolverParameter(), [0, 1])


def test_env_world(monkeypatch):
    from solvers.parallel import env_world
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert env_world() is None
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert env_world() == (2, 4, 0)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert env_world() is None


def test_torchrun_matches_spawned_processes(runs, tmp_path):
    """Under torchrun (RANK / WORLD_SIZE / LOCAL_RANK in the environment) the same run gives the
    same log as --cpu-procs 2."""
    import socket
    tmp, one, two, p1, p2 = runs
    case = make_case(tmp_path, "torchrun", batch=8, snapshot=10)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "cli", "train",
         "--solver", str(case / "solver.prototxt")],
        cwd=str(case), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Process 0 of 2 (local rank 0) on cpu, gloo" in proc.stderr
    assert "Process 1 of 2" not in proc.stderr          # rank 1 is quiet
    a, b = numbered_lines(p1.stderr), numbered_lines(proc.stderr)
    assert len(a) == len(b)
    bad = [(x, y) for x, y in zip(a, b) if not close(x, y, 1e-4)]
    assert not bad, bad[:5]


def test_explain_backward_is_logged_once_by_the_root(tmp_path):
    case = make_case(tmp_path, "explain", batch=8, snapshot=0)
    res = run_trainer(["train", "--solver", str(case / "solver.prototxt"), "--cpu-procs", "2",
                       "--iterations", "2", "--explain-backward"], case)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.count("Backward analysis (--explain-backward)") == 1, res.stderr[-3000:]
    assert res.stderr.index("Backward analysis") < res.stderr.index("Starting Optimization")


def test_late_loss_reads_keep_the_processes_in_step(tmp_path):
    """Losses read every 16 iterations (the GPU setting) with snapshots between reads: every
    process reads at the same iterations, so their all-reduces agree (the root's snapshot
    reads its own losses early; that must not shift its reads), and the log equals the one of
    reading every iteration."""
    logs = {}
    for every in ("1", "16"):
        case = make_case(tmp_path, "late%s" % every, batch=8, snapshot=5)
        solver = case / "solver.prototxt"
        solver.write_text(solver.read_text().replace("display: 1", "display: 20"))
        res = run_trainer(["train", "--solver", str(solver), "--cpu-procs", "2"], case,
                          extra_env={"TRAINER_LOSS_READ_EVERY": every})
        assert res.returncode == 0, res.stderr[-3000:]
        logs[every] = numbered_lines(res.stderr)
        assert sorted(p.name for p in case.glob("mlp_iter_*.caffemodel")) == [
            "mlp_iter_%d.caffemodel" % i for i in (10, 15, 20, 5)]
    assert logs["16"] == logs["1"] and len(logs["1"]) > 3


def test_an_error_every_process_meets_is_one_f_line(tmp_path):
    """A bad input fails in both processes alike: one F line (process 0's, or else the first
    other one's, printed by the parent), not one per process."""
    d = make_case(tmp_path, "bad", 4, max_iter=4)
    p = run_trainer(["train", "--solver=solver.prototxt", "--cpu-procs=2",
                     "--weights=nope.caffemodel"], d)
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    fatal = [l for l in p.stderr.splitlines() if l.startswith("F")]
    assert len(fatal) == 1 and "nope.caffemodel" in fatal[0], p.stderr[-3000:]
