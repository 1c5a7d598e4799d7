"""Issue 6, "never a lost snapshot": signals, atomic snapshots under kill -9, exact resume.

* ``--sigint_effect`` / ``--sighup_effect`` (stop, snapshot, none; SIGTERM acts as SIGINT), with
  real signals sent to a `python -m cli train` subprocess once it is logging iterations;
* kill -9 at random moments while snapshots are written: every .caffemodel / .solverstate left
  under its final name parses, and every solverstate has its own .trainer sidecar;
* resuming from our own snapshot continues the log of the uninterrupted run exactly (losses, lr,
  smoothed loss over average_loss, multistep, Dropout's RNG, Data layer position, tests), and two
  runs with the same random_seed print the same numbers.
"""
import concurrent.futures
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT
from test_bad_inputs import LOG_LINE, make_lmdb, run_in_process

NET = """name: "tiny"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  transform_param { scale: 0.00390625 } data_param { source: "train_lmdb" batch_size: 8 backend: LMDB } }
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }
  transform_param { scale: 0.00390625 } data_param { source: "test_lmdb" batch_size: 10 backend: LMDB } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  inner_product_param { num_output: %(hidden)d weight_filler { type: "xavier" } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "drop1" type: "Dropout" bottom: "ip1" top: "ip1" dropout_param { dropout_ratio: 0.3 } }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param { num_output: 4 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
layer { name: "acc" type: "Accuracy" bottom: "ip2" bottom: "label" top: "acc" include { phase: TEST } }
"""

SOLVER = """net: "net.prototxt"
test_iter: 2
test_interval: %(test_interval)d
base_lr: 0.1
momentum: 0.9
weight_decay: 0.0005
lr_policy: "multistep"
stepvalue: 15
stepvalue: 25
gamma: 0.5
display: %(display)d
average_loss: 3
max_iter: %(max_iter)d
snapshot: %(snapshot)d
snapshot_prefix: "tiny"
random_seed: 1701
"""


def make_case(path, hidden=8, max_iter=30, snapshot=10, test_interval=10, display=1,
              shape=(1, 4, 4)):
    os.makedirs(path, exist_ok=True)
    make_lmdb(os.path.join(path, "train_lmdb"), n=36, shape=shape)
    make_lmdb(os.path.join(path, "test_lmdb"), n=20, shape=shape, seed=1)
    with open(os.path.join(path, "net.prototxt"), "w") as f:
        f.write(NET % {"hidden": hidden})
    with open(os.path.join(path, "solver.prototxt"), "w") as f:
        f.write(SOLVER % {"max_iter": max_iter, "snapshot": snapshot,
                          "test_interval": test_interval, "display": display})
    return str(path)


# ----------------------------------------------------------------------------- log helpers
THREAD_TAGS = ("data_layer.cpp:73", "blocking_queue.cpp:49")
TIMING = re.compile(r"\([^()]* iter/s, [^()]*s/(\d+) iters\)")


def log_entries(text):
    """(tag, text) of each glog line: timing, timestamps, thread ids and prefetch lines out."""
    out = []
    for line in text.splitlines():
        m = LOG_LINE.match(line)
        if m and m.group(5) not in THREAD_TAGS:
            out.append((m.group(1), m.group(5), TIMING.sub(r"(T iter/s, T/\1 iters)",
                                                           m.group(6))))
    return out


def from_iteration(entries, it):
    """The entries from the first "Iteration <it>" line on (the resumed part of a log)."""
    for i, (_, _, text) in enumerate(entries):
        if re.match(r"Iteration %d\b" % it, text):
            return entries[i:]
    raise AssertionError("no 'Iteration %d' line" % it)


def numbers(entries):
    """The logged numbers that matter: train losses, lr, test outputs."""
    keep = ("solver.cpp:239", "solver.cpp:258", "sgd_solver.cpp:112", "solver.cpp:414",
            "solver.cpp:327", "sgd_solver.cpp:50")
    return [e for e in entries if e[1] in keep]


# ----------------------------------------------------------------------------- resume
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    path = make_case(str(tmp_path_factory.mktemp("full")))
    res = run_in_process(["train", "--solver=solver.prototxt"], path)
    assert res.code == 0 and not res.lines("FE"), res.text[-3000:]
    return path, res


@pytest.mark.parametrize("at", [10, 20])
def test_resume_continues_the_same_log(uninterrupted, tmp_path, at):
    full_dir, full = uninterrupted
    path = make_case(str(tmp_path))
    for ext in (".caffemodel", ".solverstate", ".solverstate.trainer"):
        shutil.copy(os.path.join(full_dir, "tiny_iter_%d%s" % (at, ext)), path)
    res = run_in_process(["train", "--solver=solver.prototxt",
                          "--snapshot=tiny_iter_%d.solverstate" % at], path)
    assert res.code == 0 and not res.lines("FE"), res.text[-3000:]
    assert "Resuming from tiny_iter_%d.solverstate" % at in res.text
    assert not res.lines("W"), res.lines("W")
    ours = from_iteration(log_entries(res.text), at)
    ref = from_iteration(log_entries(full.text), at)
    assert len(numbers(ref)) > 3 * (30 - at)
    assert numbers(ours) == numbers(ref)
    assert ours == ref        # every line, snapshots and tests included
    # and the snapshots written after the resume are bit-identical to the uninterrupted run's
    for it in range(at + 10, 31, 10):
        for ext in (".caffemodel", ".solverstate"):
            a = open(os.path.join(path, "tiny_iter_%d%s" % (it, ext)), "rb").read()
            b = open(os.path.join(full_dir, "tiny_iter_%d%s" % (it, ext)), "rb").read()
            assert a == b, (it, ext)


def test_same_seed_same_numbers(uninterrupted, tmp_path):
    _, full = uninterrupted
    path = make_case(str(tmp_path))
    res = run_in_process(["train", "--solver=solver.prototxt"], path)
    assert res.code == 0, res.text[-3000:]
    assert log_entries(res.text) == log_entries(full.text)


def test_sidecar_of_another_solverstate_is_ignored(uninterrupted, tmp_path):
    """A stale .trainer beside a solverstate it does not belong to: W line, Caffe's resume."""
    full_dir, _ = uninterrupted
    path = make_case(str(tmp_path))
    for ext in (".caffemodel", ".solverstate"):
        shutil.copy(os.path.join(full_dir, "tiny_iter_10" + ext), path)
    shutil.copy(os.path.join(full_dir, "tiny_iter_20.solverstate.trainer"),
                os.path.join(path, "tiny_iter_10.solverstate.trainer"))
    res = run_in_process(["train", "--solver=solver.prototxt",
                          "--snapshot=tiny_iter_10.solverstate"], path)
    assert res.code == 0 and not res.lines("FE"), res.text[-3000:]
    assert len(res.lines("W")) == 1 and "tiny_iter_10.solverstate.trainer" in res.lines("W")[0]


def test_resume_from_another_directory(uninterrupted, tmp_path):
    """learned_net is relative to the run's directory; found beside the solverstate too."""
    full_dir, _ = uninterrupted
    path = make_case(str(tmp_path / "run"))
    os.makedirs(tmp_path / "keep")
    for ext in (".caffemodel", ".solverstate", ".solverstate.trainer"):
        shutil.copy(os.path.join(full_dir, "tiny_iter_20" + ext), tmp_path / "keep")
    res = run_in_process(["train", "--solver=solver.prototxt",
                          "--snapshot=../keep/tiny_iter_20.solverstate"], path)
    assert res.code == 0 and not res.lines("FE"), res.text[-3000:]


# ----------------------------------------------------------------------------- signals
class Training:
    """`python -m cli train` in a subprocess, its stderr collected line by line."""

    def __init__(self, path, extra=(), new_session=False):
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen([sys.executable, "-m", "cli", "train",
                                      "--solver=solver.prototxt"] + list(extra), cwd=path,
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, start_new_session=new_session)
        self.lines = []
        self.cond = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stderr:
            with self.cond:
                self.lines.append(line)
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def wait_for(self, pattern, start=0, timeout=120):
        """Index of the first line (from ``start``) matching ``pattern``."""
        rx = re.compile(pattern)
        deadline = time.time() + timeout
        with self.cond:
            while True:
                for i in range(start, len(self.lines)):
                    if rx.search(self.lines[i]):
                        return i
                if self.proc.poll() is not None and not self.reader.is_alive():
                    raise AssertionError("exited (%s) before %r:\n%s" % (
                        self.proc.returncode, pattern, "".join(self.lines[-30:])))
                left = deadline - time.time()
                if left <= 0:
                    raise AssertionError("timeout waiting for %r" % pattern)
                self.cond.wait(min(left, 0.5))

    def count(self):
        with self.cond:
            return len(self.lines)

    def send(self, sig):
        self.proc.send_signal(sig)

    def finish(self, timeout=120):
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self.reader.join(timeout=10)
        return "".join(self.lines)


ITER = r"solver\.cpp:239\] Iteration (\d+) "


def _stop_with(path, sig, extra=()):
    """Send ``sig`` once iterations are logged; the run must snapshot and stop early."""
    t = Training(path, extra)
    t.wait_for(r"Iteration 3 ")
    t.send(sig)
    log = t.finish()
    return t.proc.returncode, log


def _snapshot_then_stop(path, snap_sig, stop_sig, extra=()):
    """``snap_sig`` must snapshot and keep training; then ``stop_sig`` stops."""
    t = Training(path, extra)
    t.wait_for(r"Iteration 3 ")
    t.send(snap_sig)
    i = t.wait_for(r"Snapshotting solver state to binary proto file")
    t.wait_for(ITER, start=i + 1)       # still training after the snapshot
    t.send(stop_sig)
    log = t.finish()
    return t.proc.returncode, log


def _ignored_then_killed(path, sig, extra=()):
    """``sig`` must be ignored (effect none): training goes on; then SIGKILL."""
    t = Training(path, extra)
    t.wait_for(r"Iteration 3 ")
    t.send(sig)
    n = t.count()
    t.wait_for(r"Iteration \d+ ", start=n + 30)     # many more iterations logged
    t.proc.kill()
    log = t.finish()
    return t.proc.returncode, log


SCENARIOS = {
    "sigint_default_stops": (_stop_with, (signal.SIGINT,)),
    "sigterm_default_stops": (_stop_with, (signal.SIGTERM,)),
    "sighup_stop": (_stop_with, (signal.SIGHUP, ["--sighup_effect=stop"])),
    "sighup_default_snapshots": (_snapshot_then_stop, (signal.SIGHUP, signal.SIGINT)),
    "sigint_snapshot": (_snapshot_then_stop, (signal.SIGINT, signal.SIGHUP,
                                              ["--sigint_effect=snapshot",
                                               "--sighup_effect=stop"])),
    "sigint_none": (_ignored_then_killed, (signal.SIGINT, ["--sigint_effect=none"])),
    "sighup_none": (_ignored_then_killed, (signal.SIGHUP, ["--sighup_effect=none"])),
}


@pytest.fixture(scope="module")
def signal_runs(tmp_path_factory):
    """All the signal scenarios, run concurrently (each in its own directory)."""
    jobs = {}
    with concurrent.futures.ThreadPoolExecutor(len(SCENARIOS)) as pool:
        for name, (fn, args) in SCENARIOS.items():
            path = make_case(str(tmp_path_factory.mktemp(name)), max_iter=1000000,
                             snapshot=0, test_interval=0)
            jobs[name] = (path, pool.submit(fn, path, *args))
        return {name: (path, fut.result()) for name, (path, fut) in jobs.items()}


def _snapshots_in_log(log):
    return re.findall(r"Snapshotting to binary proto file (\S+)", log)


def _check_snapshot(path, model):
    from converters.caffemodel import read_caffemodel, read_solverstate
    it = int(re.search(r"_iter_(\d+)\.caffemodel$", model).group(1))
    net = read_caffemodel(os.path.join(path, model))
    assert [l.name for l in net.layer if l.blobs] == ["ip1", "ip2"]
    state = read_solverstate(os.path.join(path, model[:-len(".caffemodel")] + ".solverstate"))
    assert state.iter == it and state.learned_net == model
    return it


@pytest.mark.parametrize("name", ["sigint_default_stops", "sigterm_default_stops",
                                  "sighup_stop"])
def test_signal_stops_after_a_snapshot(signal_runs, name):
    path, (rc, log) = signal_runs[name]
    assert rc == 0, log[-3000:]
    assert "Traceback" not in log
    snaps = _snapshots_in_log(log)
    assert len(snaps) == 1, log[-3000:]
    it = _check_snapshot(path, snaps[0])
    assert it >= 3
    assert "Optimization stopped early." in log
    entries = log_entries(log)
    tail = [t for _, _, t in entries[-6:]]
    assert tail[-1] == "Optimization Done."            # caffe.cpp's last line
    assert "Optimization stopped early." in tail
    last_iter = max(int(m) for m in re.findall(ITER, log))
    assert last_iter == it - 1          # the iteration that was running finished, then stopped
    assert not [e for e in entries if e[0] in "EF"]


@pytest.mark.parametrize("name", ["sighup_default_snapshots", "sigint_snapshot"])
def test_signal_snapshots_and_continues(signal_runs, name):
    path, (rc, log) = signal_runs[name]
    assert rc == 0, log[-3000:]
    snaps = _snapshots_in_log(log)
    assert len(snaps) == 2, log[-3000:]     # the requested one, then the one of the stop
    first, second = (_check_snapshot(path, s) for s in snaps)
    assert 3 <= first < second
    before_stop = log[:log.index("Snapshotting to binary proto file " + snaps[1])]
    assert re.search(r"Iteration %d " % first, before_stop)    # it went on training
    assert "Optimization stopped early." in log


@pytest.mark.parametrize("name", ["sigint_none", "sighup_none"])
def test_signal_with_effect_none_is_ignored(signal_runs, name):
    path, (rc, log) = signal_runs[name]
    assert rc == -signal.SIGKILL
    assert not _snapshots_in_log(log)
    assert "stopped early" not in log
    assert not [f for f in os.listdir(path) if f.endswith((".caffemodel", ".solverstate"))]


# ----------------------------------------------------------------------------- kill -9
def test_kill_9_never_leaves_a_partial_snapshot(tmp_path):
    """Snapshots every iteration of a net with ~1 MB of weights, killed at random moments:
    whatever is under a final name is complete, and each solverstate has its sidecar."""
    from converters.caffemodel import read_caffemodel, read_solverstate
    path = make_case(str(tmp_path), hidden=1024, max_iter=1000000, snapshot=1,
                     test_interval=0, display=1, shape=(1, 16, 16))
    rng = random.Random(6)
    for attempt in range(3):
        t = Training(path)
        t.wait_for(r"Snapshotting solver state")
        time.sleep(rng.uniform(0.0, 0.6))
        t.proc.kill()
        t.finish()
    finals = [f for f in os.listdir(path) if f.endswith((".caffemodel", ".solverstate"))]
    assert any(f.endswith(".solverstate") for f in finals), os.listdir(path)
    for f in finals:
        full = os.path.join(path, f)
        if f.endswith(".caffemodel"):
            net = read_caffemodel(full)
            assert sum(len(l.blobs) for l in net.layer) == 4
        else:
            state = read_solverstate(full)
            assert len(state.history) == 4
            sidecar = json.load(open(full + ".trainer"))
            assert sidecar["solverstate_sha256"] == hashlib.sha256(
                open(full, "rb").read()).hexdigest()
            assert os.path.exists(os.path.join(path, state.learned_net))
    leftovers = [f for f in os.listdir(path) if ".tmp" in f]
    assert all(re.match(r"^\..+\.\d+\.\w+\.tmp$", f) for f in leftovers), leftovers
    assert all(oct(os.stat(os.path.join(path, f)).st_mode & 0o777) != "0o600" for f in finals)
    # the newest complete snapshot resumes
    states = sorted((f for f in finals if f.endswith(".solverstate")),
                    key=lambda f: int(re.search(r"_iter_(\d+)", f).group(1)))
    with open(os.path.join(path, "solver.prototxt")) as f:
        text = f.read()
    it = int(re.search(r"_iter_(\d+)", states[-1]).group(1))
    with open(os.path.join(path, "solver.prototxt"), "w") as f:
        f.write(text.replace("max_iter: 1000000", "max_iter: %d" % (it + 2))
                .replace("snapshot: 1\n", "snapshot: 0\n"))
    res = run_in_process(["train", "--solver=solver.prototxt", "--snapshot=" + states[-1]], path)
    assert res.code == 0 and not res.lines("FE"), res.text[-3000:]
    # and its snapshot removed the temporaries the killed writers left
    assert not [f for f in os.listdir(path) if f.endswith(".tmp")]


# ----------------------------------------------------------------------------- Ctrl-C elsewhere
def _entry(script):
    """Run ``cli.main.entry()`` in a subprocess after ``script`` patched it; (rc, stderr)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    code = "import os, signal, sys, time\nimport cli.main as m\n" + script + "\nm.entry()\n"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    return proc.returncode, proc.stderr


def test_ctrl_c_while_importing_ends_quietly():
    """Ctrl-C while torch and the layers import: the process ends as Caffe's would, no
    traceback from the middle of an import."""
    rc, err = _entry("m._register = lambda: os.kill(os.getpid(), signal.SIGINT)")
    assert rc == -signal.SIGINT, (rc, err)
    assert err == ""


def test_ctrl_c_in_a_command_is_one_f_line():
    rc, err = _entry("m._register = lambda: None\n"
                     "def interrupted(**kwargs):\n    raise KeyboardInterrupt\n"
                     "m.main = interrupted")
    assert rc == 130, (rc, err)
    lines = err.splitlines()
    assert len(lines) == 1 and LOG_LINE.match(lines[0]) and lines[0].startswith("F"), err
    assert lines[0].endswith("] Interrupted.")


def test_ctrl_c_during_shutdown_ends_quietly():
    """After the command (snapshot written), Ctrl-C while atexit hooks run (torch's, the data
    threads') ends the process without "Exception ignored in atexit callback" tracebacks."""
    rc, err = _entry("m._register = lambda: None\n"
                     "m.main = lambda **kwargs: None\n"
                     "import atexit\n"
                     "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), "
                     "time.sleep(5), print('not reached', file=sys.stderr)))")
    assert rc == -signal.SIGINT, (rc, err)
    assert err == ""


def test_each_signal_to_the_process_group_is_one_snapshot_with_two_processes(tmp_path):
    """`--cpu-procs 2`, SIGHUP to the whole process group (as a terminal or `kill -HUP -PGID`
    sends it) three times, then SIGINT: three snapshot sets and the stop's, not one per
    process copy of a signal that landed on different iterations."""
    path = make_case(str(tmp_path), max_iter=1000000, snapshot=0, test_interval=0)
    t = Training(path, ["--cpu-procs=2"], new_session=True)
    try:
        t.wait_for(r"Iteration 3 ")
        for k in range(3):
            os.killpg(t.proc.pid, signal.SIGHUP)
            t.wait_for(r"Snapshotting solver state", start=0 if k == 0 else t.count() - 1)
            time.sleep(1.0)
        os.killpg(t.proc.pid, signal.SIGINT)
    finally:
        log = t.finish()
    assert t.proc.returncode == 0, log[-3000:]
    models = _snapshots_in_log(log)
    assert len(models) == 4, models
    assert len(set(models)) == 4 and all(os.path.exists(os.path.join(path, m)) for m in models)
