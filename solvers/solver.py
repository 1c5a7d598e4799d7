"""Caffe's Solver: the training loop, tests, snapshots and restore.

Reproduces ``Solver::Solve`` / ``Step`` / ``Test`` / ``Snapshot`` and ``SGDSolver``'s state
handling, with Caffe's log lines (so a diff against a Caffe log lines up):

* each iteration: clear diffs, test if ``iter % test_interval == 0`` (and iteration 0 only with
  ``test_initialization``), ``iter_size`` forward/backward passes (loss averaged), the smoothed
  loss over ``average_loss`` iterations, display, the update (``solvers.updates``), snapshot;
* after the last iteration: snapshot (``snapshot_after_train``), one more TRAIN forward whose loss
  is logged ("Iteration N, loss = ..."), then the final test;
* test nets share the train net's blobs by layer name (``ShareTrainedLayersWith``), so they always
  see the current weights; test scores are averaged over ``test_iter`` batches.

Snapshots are real ``.caffemodel`` / ``.solverstate`` files (atomically written). What Caffe's
SolverState has no field for (data position, smoothed-loss window, RNG states) goes into a
``<solverstate>.trainer`` file beside it, which real Caffe ignores; a solverstate written by Caffe
has none, and resumes as Caffe resumes it: data from the first record.
"""
import hashlib
import json
import math
import os
import time

import numpy as np
import torch

from converters import caffe_pb2, glog
from converters.errors import CaffeError
from layers.net import Net
from solvers.lr_policy import LearningRate
from solvers.updates import make_update

SIGNAL_ACTIONS = ("stop", "snapshot", "none")
GPU_SYNC_EVERY = 16     # iterations between loss reads on a GPU (display iterations read too)
CHECKPOINT_EVERY = 16   # iterations between copies of the last finite state (for a NaN loss)


def _fmt(x):
    return glog.format_number(x)


class NonFiniteLoss(CaffeError):
    pass


class Solver:
    """Trains the net of a SolverParameter. ``solver_dir`` is where relative paths resolve
    (Caffe resolves them against the working directory; the CLI passes the cwd)."""

    def __init__(self, param, device=None, level=None, stages=None,
                 keep_sparsity=False, log_net=True, hooks=None):
        self.param = param
        self.device = torch.device(device or "cpu")
        self.iter = 0
        self.losses = []
        self.smoothed_loss = 0.0
        self.requested = None          # "stop" | "snapshot" set by signal handlers
        self.requested_early_exit = False
        # hooks: {"gradients_ready": [fn(solver, loss) -> loss]}; is_root: the one process that
        # logs iteration lines, tests and snapshots (Caffe's root_solver) in data parallelism.
        self.hooks = hooks or {}
        self.is_root = True
        self._unread = []              # losses still on the device (see step)
        self.read_due = True           # whether this iteration reads them (hooks look)
        self._checkpoint = None
        self._check_param()
        if param.random_seed >= 0:
            torch.manual_seed(param.random_seed)
            np.random.seed(param.random_seed % (2 ** 32))
        glog.info("Initializing solver from parameters: \n" + _solver_text(param),
                  where="solver.cpp:45")
        self.net = self._init_train_net(level, stages, log_net)
        # Caffe's solver loads ``weights`` (the caffe tool puts --weights there), comma-separated
        weights = [w for entry in param.weights for w in entry.split(",") if w]
        for w in weights:
            self._finetune(self.net, w)
        self.test_nets = self._init_test_nets(log_net)
        for net in self.test_nets:
            for w in weights:
                self._finetune(net, w)
            self._share_trained_layers(net)
        # how often (in iterations) losses are read to the host: every one on the CPU, where
        # reading costs nothing; on a GPU reading stalls the launch queue, so only now and then
        self.sync_every = 1 if self.device.type == "cpu" else GPU_SYNC_EVERY
        every = os.environ.get("TRAINER_LOSS_READ_EVERY", "").strip()
        if every:
            if not every.isdigit() or int(every) < 1:
                raise CaffeError("TRAINER_LOSS_READ_EVERY=%s: expected a whole number of "
                                 "iterations >= 1" % every)
            self.sync_every = int(every)
        self.net.to(self.device)
        for net in self.test_nets:
            net.to(self.device)
        self.lr = LearningRate(param)
        self.update = make_update(param, [p for p in self.net.learnable_params])
        self.keep_sparsity = False
        self.sparsity = None
        if keep_sparsity:
            self.keep_zeros()
        from solvers.traps import warn_frozen_batchnorm, warn_unlearned_global_stats
        warn_frozen_batchnorm(self.net, param)
        warn_unlearned_global_stats(self.net)
        glog.info("Solver scaffolding done.", where="solver.cpp:57")

    # ------------------------------------------------------------------ setup
    def _check_param(self):
        p = self.param
        given = [f for f in ("net", "net_param", "train_net", "train_net_param") if p.HasField(f)]
        if not given:
            raise CaffeError("Solver has no training net: give one of net, net_param, train_net "
                             "or train_net_param.", where="solver.cpp:84")
        if len(given) > 1:
            raise CaffeError("SolverParameter must not contain more than one of these fields "
                             "specifying a train net: net, net_param, train_net, "
                             "train_net_param (this one has %s)" % ", ".join(given))
        # Caffe would silently build no test net here; a test_interval without test_iter is
        # almost always a mistake, so it is refused before training.
        if p.test_interval and len(p.test_iter) == 0 and (p.HasField("net") or
                                                          p.HasField("net_param")):
            raise CaffeError("test_iter must be specified for each test network when "
                             "test_interval is set.", where="solver.cpp:165")
        if p.average_loss < 1:
            raise CaffeError("Check failed: average_loss >= 1 (%d vs. 1)" % p.average_loss,
                             where="solver.cpp:215")
        if p.iter_size < 1:
            raise CaffeError("Check failed: iter_size >= 1 (%d vs. 1)" % p.iter_size)
        prefix = p.snapshot_prefix
        if (p.snapshot or p.snapshot_after_train) and not prefix:
            raise CaffeError("In solver params, snapshot is specified but snapshot_prefix is not")
        if prefix and (p.snapshot or p.snapshot_after_train):
            check_snapshot_directory(prefix)

    def _read_net_param(self, path):
        from converters.prototxt import read_net
        return read_net(path)

    def _init_train_net(self, level, stages, log_net):
        p = self.param
        if p.HasField("train_net_param"):
            glog.info("Creating training net specified in train_net_param.", where="solver.cpp:91")
            net_param = caffe_pb2.NetParameter()
            net_param.CopyFrom(p.train_net_param)
        elif p.HasField("train_net"):
            glog.info("Creating training net from train_net file: " + p.train_net,
                      where="solver.cpp:95")
            net_param = self._read_net_param(p.train_net)
        elif p.HasField("net_param"):
            glog.info("Creating training net specified in net_param.", where="solver.cpp:99")
            net_param = caffe_pb2.NetParameter()
            net_param.CopyFrom(p.net_param)
        else:
            glog.info("Creating training net from net file: " + p.net, where="solver.cpp:102")
            net_param = self._read_net_param(p.net)
        state = caffe_pb2.NetState()
        state.phase = caffe_pb2.TRAIN
        state.MergeFrom(net_param.state)
        state.MergeFrom(p.train_state)
        if level is not None:
            state.level = level
        if stages:
            del state.stage[:]
            state.stage.extend(stages)
        net_param.state.CopyFrom(state)
        return Net(net_param, "TRAIN", log=log_net, source=p.net or p.train_net)

    def _init_test_nets(self, log_net):
        p = self.param
        sources = []
        for i, tp in enumerate(p.test_net_param):
            sources.append(("test_net_param", tp, None))
        for i, path in enumerate(p.test_net):
            sources.append(("test_net file", None, path))
        # The generic net (net / net_param) is tested once per test_iter beyond the test nets.
        has_generic = p.HasField("net") or p.HasField("net_param")
        num_generic = max(len(p.test_iter) - len(sources), 0) if has_generic else 0
        if len(p.test_iter) != len(sources) + num_generic:
            # As Caffe's CHECKs: a train_net with test_iter but no test_net is refused rather
            # than never tested.
            raise CaffeError("test_iter must be specified for each test network (%d test_iter "
                             "for %d test nets: test_net / test_net_param)"
                             % (len(p.test_iter), len(sources)), where="solver.cpp:165")
        if len(p.test_state) and len(p.test_state) != len(sources) + num_generic:
            raise CaffeError("test_state must be unspecified or specified once per test net.",
                             where="solver.cpp:173")
        nets = []
        for i in range(len(sources) + num_generic):
            if i < len(sources):
                kind, tp, path = sources[i]
                if tp is not None:
                    net_param = caffe_pb2.NetParameter()
                    net_param.CopyFrom(tp)
                    glog.info("Creating test net (#%d) specified by test_net_param" % i,
                              where="solver.cpp:186")
                else:
                    net_param = self._read_net_param(path)
                    glog.info("Creating test net (#%d) specified by test_net file: %s" % (i, path),
                              where="solver.cpp:186")
            elif p.HasField("net_param"):
                net_param = caffe_pb2.NetParameter()
                net_param.CopyFrom(p.net_param)
                glog.info("Creating test net (#%d) specified by net_param" % i,
                          where="solver.cpp:190")
            else:
                glog.info("Creating test net (#%d) specified by net file: %s" % (i, p.net),
                          where="solver.cpp:190")
                net_param = self._read_net_param(p.net)
            state = caffe_pb2.NetState()
            state.phase = caffe_pb2.TEST
            state.MergeFrom(net_param.state)
            if len(p.test_state):
                state.MergeFrom(p.test_state[i])
            net_param.state.CopyFrom(state)
            nets.append(Net(net_param, "TEST", log=log_net))
        return nets

    def _finetune(self, net, path):
        glog.info("Finetuning from " + path, where="solver.cpp:72")
        net.copy_from(path)

    def _share_trained_layers(self, test_net):
        """Caffe's ShareTrainedLayersWith: test layers use the train net's blobs by name."""
        train = self.net.layer_dict
        for li, name in enumerate(test_net.layer_names):
            src = train.get(name)
            if src is None:
                continue
            dst = test_net.layer_modules[li]
            if len(dst.blobs) != len(src.blobs):
                raise CaffeError("Incompatible number of blobs for layer %s" % name,
                                 where="net.cpp:740")
            for j in range(len(dst.blobs)):
                if tuple(dst.blobs[j].shape) != tuple(src.blobs[j].shape):
                    raise CaffeError("Cannot share param %d of layer %s between the train and "
                                     "test nets: shapes %s vs %s" % (
                                         j, name, tuple(src.blobs[j].shape),
                                         tuple(dst.blobs[j].shape)), where="net.cpp:745")
                Net._share(dst, j, src.blobs[j])
        test_net.refresh_param_views()

    # ------------------------------------------------------------------ solve
    def solve(self, resume_file=None):
        glog.info("Solving " + self.net.name, where="solver.cpp:289")
        glog.info("Learning Rate Policy: " + self.param.lr_policy, where="solver.cpp:290")
        self.requested_early_exit = False
        start_iter = self.iter
        self.step(self.param.max_iter - self.iter)
        p = self.param
        if p.snapshot_after_train and (not p.snapshot or self.iter % p.snapshot != 0):
            self.snapshot()
        if self.requested_early_exit:
            glog.info("Optimization stopped early.", where="solver.cpp:313")
            return
        if p.display and self.iter % p.display == 0:
            with torch.no_grad():
                loss = self._forward_loss()
            # the window of step() (for a run resumed from our own snapshot, its original start)
            self._update_smoothed_loss(loss, getattr(self, "_step_start", start_iter),
                                       p.average_loss)
            glog.info("Iteration %d, loss = %s" % (self.iter, _fmt(self.smoothed_loss)),
                      where="solver.cpp:327")
        if p.test_interval and self.iter % p.test_interval == 0:
            self.test_all()
        glog.info("Optimization Done.", where="solver.cpp:332")

    def _forward_loss(self):
        total = self.net.run()
        return 0.0 if total is None else float(total)

    def step(self, iters):
        """Caffe's Solver::Step. The loss of each iteration stays on the device until it is
        needed on the host (:meth:`_read_losses`): on the CPU that is every iteration (reading
        costs nothing there); on a GPU every ``sync_every`` iterations, on display iterations,
        at snapshots and at the end, and every iteration for SSD's plateau policy, which reads
        the smoothed loss. Reading late changes nothing in the log: the smoothed loss is
        computed from the same values in the same order."""
        p = self.param
        start_iter = self.iter
        stop_iter = self.iter + iters
        self.losses = []
        self.smoothed_loss = 0.0
        window = getattr(self, "_resume_window", None)
        if window is not None:      # our own snapshot: continue the smoothing window exactly
            self.losses, self.smoothed_loss, start_iter = window
            self._resume_window = None
        self._step_start = start_iter
        self._unread = []           # [(iteration, 0-dim float32 loss on the device)]
        params = [lp.tensor for lp in self.net.learnable_params]
        self._take_checkpoint()
        last_time = time.perf_counter()
        last_iter = self.iter
        while self.iter < stop_iter:
            for t in params:
                t.grad = None
            if p.test_interval and self.iter % p.test_interval == 0 and (
                    self.iter > 0 or p.test_initialization):
                self.test_all()
                if self.requested_early_exit:
                    break
            display = bool(p.display) and self.iter % p.display == 0
            # by the iteration number alone, so that data-parallel processes read (and agree
            # on signals) at the same iterations whatever each has read before
            self.read_due = (display or self.sync_every <= 1 or self.lr.uses_loss
                             or (self.iter + 1) % self.sync_every == 0
                             or (p.snapshot and (self.iter + 1) % p.snapshot == 0)
                             or self.iter + 1 >= stop_iter)
            loss = None
            for _ in range(p.iter_size):      # Caffe sums the iter_size losses in Dtype
                total = self.net.run()
                if total is not None:
                    if total.requires_grad:
                        total.backward()
                    value = total.detach().float()
                    loss = value if loss is None else loss + value
            loss = (torch.zeros((), device=self.device) if loss is None
                    else loss.reshape(()) / p.iter_size)
            for hook in self.hooks.get("gradients_ready", ()):   # e.g. data-parallel all-reduce
                loss = hook(self, loss)
            self._unread.append((self.iter, loss))
            if self.read_due:
                self._read_losses(current=self.iter, checkpoint=(
                    self.iter + 1 - self._checkpoint["iter"] >= CHECKPOINT_EVERY))
            if display:
                now = time.perf_counter()
                lapse = int((now - last_time) * 1000) / 1000.0   # Caffe's Timer: whole ms
                per_s = (self.iter - last_iter) / (lapse if lapse else 1)
                glog.info("Iteration %d (%s iter/s, %ss/%d iters), loss = %s" % (
                    self.iter, _fmt(per_s), _fmt(lapse), p.display,
                    _fmt(self.smoothed_loss)), where="solver.cpp:239")
                last_time = now
                last_iter = self.iter
                self._display_outputs(self.net, "Train", "solver.cpp:258")
            rate = self.lr.rate(self.iter, self.smoothed_loss)
            if display:
                glog.info("Iteration %d, lr = %s" % (self.iter, _fmt(rate)),
                          where="sgd_solver.cpp:112")
            if self.sparsity is not None:
                self.sparsity.mask_gradients()
            self.update.apply(rate, self.iter)
            if self.sparsity is not None:
                self.sparsity.mask_weights()
            self.iter += 1
            for hook in self.hooks.get("iteration_done", ()):   # e.g. the CLI's progress bar
                hook(self)
            request = self._take_request()
            if ((p.snapshot and self.iter % p.snapshot == 0) or request == "snapshot") \
                    and self.is_root:
                self.snapshot()
            if request == "stop":
                self.requested_early_exit = True
                break
        self._read_losses()

    def _read_losses(self, current=None, checkpoint=False):
        """Bring the unread losses to the host in one transfer, in iteration order, into Caffe's
        smoothed loss; a non-finite one stops training (:meth:`_non_finite`). ``current``: the
        iteration being run, whose update is not applied yet (its weights are still those
        that gave its loss); ``checkpoint``: take the NaN checkpoint of ``current`` once its
        loss is known finite, with the smoothing window as it was before that loss (a run
        resumed from it computes that loss again)."""
        unread = self._unread
        if not unread:
            return
        self._unread = []
        values = torch.stack([v.reshape(()).float() for _, v in unread]).cpu().tolist()
        for (iteration, _), value in zip(unread, values):
            if not math.isfinite(value):
                self._non_finite(value, iteration, current)
            if checkpoint and iteration == current:
                self._take_checkpoint()
            self._update_smoothed_loss(value, self._step_start, self.param.average_loss,
                                       iteration)

    def _state_tensors(self):
        """What the NaN checkpoint copies: the learnable weights, then the update history."""
        return [lp.tensor for lp in self.net.learnable_params] + list(self.update.history)

    def _take_checkpoint(self):
        """The state (weights, update history, lr state, smoothing window) of an iteration whose
        loss was read finite, before its update: what the NaN path saves. Taken at the start
        of ``step`` and then every ``CHECKPOINT_EVERY`` iterations at a loss read; by the time
        a NaN is read the weights have been updated with its gradients, and the state just
        before them gave that NaN, so neither could be saved instead. It lives in host memory
        (pinned, filled by asynchronous copies queued before the update, on a GPU), so it takes
        no GPU memory and the host never waits for it: it is read only after a loss read,
        which has waited for the GPU anyway."""
        ck = self._checkpoint
        tensors = self._state_tensors()
        with torch.no_grad():
            if ck is None:
                ck = {"copies": [torch.empty(t.shape, dtype=t.dtype, device="cpu",
                                             pin_memory=t.is_cuda) for t in tensors]}
            for dst, src in zip(ck["copies"], tensors):
                dst.copy_(src.detach(), non_blocking=src.is_cuda)
        ck.update(iter=self.iter, lr=self.lr.state_dict(), losses=list(self.losses),
                  smoothed_loss=self.smoothed_loss)
        self._checkpoint = ck

    def _update_smoothed_loss(self, loss, start_iter, average_loss, iteration=None):
        """Caffe's UpdateSmoothedLoss: the mean of the last ``average_loss`` losses."""
        if iteration is None:
            iteration = self.iter
        if len(self.losses) < average_loss:
            self.losses.append(loss)
            size = len(self.losses)
            self.smoothed_loss = (self.smoothed_loss * (size - 1) + loss) / size
        else:
            idx = (iteration - start_iter) % average_loss
            self.smoothed_loss += (loss - self.losses[idx]) / average_loss
            self.losses[idx] = loss
        # Caffe keeps these in float32
        self.smoothed_loss = float(np.float32(self.smoothed_loss))

    def _display_outputs(self, net, kind, where):
        index = 0
        for name in net.outputs:
            value = net._data[name].detach().float().reshape(-1).cpu().numpy()
            weight = net.output_loss_weight(name)
            for v in value:
                msg = "    %s net output #%d: %s = %s" % (kind, index, name, _fmt(v))
                if weight:
                    msg += " (* %s = %s loss)" % (_fmt(weight), _fmt(np.float32(weight * v)))
                glog.info(msg, where=where)
                index += 1

    def _non_finite(self, loss, iteration, current=None):
        """Stop on a NaN/inf loss: name the iteration, the first top (in layer order) and the
        first learnable blob that went non-finite, and save the last finite state first: the
        checkpoint (:meth:`_take_checkpoint`) of the newest iteration whose loss was finite, at
        most ``CHECKPOINT_EVERY`` iterations back, with its real momentum history (resuming
        from it with a lower lr is the way on). ``current``: the iteration being run when the
        loss was read; the blobs the message names are that iteration's."""
        where = ""
        now = self.iter if current is None else current
        if iteration != now:
            where = (" (Read at iteration %d: losses are read to the host every %d iterations "
                     "on %s; the blobs below are those of iteration %d.)"
                     % (now, self.sync_every, self.device.type, now))
        culprit = self.net.first_non_finite()
        if culprit:
            where += " First non-finite blob: '%s' (top of layer '%s', type %s)." % culprit
        bad_param = self._first_non_finite_param()
        if bad_param is not None:
            where += " First non-finite weights: param %d of layer '%s'." % bad_param[::-1]
        head = "Iteration %d: loss is %s.%s" % (iteration, _fmt(loss), where)
        self._unread = []
        if not self.is_root:
            raise NonFiniteLoss(head, where="solver.cpp:239")
        state_iter, reset_history = self.iter, False
        ck = self._checkpoint
        if ck is not None:
            tensors = self._state_tensors()
            with torch.no_grad():
                for t, saved in zip(tensors, ck["copies"]):
                    t.copy_(saved)
            self.lr.load_state_dict(ck["lr"])
            self.losses, self.smoothed_loss = list(ck["losses"]), ck["smoothed_loss"]
            state_iter = ck["iter"]
        still = self._first_non_finite_param()
        if still is not None:
            raise NonFiniteLoss("%s No finite state to save: param %d of layer '%s' is not "
                                "finite in iteration %d either (non-finite weights loaded from "
                                "--weights / --snapshot, or statistics that are not learnable); "
                                "no snapshot written." % (head, still[1], still[0], state_iter),
                                where="solver.cpp:239")
        if any(not bool(torch.isfinite(h).all()) for h in self.update.history):
            reset_history = True
            glog.warning("The last finite state is that of iteration %d; its momentum/history "
                         "is not finite and is reset to zero in the snapshot." % state_iter)
        path = self.snapshot(suffix="_last_finite", iteration=state_iter,
                             zero_history=reset_history)
        raise NonFiniteLoss("%s The last finite state (the weights of iteration %d) was saved "
                            "to %s and %s." % (head, state_iter, path, self.snapshot_filename(
                                ".solverstate", "_last_finite", state_iter)),
                            where="solver.cpp:239")

    def _first_non_finite_param(self):
        """(layer name, blob index) of the first blob of the train net holding a NaN or inf."""
        for name, layer in self.net.layer_dict.items():
            for i, blob in enumerate(layer.blobs):
                if blob.is_floating_point() and not bool(torch.isfinite(blob).all()):
                    return name, i
        return None

    # ------------------------------------------------------------------ test
    def test_all(self):
        for i, net in enumerate(self.test_nets):
            if self.requested_early_exit:
                break
            self.test(i)

    def test(self, i):
        if self.param.eval_type == "detection":     # SSD-Caffe's Solver::TestDetection
            from solvers.detection_eval import test_detection
            return test_detection(self, i)
        if self.param.eval_type != "classification":
            raise CaffeError("Unknown evaluation type: %s" % self.param.eval_type,
                             where="solver.cpp:412")
        net = self.test_nets[i]
        p = self.param
        glog.info("Iteration %d, Testing net (#%d)" % (self.iter, i), where="solver.cpp:347")
        scores = None
        loss = 0.0
        iters = p.test_iter[i]
        with torch.no_grad():
            for _ in range(iters):
                request = self._take_request()
                while request is not None:
                    if request == "snapshot":
                        self.snapshot()
                    elif request == "stop":
                        self.requested_early_exit = True
                    request = self._take_request()
                if self.requested_early_exit:
                    break
                total = net.run()
                if p.test_compute_loss and total is not None:
                    loss = loss + total.detach().double()     # read once, after the loop
                values = [net._data[name].reshape(-1) for name in net.outputs]
                flat = torch.cat([v.double() for v in values]) if values else torch.zeros(0)
                scores = flat.clone() if scores is None else scores + flat
        if self.requested_early_exit:
            glog.info("Test interrupted.", where="solver.cpp:394")
            return
        if p.test_compute_loss:
            glog.info("Test loss: %s" % _fmt(float(loss) / iters), where="solver.cpp:400")
        if scores is None:
            return
        scores = scores.cpu().numpy()
        index = 0
        for name in net.outputs:
            weight = net.output_loss_weight(name)
            for _ in range(int(np.prod(net.blob_shapes[name])) if net.blob_shapes[name] else 1):
                mean = np.float32(scores[index] / iters)
                msg = "    Test net output #%d: %s = %s" % (index, name, _fmt(mean))
                if weight:
                    msg += " (* %s = %s loss)" % (_fmt(weight), _fmt(np.float32(weight * mean)))
                glog.info(msg, where="solver.cpp:414")
                index += 1

    def keep_zeros(self):
        """--keep-sparsity: weights that are zero now stay zero (masks built from the current
        weights, so call it after --weights or a restore)."""
        from solvers.sparsity import SparsityMasks
        self.keep_sparsity = True
        self.sparsity = SparsityMasks(self.net)

    # ------------------------------------------------------------------ signals
    def request(self, action):
        """Called from a signal handler: act at the end of the current iteration."""
        if action in ("stop", "snapshot"):
            self.requested = action

    def _take_request(self):
        request, self.requested = self.requested, None
        return request

    # ------------------------------------------------------------------ snapshots
    def snapshot_filename(self, ext, suffix="", iteration=None):
        return "%s_iter_%d%s%s" % (self.param.snapshot_prefix,
                                   self.iter if iteration is None else iteration, suffix, ext)

    def snapshot(self, suffix="", iteration=None, zero_history=False):
        """Caffe's Solver::Snapshot: .caffemodel then .solverstate (+ our .trainer sidecar).

        Every file is written atomically (a complete file or none under its final name); the
        sidecar is written before the solverstate it belongs to, so a solverstate that exists
        always has its sidecar. ``iteration`` / ``zero_history``: the NaN path's last finite
        state (weights of an earlier iteration, history reset)."""
        from converters.caffemodel import atomic_write
        self._read_losses()             # the smoothing window goes into the sidecar
        if self.param.snapshot_format == caffe_pb2.SolverParameter.HDF5:
            raise CaffeError("snapshot_format HDF5 is not supported; use BINARYPROTO",
                             where="solver.cpp:450")
        model = self.snapshot_filename(".caffemodel", suffix, iteration)
        glog.info("Snapshotting to binary proto file " + model, where="solver.cpp:464")
        if self.sparsity is not None:
            self.sparsity.log("snapshot")
        proto = self.net.to_proto(self.update.last_updates if self.param.snapshot_diff else None)
        atomic_write(model, proto.SerializeToString())
        state = caffe_pb2.SolverState()
        state.iter = self.iter if iteration is None else iteration
        state.learned_net = model
        lr_state = self.lr.state_dict()
        state.current_step = lr_state.get("current_step", 0)
        if self.param.lr_policy == "plateau":     # SSD-Caffe's SolverState fields 5 and 6
            state.minimum_loss = lr_state["minimum_loss"]
            state.iter_last_event = lr_state["iter_last_event"]
        from converters.caffemodel import array_to_blob
        for h in self.update.history:
            h = h.detach().cpu().numpy()
            state.history.add().CopyFrom(array_to_blob(np.zeros_like(h) if zero_history else h))
        path = self.snapshot_filename(".solverstate", suffix, iteration)
        glog.info("Snapshotting solver state to binary proto file " + path,
                  where="sgd_solver.cpp:284")
        data = state.SerializeToString()
        extra = self._extra_state()
        extra["iter"] = state.iter
        extra["solverstate_sha256"] = hashlib.sha256(data).hexdigest()
        atomic_write(path + ".trainer", json.dumps(extra).encode())
        atomic_write(path, data)
        return model

    def _extra_state(self):
        data = {}
        for name, layer in self.net.layer_dict.items():
            if hasattr(layer, "state_dict_position"):
                data[name] = layer.state_dict_position()
        return {
            "format": 1,
            "iter": self.iter,
            "losses": self.losses,
            "smoothed_loss": self.smoothed_loss,
            "window_start": getattr(self, "_step_start", 0),
            "lr": self.lr.state_dict(),
            "data": data,
            "test_data": [{name: layer.state_dict_position()
                           for name, layer in net.layer_dict.items()
                           if hasattr(layer, "state_dict_position")} for net in self.test_nets],
            "torch_rng": torch.get_rng_state().numpy().tolist(),
        }

    def restore(self, path):
        """SGDSolver::Restore from a .solverstate (ours or real Caffe's)."""
        from converters.caffemodel import blob_to_array, read_solverstate
        state = read_solverstate(path)
        self.iter = state.iter
        if state.HasField("learned_net"):
            learned = state.learned_net
            beside = os.path.join(os.path.dirname(path), os.path.basename(learned))
            if not os.path.exists(learned) and os.path.exists(beside):
                learned = beside     # Caffe resolves it against the cwd; also look beside path
            if not os.path.exists(learned):
                raise CaffeError("Solver state %s refers to the weights %s (learned_net), which "
                                 "do not exist (neither relative to the working directory nor "
                                 "beside the solverstate)" % (path, state.learned_net),
                                 where="sgd_solver.cpp:325")
            self.net.copy_from(learned, resuming=path)
        lr_state = {"current_step": state.current_step}
        if self.param.lr_policy == "plateau":
            lr_state.update(minimum_loss=state.minimum_loss, iter_last_event=state.iter_last_event)
        if len(state.history) != len(self.update.history):
            raise CaffeError("Incorrect length of history blobs: %s has %d, this solver and net "
                             "need %d" % (path, len(state.history), len(self.update.history)),
                             where="sgd_solver.cpp:334")
        glog.info("SGDSolver: restoring history", where="sgd_solver.cpp:336")
        for h, blob in zip(self.update.history, state.history):
            arr = blob_to_array(blob)
            if arr.size != h.numel():
                raise CaffeError("Solver state %s: history blob shape %s does not fit param "
                                 "shape %s" % (path, arr.shape, tuple(h.shape)),
                                 where="blob.cpp:500")
            with torch.no_grad():
                h.copy_(torch.from_numpy(arr.reshape(tuple(h.shape))))
        sidecar = path + ".trainer"
        extra = None
        if os.path.exists(sidecar):
            problem = None
            try:
                with open(sidecar) as f:
                    extra = json.load(f)
            except (ValueError, OSError, UnicodeDecodeError) as exc:
                problem = "it cannot be read (%s)" % (str(exc).splitlines() or ["corrupt"])[0]
            if problem is None and not isinstance(extra, dict):
                problem = "it is not a trainer sidecar (no JSON object)"
            if problem is None and extra.get("solverstate_sha256") != hashlib.sha256(
                    state.SerializeToString()).hexdigest():
                problem = "it does not belong to this solverstate (written for another file)"
            if problem is not None:
                glog.warning("Ignoring %s: %s. Resuming as Caffe does: data from the first "
                             "record." % (sidecar, problem))
                extra = None
        if extra is not None:
            lr_state.update(extra.get("lr", {}))
            if extra.get("losses") is not None:
                self._resume_window = (list(extra["losses"]), float(extra["smoothed_loss"]),
                                       int(extra.get("window_start", 0)))
            for name, pos in extra.get("data", {}).items():
                layer = self.net.layer_dict.get(name)
                if layer is not None and hasattr(layer, "load_state_dict_position"):
                    layer.load_state_dict_position(pos)
            for net, positions in zip(self.test_nets, extra.get("test_data", [])):
                for name, pos in positions.items():
                    layer = net.layer_dict.get(name)
                    if layer is not None and hasattr(layer, "load_state_dict_position"):
                        layer.load_state_dict_position(pos)
            if extra.get("torch_rng"):
                torch.set_rng_state(torch.tensor(extra["torch_rng"], dtype=torch.uint8))
        self.lr.load_state_dict(lr_state)
        if self.keep_sparsity:       # the restored weights define what is pruned
            self.keep_zeros()


def check_snapshot_directory(prefix):
    """Refuse, before training, a snapshot_prefix whose snapshots could not be written (Caffe
    finds out only when it snapshots, after hours of training): the directory must exist and
    a file must be creatable in it (a real probe: permission bits do not tell for root, for
    read-only file systems or for quotas)."""
    import tempfile
    directory = os.path.dirname(prefix) or "."
    if not os.path.exists(directory):
        raise CaffeError("snapshot_prefix %s: directory %s does not exist (snapshots would fail "
                         "after training)" % (prefix, directory), where="solver.cpp:448")
    if not os.path.isdir(directory):
        raise CaffeError("snapshot_prefix %s: %s is not a directory (snapshots would fail after "
                         "training)" % (prefix, directory), where="solver.cpp:448")
    try:
        fd, probe = tempfile.mkstemp(prefix=".trainer_probe_", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CaffeError("snapshot_prefix %s: directory %s is not writable (%s; snapshots would "
                         "fail after training)" % (prefix, directory, exc.strerror or exc),
                         where="solver.cpp:448") from None


def _solver_text(param):
    from converters.prototxt import write_text
    return write_text(param)
