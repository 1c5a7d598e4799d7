"""Multi-process data parallelism: Caffe's multi-GPU training (``caffe train --gpu 0,1``) on
``torch.distributed``.

What Caffe 1.0 does (``parallel.cpp`` NCCL / ``solver.cpp`` / ``data_layer.cpp``) and we reproduce:

* one solver per device (here: one process per device). ``Solver::Init`` seeds each with
  ``random_seed + rank``; the root's weights (fillers, ``--weights``, or a restored snapshot) are
  broadcast to the others before training.
* every solver reads its own batch: the Data layer of solver ``r`` of ``W`` keeps the records
  whose running offset satisfies ``offset % W == r`` (``DataLayer::Skip``). One iteration of the
  W processes therefore reads exactly the records one process with ``batch_size * W`` reads (the
  same set; interleaved between the processes, which a sum over the batch does not see).
* ``on_gradients_ready``: ``ncclAllReduce(sum)`` of every learnable diff, then
  ``caffe_gpu_scal(size, (Dtype)1.0 / solver_count, diff)``: a float32 multiply by
  ``float(1/W)``. The loss is not scaled; ``Normalize`` (sgd_solver.cpp) still divides by
  ``iter_size`` only. Each process then applies the same update to its own copy of the weights.
* only the root solver logs, tests and snapshots (test nets are built everywhere, used by the root).

Deliberate differences (documented in the report and README):

* Caffe's root logs its *own* loss and train outputs; we log the mean over the processes (packed
  into the same all-reduce as the gradients), so a W-process log equals a one-process log with
  ``batch_size * W`` (within float rounding) instead of showing one shard's numbers.
* SIGINT / SIGTERM / SIGHUP requests are agreed between the processes (in the same all-reduce)
  and acted on at the end of the same iteration by all of them, so a stop never deadlocks. The
  spawned processes leave the terminal's process group: the parent takes Ctrl-C and `kill` and
  hands them to process 0 only, so one signal is one snapshot.
* snapshots record the data position rounded up to the end of the current round of W shards,
  so a resume (with any number of processes) continues after the last record any process read.

Entry points: :func:`train_data_parallel` (``--gpu 0,1`` or ``--cpu-procs N``: spawns one process
per device with ``torch.multiprocessing``; NCCL on GPUs, gloo on the CPU) and
:func:`train_from_env` (under ``torchrun``: RANK / WORLD_SIZE / LOCAL_RANK in the environment,
one process per device across machines).
"""
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import traceback

import numpy as np
import torch
import torch.distributed as dist

from converters import caffe_pb2, glog
from converters.errors import CaffeError
from solvers.solver import Solver

_STOP, _SNAPSHOT = "stop", "snapshot"


# ----------------------------------------------------------------------------- environment
def env_world():
    """``(rank, world_size, local_rank)`` when launched by torchrun (or any launcher that sets
    RANK and WORLD_SIZE) with more than one process; None otherwise."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        rank = int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return None
    if world <= 1 or "RANK" not in os.environ:
        return None
    try:
        local = int(os.environ.get("LOCAL_RANK", str(rank)) or rank)
    except ValueError:
        local = rank
    return rank, world, local


def _timeout():
    """How long a process waits for the others in a collective (the root testing a large test
    set keeps the others waiting: NCCL's default of 10 minutes is too short for that).
    ``$TRAINER_DIST_TIMEOUT`` minutes, default 180."""
    import datetime
    try:
        minutes = float(os.environ.get("TRAINER_DIST_TIMEOUT", "180") or 180)
    except ValueError:
        minutes = 180.0
    return datetime.timedelta(minutes=minutes)


def quiet_unless_root(rank):
    """Caffe's ``LOG_IF(INFO, Caffe::root_solver())``: only rank 0 prints I and W lines."""
    if rank != 0:
        glog.configure(stream=glog._State.stream, min_level=max(2, glog._State.min_level),
                       year=glog._State.year)


# ----------------------------------------------------------------------------- the solver
class DataParallelSolver(Solver):
    """A :class:`Solver` that is process ``rank`` of ``world`` in a torch.distributed group
    (initialised by the caller). See the module docstring for the semantics."""

    def __init__(self, param, rank, world, device=None, keep_sparsity=False, **kwargs):
        self.rank, self.world = int(rank), int(world)
        self._pending = None
        if param.random_seed >= 0 and self.rank:
            # Solver::Init: Caffe::set_random_seed(param_.random_seed() + Caffe::solver_rank())
            seeded = caffe_pb2.SolverParameter()
            seeded.CopyFrom(param)
            seeded.random_seed = param.random_seed + self.rank
            param = seeded
        super().__init__(param, device=device, keep_sparsity=keep_sparsity, **kwargs)
        self.is_root = self.rank == 0
        if not self.is_root:             # Caffe: only the root solver runs TestAll()
            for net in self.test_nets:
                _close_data_layers(net)
            self.test_nets = []
        self._shard_data_layers()
        self._reducer = GradientAllReduce(self)
        self.hooks = dict(self.hooks)
        self.hooks["gradients_ready"] = [self._reducer] + list(
            self.hooks.get("gradients_ready", ()))

    def _shard_data_layers(self):
        for name, layer in self.net.layer_dict.items():
            if not getattr(layer, "is_data", False) or not hasattr(layer, "reset"):
                continue
            if hasattr(layer, "shard"):
                layer.shard(self.rank, self.world)
            elif type(layer).__name__ not in ("Input", "DummyData", "MemoryData"):
                glog.warning("Data layer %s (type %s) cannot be sharded between processes: every "
                             "process reads the same records (Caffe's multi-GPU training does the "
                             "same for this type)" % (name, type(layer).__name__))

    def broadcast_parameters(self):
        """The root's blobs (weights, BatchNorm statistics) to every process (Caffe's
        NCCL::Broadcast before training)."""
        seen = set()
        with torch.no_grad():
            for layer in self.net.layer_modules:
                for blob in layer.blobs:
                    if id(blob) in seen:
                        continue
                    seen.add(id(blob))
                    if blob.is_contiguous():
                        dist.broadcast(blob.data, 0)
                    else:
                        buf = blob.detach().contiguous()
                        dist.broadcast(buf, 0)
                        blob.data.copy_(buf)

    # -- root-only effects
    def snapshot(self, *args, **kwargs):
        if not self.is_root:
            return None
        return super().snapshot(*args, **kwargs)

    def _extra_state(self):
        state = super()._extra_state()
        # The root's data position is just past its own last record of the round; the other
        # processes read up to W-1 records further. Round up to the end of the round.
        for name, pos in state.get("data", {}).items():
            layer = self.net.layer_dict.get(name)
            if isinstance(pos, dict) and "offset" in pos and "index" in pos:
                state["data"][name] = _round_up_position(pos, self.world, layer)
        return state

    # -- the final "Iteration N, loss = ..." forward: the mean over the processes
    def _forward_loss(self):
        loss = super()._forward_loss()
        t = torch.tensor([loss], dtype=torch.float32, device=self._reducer.device)
        dist.all_reduce(t)
        t.mul_(self._reducer.scale)
        return float(t[0])

    # -- signals: agreed between the processes in the gradient all-reduce
    def request(self, action):
        if action == _STOP or (action == _SNAPSHOT and self._pending != _STOP):
            self._pending = action


def _round_up_position(pos, world, layer):
    pos = dict(pos)
    delta = (-int(pos["offset"])) % world
    if delta:
        entries = getattr(getattr(layer, "reader", None), "entries", None)
        pos["offset"] = int(pos["offset"]) + delta
        index = int(pos["index"]) + delta
        pos["index"] = index % entries if entries else index
        pos["key"] = None            # found again from the index
    return pos


def _close_data_layers(net):
    for layer in net.layer_modules:
        closer = getattr(layer, "close", None)
        if getattr(layer, "is_data", False) and closer is not None:
            try:
                closer()
            except Exception:  # pragma: no cover - best effort
                pass


class GradientAllReduce:
    """The ``gradients_ready`` hook: one all-reduce (sum) of [every learnable diff, the loss, the
    train outputs on display iterations, the stop/snapshot requests], then a float32 multiply by
    ``float(1 / W)`` (Caffe's ``caffe_gpu_scal(size, (Dtype)1.0 / solver_count, diff)``)."""

    def __init__(self, solver):
        self.solver = solver
        self.world = solver.world
        self.scale = float(np.float32(1.0) / np.float32(self.world))
        self.params = [lp.tensor for lp in solver.net.learnable_params
                       if lp.tensor.requires_grad and float(np.float32(lp.lr_mult)) != 0]

    @property
    def device(self):
        return self.solver.device

    def __call__(self, solver, loss):
        p = solver.param
        device = self.device
        display = bool(p.display) and solver.iter % p.display == 0
        grads = [t.grad for t in self.params]
        pieces = [g.reshape(-1) if g is not None else torch.zeros(t.numel(), device=t.device,
                                                                    dtype=t.dtype)
                  for t, g in zip(self.params, grads)]
        outputs = []
        if display:
            outputs = [name for name in solver.net.outputs if name in solver.net._data]
            pieces += [solver.net._data[name].detach().float().reshape(-1) for name in outputs]
        # The stop/snapshot requests ride along only when the solver reads its losses this
        # iteration (the same iterations in every process), so that reading them costs no host
        # sync of its own; a signal waits at most until the next read.
        read = solver.read_due
        flags = []
        if read:
            pending = solver._pending
            solver._pending = None
            flags = [1.0 if pending == _STOP else 0.0, 1.0 if pending == _SNAPSHOT else 0.0]
        pieces += [loss.reshape(1), torch.tensor(flags, dtype=torch.float32, device=device)]
        flat = torch.cat([x.to(device=device, dtype=torch.float32) for x in pieces])
        dist.all_reduce(flat)
        flat.mul_(self.scale)
        offset = 0
        with torch.no_grad():
            for t, g in zip(self.params, grads):
                n = t.numel()
                chunk = flat[offset:offset + n].view(t.shape)
                if g is None:
                    t.grad = chunk.to(t.dtype).clone(memory_format=torch.preserve_format)
                else:
                    g.copy_(chunk)
                offset += n
            for name in outputs:
                value = solver.net._data[name]
                n = value.numel()
                solver.net._data[name] = flat[offset:offset + n].view(value.shape).clone()
                offset += n
        loss = flat[offset].clone()
        if read:
            stop, snap = flat[offset + 1:offset + 3].tolist()
            if stop > 0:
                solver.requested = _STOP
            elif snap > 0:
                solver.requested = _SNAPSHOT
        return loss


# ----------------------------------------------------------------------------- one process
def run_rank(param, device, rank, world, snapshot="", keep_sparsity=False, speed=None,
             sigint_effect="stop", sighup_effect="snapshot", explain_backward=False):
    """Build this process's solver, agree on the weights, train. The process group must be
    initialised. Returns the solver. ``explain_backward``: the root logs the backward table
    (every process has the same net)."""
    if torch.device(device).type == "cuda":
        from solvers.speed import configure_tf32
        configure_tf32(bool(speed is not None and speed.tf32))
    solver = DataParallelSolver(param, rank, world, device=device,
                                keep_sparsity=keep_sparsity and not snapshot)
    if explain_backward and solver.is_root:
        from layers.explain import log_table
        log_table(solver.net)
    _install_signal_handlers(solver, sigint_effect, sighup_effect)
    if snapshot:
        glog.info("Resuming from " + snapshot, where="caffe.cpp:235")
        solver.restore(snapshot)
        if keep_sparsity:
            solver.keep_zeros()
    solver.broadcast_parameters()
    if speed is not None and speed.active():
        from solvers import speed as speed_modes
        speed_modes.apply(solver, speed)
    glog.info("Starting Optimization", where="caffe.cpp:239")
    solver.solve()
    dist.barrier()
    return solver


def _install_signal_handlers(solver, sigint_effect, sighup_effect):
    def handler(effect):
        def on_signal(signum, frame):
            if effect != "none":
                solver.request(effect)
        return on_signal
    signal.signal(signal.SIGINT, handler(sigint_effect))
    signal.signal(signal.SIGTERM, handler(sigint_effect))
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, handler(sighup_effect))


def _set_threads(world):
    if os.environ.get("OMP_NUM_THREADS"):
        return
    cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // max(1, world)))


def _report(exc, debug, index=0, error_dir=None):
    """The F line of a failed process; returns the exit status. Under ``trainer train --gpu
    0,1`` / ``--cpu-procs`` (``error_dir`` given) the processes print none: they leave it in
    ``error_dir`` and the parent prints one (:func:`_report_worker_error`), so an error every
    process meets (a bad net, a NaN) is one F line, and an error of one process (a corrupt
    record in its shard) is not hidden by the lost connection the others then report."""
    if debug:
        traceback.print_exc()
    if isinstance(exc, CaffeError):
        severity, message, where, status = exc.severity, exc.message, exc.where, 1
    else:
        text = str(exc).strip().splitlines()
        severity, message, where, status = "F", (
            "Internal error (%s: %s). Run again with --debug for the traceback and report it."
            % (type(exc).__name__, text[0] if text else "")), glog.caller_tag(0), 2
    if error_dir is None:
        glog.log(severity, message, where=where)
        return status
    path = os.path.join(error_dir, "error.%d" % index)
    with open(path + ".tmp", "w") as f:
        json.dump({"severity": severity, "message": message, "where": where,
                   "internal": status == 2}, f)
    os.replace(path + ".tmp", path)
    return status


def _report_worker_error(error_dir):
    """In the parent, after a process failed: one F line, the user's error (CaffeError) of the
    lowest process that has one, else the lowest process's internal error."""
    errors = []
    for name in os.listdir(error_dir):
        if re.fullmatch(r"error\.\d+", name):
            with open(os.path.join(error_dir, name)) as f:
                e = json.load(f)
            errors.append((e.get("internal", False), int(name.split(".")[1]), e))
    if not errors:
        return None
    e = min(errors, key=lambda x: x[:2])[2]
    glog.log(e["severity"], e["message"], where=e["where"])
    return 2 if e.get("internal") else 1


def _spawned(index, world, gpus, payload):
    """Entry of each process started by :func:`train_data_parallel`."""
    glog.configure(min_level=payload["min_level"], year=payload["year"])
    glog.capture_warnings()
    if hasattr(os, "setpgrp"):
        # Out of the terminal's process group: Ctrl-C (or a signal to the group) reaches the
        # parent only, which hands it to process 0; the request then reaches every process in
        # the all-reduce. Delivered to each process too, copies landing on different
        # iterations made one SIGHUP write two snapshots.
        os.setpgrp()
    quiet_unless_root(index)
    param = caffe_pb2.SolverParameter()
    param.ParseFromString(payload["param"])
    if gpus:
        device = torch.device("cuda", gpus[index])
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        _set_threads(world)
    if gpus:
        param.device_id = gpus[index]
    status = 0
    try:
        dist.init_process_group(backend, init_method=payload["init_method"], rank=index,
                                world_size=world, timeout=_timeout())
        run_rank(param, device, index, world, snapshot=payload["snapshot"],
                 keep_sparsity=payload["keep_sparsity"], speed=payload["speed"],
                 sigint_effect=payload["sigint_effect"], sighup_effect=payload["sighup_effect"],
                 explain_backward=payload["explain_backward"])
    except BaseException as exc:     # noqa: B902 - every failure becomes one F line + status
        if isinstance(exc, (SystemExit,)):
            status = exc.code if isinstance(exc.code, int) else 1
        elif isinstance(exc, KeyboardInterrupt):
            status = 130
        else:
            status = _report(exc, payload["debug"], index, payload["error_dir"])
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # pragma: no cover
                pass
    if status:
        sys.stderr.flush()
        os._exit(status)


def train_data_parallel(param, gpus, snapshot="", keep_sparsity=False, cpu_procs=0, speed=None,
                        sigint_effect="stop", sighup_effect="snapshot", debug=False,
                        explain_backward=False):
    """``caffe train --gpu 0,1``: one process per GPU (NCCL), or ``cpu_procs`` CPU processes
    (gloo) when ``gpus`` is empty. Blocks until training ends; exits with the first failing
    process's status."""
    import torch.multiprocessing as mp
    gpus = list(gpus or [])
    world = len(gpus) if gpus else int(cpu_procs)
    if world < 2:
        raise CaffeError("data parallel training needs at least 2 processes (got %d)" % world)
    if gpus and not torch.cuda.is_available():
        raise CaffeError("GPUs %s requested but CUDA is not available; use --cpu-procs N for "
                         "CPU processes" % ",".join(map(str, gpus)), where="caffe.cpp:105")
    if gpus:
        glog.info("Starting %d processes (NCCL), one per GPU: %s"
                  % (world, ", ".join(map(str, gpus))))
    else:
        glog.info("Starting %d CPU processes (gloo)" % world)
    tmp = tempfile.mkdtemp(prefix="trainer-dist-")
    payload = {
        "param": param.SerializeToString(),
        "snapshot": snapshot or "",
        "keep_sparsity": bool(keep_sparsity),
        "speed": speed,
        "sigint_effect": sigint_effect,
        "sighup_effect": sighup_effect,
        "debug": bool(debug),
        "explain_backward": bool(explain_backward),
        "init_method": "file://" + os.path.join(tmp, "rendezvous"),
        "error_dir": tmp,
        "min_level": glog._State.min_level,
        "year": glog._State.year,
    }
    # torch logs a warning for each sibling it terminates after one failed (the F line of the
    # failing process says what happened)
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
    context = mp.spawn(_spawned, args=(world, gpus, payload), nprocs=world, join=False)
    forwarded = {}

    def forward(signum, frame):        # `kill <parent>` and Ctrl-C reach process 0, which
        proc = context.processes[0]    # shares the request with the others
        if proc.is_alive():
            try:
                os.kill(proc.pid, signum)
            except OSError:
                pass
    signals = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP")
                                                 else [])
    for s in signals:
        forwarded[s] = signal.signal(s, forward)
    try:
        while not context.join():
            pass
    except mp.ProcessExitedException as exc:
        sys.stderr.flush()
        status = _report_worker_error(tmp)
        raise SystemExit(status or (exc.exit_code if exc.exit_code and exc.exit_code > 0 else 1))
    except mp.ProcessRaisedException as exc:   # pragma: no cover - _spawned reports its own
        raise CaffeError("a training process failed: %s" % str(exc).strip().splitlines()[-1])
    finally:
        for s, old in forwarded.items():
            signal.signal(s, old)
        shutil.rmtree(tmp, ignore_errors=True)
    glog.info("Optimization Done.", where="caffe.cpp:250")


def train_from_env(param, gpus=(), snapshot="", keep_sparsity=False, speed=None,
                   sigint_effect="stop", sighup_effect="snapshot", explain_backward=False):
    """Under ``torchrun``: this process is RANK of WORLD_SIZE (LOCAL_RANK on its machine); the
    rendezvous comes from MASTER_ADDR / MASTER_PORT (``env://``). GPU ``LOCAL_RANK`` (or
    ``gpus[LOCAL_RANK]`` when --gpu lists them) with NCCL when CUDA is available, else the CPU
    with gloo."""
    rank, world, local = env_world()
    quiet_unless_root(rank)
    if torch.cuda.is_available():
        gpu = list(gpus)[local] if gpus and local < len(gpus) else local
        device = torch.device("cuda", gpu)
        torch.cuda.set_device(device)
        param.device_id = gpu
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0) or world
        _set_threads(local_world)
    glog.info("Process %d of %d (local rank %d) on %s, %s" % (rank, world, local, device,
                                                             backend))
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                timeout=_timeout())
    try:
        run_rank(param, device, rank, world, snapshot=snapshot, keep_sparsity=keep_sparsity,
                 speed=speed, sigint_effect=sigint_effect, sighup_effect=sighup_effect,
                 explain_backward=explain_backward)
    finally:
        dist.destroy_process_group()
    glog.info("Optimization Done.", where="caffe.cpp:250")
