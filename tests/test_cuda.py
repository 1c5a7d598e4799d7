"""CUDA: the same numbers as the CPU (skipped without CUDA; run on a GPU machine).

* every net of refs/bvlc/layer_outputs, forward and backward, on CUDA equals the CPU result
  (every blob's data and diff, every param's data and diff) within float tolerance;
* LeNet (refs/bvlc/lenet_sgd) trained with `--gpu 0` logs the losses of the CPU run within 1e-3;
* `trainer time --gpu 0` works;
* the speed modes on CUDA (fp16 with loss scaling, bf16, channels-last, compile) stay close to
  fp32; two GPUs (when there are two) match one GPU with the doubled batch.

TF32 is off (Caffe's float32; torch lets cuDNN use TF32 by default): solvers.speed.configure_tf32.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, refs_path
from refcheck import mismatch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CASES = ["conv_pool", "activations", "structure", "norm", "losses", "noback"]


@pytest.fixture(autouse=True)
def caffe_float32():
    from solvers.speed import configure_tf32
    configure_tf32(False)
    yield


def run_trainer(args, cwd, timeout=900):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "cli"] + args, cwd=str(cwd), env=env,
                          capture_output=True, text=True, timeout=timeout)


def _run_net(case, device):
    from layers.net import Net
    root = refs_path("bvlc", "layer_outputs", case)
    meta = json.load(open(os.path.join(root, "meta.json")))
    ref = np.load(os.path.join(root, "outputs.npz"))
    cwd = os.getcwd()
    os.chdir(root)                 # Caffe resolves relative paths (infogain H) against the cwd
    try:
        net = Net("net.prototxt", meta["phase"], weights="init.caffemodel", log=False)
        net.to(device)
        inputs = {k[len("input__"):]: ref[k] for k in ref.files if k.startswith("input__")}
        net.forward(**inputs)
        diffs = {k[len("topdiff__"):]: ref[k] for k in ref.files if k.startswith("topdiff__")}
        net.backward(**diffs)
    finally:
        os.chdir(cwd)
    blobs = {}
    for name in net.blobs:
        blobs["data " + name] = net.blobs[name].data.copy()
        blobs["diff " + name] = net.blobs[name].diff.copy()
    for layer, views in net.params.items():
        for i, v in enumerate(views):
            blobs["param_data %s %d" % (layer, i)] = v.data.copy()
            blobs["param_diff %s %d" % (layer, i)] = v.diff.copy()
    return blobs, net


@pytest.mark.parametrize("case", CASES)
def test_layer_outputs_cuda_equals_cpu(case):
    cpu, _ = _run_net(case, "cpu")
    gpu, net = _run_net(case, "cuda")
    assert net.device.type == "cuda"
    assert sorted(cpu) == sorted(gpu)
    problems = {k: mismatch(gpu[k], cpu[k], rtol=1e-4, atol_scale=1e-5) for k in cpu}
    problems = {k: v for k, v in problems.items() if v}
    assert not problems, problems


def _losses(log):
    out = {}
    for m in re.finditer(r"solver\.cpp:239\] Iteration (\d+) \(.*\), loss = (\S+)", log):
        out[int(m.group(1))] = float(m.group(2))
    return out


def _test_outputs(log):
    return [float(m.group(1)) for m in re.finditer(r"Test net output #\d+: \S+ = (\S+)", log)]


@pytest.fixture(scope="module")
def lenet_runs(tmp_path_factory):
    src = refs_path("bvlc")
    out = {}
    for kind, extra in (("cpu", []), ("cuda", ["--gpu", "0"])):
        root = tmp_path_factory.mktemp("lenet_" + kind)
        shutil.copytree(os.path.join(src, "data"), root / "data")
        shutil.copytree(os.path.join(src, "lenet_sgd"), root / "lenet_sgd")
        case = root / "lenet_sgd"
        for f in case.iterdir():
            if f.name.startswith(("lenet_iter_", "lenet_resumed_iter_")):
                f.unlink()
        out[kind] = (case, run_trainer(["train", "--solver=solver.prototxt",
                                        "--weights=init.caffemodel"] + extra, case))
    return out


def test_lenet_trains_on_cuda(lenet_runs):
    case, proc = lenet_runs["cuda"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "caffe.cpp:213] Using GPUs 0" in proc.stderr
    assert os.path.exists(case / "lenet_iter_150.caffemodel")


def test_lenet_cuda_losses_match_cpu(lenet_runs):
    cpu = _losses(lenet_runs["cpu"][1].stderr)
    gpu = _losses(lenet_runs["cuda"][1].stderr)
    assert sorted(cpu) == sorted(gpu) == list(range(150))
    bad = {i: (gpu[i], cpu[i]) for i in cpu if abs(gpu[i] - cpu[i]) > 1e-3 * abs(cpu[i])}
    assert not bad, bad
    a, b = _test_outputs(lenet_runs["cpu"][1].stderr), _test_outputs(lenet_runs["cuda"][1].stderr)
    assert len(a) == len(b) > 0
    assert all(abs(x - y) <= 1e-3 * max(abs(x), abs(y)) + 1e-6 for x, y in zip(a, b)), (a, b)


def test_lenet_cuda_snapshot_matches_cpu(lenet_runs):
    from converters.caffemodel import blob_to_array, read_caffemodel
    a = read_caffemodel(str(lenet_runs["cpu"][0] / "lenet_iter_150.caffemodel"))
    b = read_caffemodel(str(lenet_runs["cuda"][0] / "lenet_iter_150.caffemodel"))
    for la, lb in zip(a.layer, b.layer):
        for x, y in zip(la.blobs, lb.blobs):
            assert mismatch(blob_to_array(y), blob_to_array(x), rtol=1e-3, atol_scale=1e-4) \
                is None, la.name


def test_time_on_gpu():
    case = refs_path("bvlc", "lenet_sgd")
    proc = run_trainer(["time", "--model", "lenet_train_test.prototxt", "--gpu", "0",
                        "--iterations", "5"], case)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "caffe.cpp:213] Using GPUs 0" in proc.stderr or "Use GPU" in proc.stderr
    assert re.search(r"Average Forward-Backward: \S+ ms\.", proc.stderr)
    assert "Iteration: 5 forward-backward time" in proc.stderr
    for name in ("conv1", "ip2", "loss"):
        assert re.search(r"\s%s\tforward: \S+ ms\." % name, proc.stderr), name


# ----------------------------------------------------------------------------- speed modes
@pytest.fixture
def lenet_param(tmp_path, monkeypatch):
    from converters.prototxt import read_solver
    src = refs_path("bvlc")
    shutil.copytree(os.path.join(src, "data"), tmp_path / "data")
    shutil.copytree(os.path.join(src, "lenet_sgd"), tmp_path / "lenet_sgd")
    monkeypatch.chdir(tmp_path / "lenet_sgd")
    param = read_solver("solver.prototxt")
    del param.weights[:]
    param.weights.append("init.caffemodel")
    return param


@pytest.mark.parametrize("options,bound", [
    (dict(amp="fp16"), 0.05), (dict(amp="bf16"), 0.05), (dict(channels_last=True), 1e-3),
    (dict(tf32=True), 1e-2)])
def test_speed_modes_on_cuda(lenet_param, options, bound):
    from solvers.speed import SpeedOptions, compare
    deviation, mode, ref = compare(lenet_param, SpeedOptions(**options), 50, device="cuda")
    assert len(mode) == len(ref) == 50
    assert deviation < bound, (options, deviation)


def test_fp16_loss_scaler_is_used_on_cuda(lenet_param):
    from solvers.solver import Solver
    from solvers.speed import SpeedOptions, apply, release
    solver = Solver(lenet_param, device="cuda", log_net=False)
    try:
        state = apply(solver, SpeedOptions(amp="fp16", check_iters=5), log=False)
        assert state.scaler is not None and state.amp_dtype == torch.float16
        solver.step(5)
        assert len(state.losses) == 5
        assert all(np.isfinite(state.losses))
        assert all(0.1 < x < 10 for x in state.losses)     # unscaled losses are logged
    finally:
        release(solver)


def test_compile_on_cuda(lenet_param):
    from solvers.speed import SpeedOptions, compare
    deviation, mode, ref = compare(lenet_param, SpeedOptions(compile=True), 10, device="cuda")
    assert deviation < 1e-3, (mode, ref)


# ----------------------------------------------------------------------------- two GPUs
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_match_one_gpu_with_doubled_batch(tmp_path):
    sys.path.insert(0, os.path.dirname(__file__))
    import test_parallel as tp
    one = tp.make_case(tmp_path, "one", batch=16)
    two = tp.make_case(tmp_path, "two", batch=8)
    p1 = run_trainer(["train", "--solver", str(one / "solver.prototxt"), "--gpu", "0"], one)
    p2 = run_trainer(["train", "--solver", str(two / "solver.prototxt"), "--gpu", "0,1"], two)
    assert p1.returncode == 0, p1.stderr[-3000:]
    assert p2.returncode == 0, p2.stderr[-3000:]
    assert "(NCCL), one per GPU: 0, 1" in p2.stderr
    a, b = tp.numbered_lines(p1.stderr), tp.numbered_lines(p2.stderr)
    assert len(a) == len(b) > 45
    bad = [(x, y) for x, y in zip(a, b) if not tp.close(x, y, 1e-4)]
    assert not bad, bad[:5]


@pytest.mark.parametrize("config", ["lenet", "resnet_digits", "number_plate_ssd"])
def test_no_cuda_sync_outside_read_iterations(config, monkeypatch):
    """The training loop on CUDA: no host sync except on the iterations that read the losses
    (torch's sync debug mode raises on any other). tests/test_host_reads.py checks the same
    on the CPU with a probe."""
    from test_host_reads import _param, _release
    from solvers.solver import Solver
    monkeypatch.chdir(ROOT)
    solver = Solver(_param(config, 40, batch=8), device="cuda:0", log_net=False)
    assert solver.sync_every == 16
    real_read = solver._read_losses

    def read_allowed(*args, **kwargs):
        torch.cuda.set_sync_debug_mode(0)
        try:
            return real_read(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("error")
    solver._read_losses = read_allowed
    try:
        solver.step(2)                      # warm-up: cuDNN autotuning, allocator
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            solver.step(20)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    finally:
        _release(solver)


def _smoke_cases():
    from test_layer_coverage import SMOKE
    return SMOKE


# Dropout draws its mask from the device's own RNG stream: same law, other numbers.
_RANDOM_ON_DEVICE = {"Dropout"}


@pytest.mark.parametrize("c", _smoke_cases())
def test_every_layer_type_cuda_equals_cpu(c, tmp_path):
    """Every implemented layer type (the smoke table of tests/test_layer_coverage.py): the same
    weights and inputs give the same tops, blob diffs and param diffs on CUDA as on the CPU."""
    from test_layer_coverage import run_smoke
    if c["type"] in _RANDOM_ON_DEVICE:
        pytest.skip("%s is random per device" % c["type"])
    results = []
    for device in ("cpu", "cuda:0"):
        where = tmp_path / device.replace(":", "")
        where.mkdir()
        net, outs, blobs, params = run_smoke(c, where, device)
        if device != "cpu":
            assert all(t.device.type == "cuda" for t in net._data.values()
                       if isinstance(t, torch.Tensor)), "a blob left the GPU"
        results.append((outs, blobs, params))
        del net
    (oc, bc, pc), (og, bg, pg) = results
    assert sorted(oc) == sorted(og) and sorted(bc) == sorted(bg) and sorted(pc) == sorted(pg)
    for kind, a, b in (("output", oc, og), ("diff", bc, bg)):
        for name in a:
            np.testing.assert_allclose(b[name], a[name], rtol=1e-4, atol=1e-5,
                                       err_msg="%s %s of %s" % (kind, name, c["type"]))
    for name in pc:
        for i, (x, y) in enumerate(zip(pc[name], pg[name])):
            np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-5,
                                       err_msg="param %d diff of %s (%s)" % (i, name, c["type"]))


@pytest.mark.parametrize("kwargs", [dict(), dict(global_stats=True), dict(bias="false")])
def test_batchnorm_scale_fused_equals_apart_on_cuda(kwargs):
    """On CUDA the fused pair can take cuDNN's batch norm (weight and bias given): it must still
    give what the two layers give apart."""
    from test_batchnorm_scale_fusion import FEED, assert_same_step, net_text, step, twins
    fused, plain = twins(net_text(**kwargs), device="cuda:0")
    assert len(fused._bn_scale_pairs) == 1
    for _ in range(2):
        assert_same_step(fused, plain, step(fused, FEED), step(plain, FEED))
