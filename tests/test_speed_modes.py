"""Opt-in speed modes (solvers/speed.py): how far their losses stray from fp32 on LeNet (CPU).

The example LeNet (configs/lenet, 28x28 digits, batch 64) is trained for a few iterations with
each mode and in fp32 from the same weights and data; the per-iteration losses must stay close.
"""
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

ITERS = 20


@pytest.fixture
def lenet_param(monkeypatch):
    from converters.prototxt import read_solver
    monkeypatch.chdir(ROOT)         # the example's paths are relative to the repository root
    path = os.path.join(ROOT, "configs", "lenet", "solver.prototxt")
    if not os.path.isdir(os.path.join(ROOT, "configs", "lenet", "digits_train_lmdb")):
        pytest.skip("configs/lenet data not present")
    param = read_solver(path)
    # LeNet as written, with batch 16 (fast on a busy CPU)
    from converters.prototxt import read_net
    net = read_net(os.path.join(ROOT, param.net))
    for layer in net.layer:
        if layer.type == "Data":
            layer.data_param.batch_size = 16
    param.ClearField("net")
    param.net_param.CopyFrom(net)
    return param


def test_bf16_autocast_on_cpu_stays_close(lenet_param, glog_capture):
    from solvers.speed import SpeedOptions, compare
    deviation, mode, ref = compare(lenet_param, SpeedOptions(amp="bf16"), ITERS)
    assert len(mode) == len(ref) == ITERS
    assert mode != ref                      # it really ran in bf16
    assert deviation < 0.05, deviation
    assert "Speed modes --amp bf16: the losses of the first %d iterations" % ITERS in \
        glog_capture.getvalue()


def test_fp16_on_cpu_runs_as_bf16_with_a_warning(lenet_param, glog_capture):
    from solvers.speed import SpeedOptions, amp_dtype
    assert amp_dtype("fp16", "cpu") == torch.bfloat16
    assert "no fast fp16" in glog_capture.getvalue()


def test_channels_last_on_cpu_stays_close(lenet_param):
    from solvers.speed import SpeedOptions, compare
    deviation, mode, ref = compare(lenet_param, SpeedOptions(channels_last=True), ITERS)
    assert len(mode) == ITERS
    # Same weights, same batch: only the kernels' summation order differs, so the first
    # losses agree to float32 rounding (a wrong layout or flatten order is off by O(1) here).
    assert abs(mode[0] - ref[0]) <= 1e-5 * abs(ref[0]), (mode[0], ref[0])
    # Later, a ReLU input within 1e-7 of zero can fall on the other side in one of the runs, and
    # at batch 16 one such flip moves the loss by ~1e-5 and the gap grows from there (up to
    # 2e-3 by iteration 20 on some CPUs and kernel ISAs): a bound for drift, not for a bug.
    assert deviation < 1e-2, deviation


def test_channels_last_layout_is_applied(lenet_param):
    from solvers.solver import Solver
    from solvers.speed import SpeedOptions, apply, release
    lenet_param.snapshot = 0
    lenet_param.snapshot_after_train = False
    lenet_param.snapshot_prefix = "/nonexistent/never_written"
    solver = Solver(lenet_param, log_net=False)
    try:
        apply(solver, SpeedOptions(channels_last=True, check_iters=0), log=False)
        conv = solver.net.layer_dict["conv2"].blobs[0]
        assert conv.is_contiguous(memory_format=torch.channels_last)
        # the test net shares the very same tensor
        assert solver.test_nets[0].layer_dict["conv2"].blobs[0] is conv
        solver.step(2)
        assert conv.is_contiguous(memory_format=torch.channels_last)
    finally:
        release(solver)


def test_compile_equals_eager(lenet_param, monkeypatch):
    """The straight-line graph torch.compile sees computes what Net.run computes (backend
    aot_eager: the graph capture without inductor's C++ compile, fast)."""
    from solvers.speed import SpeedOptions, compare
    monkeypatch.setenv("TRAINER_COMPILE_BACKEND", "aot_eager")
    deviation, mode, ref = compare(lenet_param, SpeedOptions(compile=True), 3)
    assert deviation < 1e-5, (mode, ref)


def test_compile_failure_falls_back_with_a_warning(lenet_param, monkeypatch, glog_capture):
    from solvers import speed

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")
    monkeypatch.setattr(torch, "compile", broken)
    deviation, mode, ref = speed.compare(lenet_param, speed.SpeedOptions(compile=True), 2)
    assert mode == ref
    # the traces run quietly; apply() with logging shows the W line
    from solvers.solver import Solver
    lenet_param.snapshot = 0
    lenet_param.snapshot_after_train = False
    lenet_param.snapshot_prefix = "/nonexistent/never_written"
    solver = Solver(lenet_param, log_net=False)
    try:
        state = speed.apply(solver, speed.SpeedOptions(compile=True, check_iters=0))
        assert not state.compiled
        log = glog_capture.getvalue()
        assert "--compile: torch.compile of net LeNet (TRAIN phase) failed, running it eagerly: " \
               "RuntimeError: no compiler here" in log
        assert any(line.startswith("W") for line in log.splitlines() if "--compile" in line)
        solver.step(1)
    finally:
        speed.release(solver)


def test_cli_reports_deviation_at_the_end(tmp_path, lenet_param):
    import shutil
    shutil.copytree(os.path.join(ROOT, "configs", "lenet"), tmp_path / "configs" / "lenet",
                    ignore=shutil.ignore_patterns("lenet_iter_*"))
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "cli", "train", "--solver", "configs/lenet/solver.prototxt",
         "--iterations", "6", "--channels-last", "--speed-check-iters", "4"],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert " speed.py:" in last, last
    assert "] Speed modes --channels-last: the losses of the first 4 iterations stray from the " \
           "fp32 run's by at most" in last, last
    value = float(last.split("at most ")[1].split()[0])
    assert value < 1e-3


def test_loss_scaler_unscales_and_skips_overflow(lenet_param, tmp_path):
    """The fp16 loss scaler (used on CUDA) exercised on the CPU: the logged loss and the
    gradients are unscaled, and an overflowing iteration skips its update and halves the scale."""
    from solvers.solver import Solver
    from solvers.speed import LossScaler, SpeedOptions, apply, release
    lenet_param.snapshot = 0
    lenet_param.snapshot_after_train = False
    lenet_param.test_interval = 0
    lenet_param.snapshot_prefix = str(tmp_path / "lenet")
    torch.manual_seed(3)
    plain = Solver(lenet_param, log_net=False)
    torch.manual_seed(3)
    scaled = Solver(lenet_param, log_net=False)
    try:
        ref = apply(plain, SpeedOptions(check_iters=3), log=False)
        state = apply(scaled, SpeedOptions(check_iters=3), log=False)
        scaler = LossScaler(scaled, init_scale=1024.0)
        # the recorder must see unscaled losses: the scaler's hook runs before it
        hooks = scaled.hooks["gradients_ready"]
        hooks.insert(0, hooks.pop(hooks.index(scaler)))
        plain.step(3)
        scaled.step(3)
        assert ref.losses == pytest.approx(state.losses, rel=1e-5)
        for a, b in zip(plain.net.learnable_params, scaled.net.learnable_params):
            assert torch.allclose(a.tensor, b.tensor, rtol=1e-4, atol=1e-6)
        # an overflow: inf gradient -> no update, scale halved
        before = [lp.tensor.detach().clone() for lp in scaled.net.learnable_params]
        def overflow(solver, loss):     # as an fp16 backward that overflowed
            scaled.net.learnable_params[0].tensor.grad.view(-1)[0] = float("inf")
            return loss
        hooks.insert(0, overflow)
        scaled.step(1)
        assert scaler.scale == 512.0 and not scaler.skip
        for t, b in zip(scaled.net.learnable_params, before):
            assert torch.equal(t.tensor.detach(), b)
    finally:
        release(plain)
        release(scaled)
