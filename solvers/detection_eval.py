"""SSD-Caffe's ``Solver::TestDetection``: the test pass of a solver with ``eval_type: "detection"``.

The test net's outputs are DetectionEvaluate tops (``1 x 1 x N x 5`` rows). Over ``test_iter``
forwards the solver collects, per output blob and per label, the ground-truth counts (rows
``[-1, label, num_gt, -1, -1]``) and the scored true/false positive flags of the detections
(rows ``[image, label, score, tp, fp]``; rows with ``tp == fp == 0``, detections matched to an
ignored difficult box, are skipped), then computes each label's AP with ``ap_version``
(``11point``, ``MaxIntegral``, ``Integral``; :func:`layers.bbox_util.compute_ap`) and logs the
mean over the labels that have a ground-truth count row, as SSD-Caffe does (weiliu89/caffe,
branch ssd, ``src/caffe/solver.cpp``; the source tags are that file's line numbers):

    I... solver.cpp:433] Iteration 100, Testing net (#0)
    I... net.cpp:693] Ignoring source layer mbox_loss
    W... solver.cpp:524] Missing true_pos for label: 2
    I... solver.cpp:540] class1: 0.545455            (only with show_per_class_result)
    I... solver.cpp:546]     Test net output #0: detection_eval = 0.272727

Facts of SSD-Caffe reproduced:

* The "Ignoring source layer" lines are ``Net::ShareTrainedLayersWith``'s, printed at every test
  for each train-net layer (auto-inserted splits included) that the test net lacks.
* Every output must have width 5 (``CHECK_EQ(result[j]->width(), 5)``); only the first
  ``height`` rows of a blob are read.
* A label with a ground-truth row but no detection at all gets the warning and no AP, yet still
  counts in the mean (``mAP /= num_pos.size()``), so it pulls the mean down as an AP of 0.
* Results are logged for output blobs ``0 .. K-1`` where K is the number of output blobs that
  produced at least one detection row: an output without any detection (e.g. the net found
  nothing at all) prints no "Test net output" line, and if blob 0 has none while blob 1 has some,
  SSD-Caffe stops with "Missing output_blob true_pos: 0".
* AP accumulation in float32 (``float mAP``); a label with no ground truth (num_pos 0) gets AP 0
  without calling ComputeAP (so an unknown ``ap_version`` only fails once it is used).
* ``test_compute_loss`` adds "Test loss: X", as the classification test.
"""
import numpy as np
import torch

from converters import glog
from converters.errors import CaffeError
from layers import bbox_util as bu

AP_VERSIONS = ("11point", "MaxIntegral", "Integral")


def _legacy(shape, index):
    """Caffe's Blob::LegacyShape(index): axes past the end count as 1."""
    if len(shape) > 4:
        raise CaffeError("Cannot use legacy accessors on Blobs with > 4 axes.",
                         where="blob.hpp:141")
    return int(shape[index]) if index < len(shape) else 1


class DetectionScores:
    """The per-output-blob maps of TestDetection: true_pos / false_pos per label (lists of
    (score, flag) in arrival order) and num_pos per label."""

    def __init__(self):
        self.true_pos = {}     # blob index -> {label: [(score, tp)]}
        self.false_pos = {}
        self.num_pos = {}      # blob index -> {label: count}

    def add(self, j, rows):
        """Rows of output blob ``j`` (an (N, 5) float32 array), in order."""
        rows = np.asarray(rows, np.float32).reshape(-1, 5)
        for r in rows:
            item, label = int(r[0]), int(r[1])
            if item == -1:
                counts = self.num_pos.setdefault(j, {})
                counts[label] = counts.get(label, 0) + int(r[2])
                continue
            score = float(r[2])
            tp, fp = int(r[3]), int(r[4])
            if tp == 0 and fp == 0:
                continue
            self.true_pos.setdefault(j, {}).setdefault(label, []).append((score, tp))
            self.false_pos.setdefault(j, {}).setdefault(label, []).append((score, fp))

    def results(self, ap_version="Integral"):
        """[(j, mAP, [(label, AP or None)])] for blobs 0..len(true_pos)-1, in Caffe's order;
        AP None marks "Missing true_pos for label". Raises Caffe's fatal checks."""
        out = []
        for i in range(len(self.true_pos)):
            if i not in self.true_pos:
                raise CaffeError("Missing output_blob true_pos: %d" % i, where="solver.cpp:503")
            if i not in self.false_pos:
                raise CaffeError("Missing output_blob false_pos: %d" % i, where="solver.cpp:508")
            if i not in self.num_pos:
                raise CaffeError("Missing output_blob num_pos: %d" % i, where="solver.cpp:513")
            true_pos, false_pos, num_pos = self.true_pos[i], self.false_pos[i], self.num_pos[i]
            per_label = []
            total = np.float32(0)
            for label in sorted(num_pos):
                if label not in true_pos:
                    per_label.append((label, None))
                    continue
                n = num_pos[label]
                if n == 0:       # ComputeAP returns before looking at ap_version
                    ap = 0.0
                else:
                    if ap_version not in AP_VERSIONS:
                        raise CaffeError("Unknown ap_version: %s" % ap_version,
                                         where="bbox_util.cpp:1650")
                    _, _, ap = bu.compute_ap(true_pos[label], n, false_pos[label], ap_version)
                per_label.append((label, ap))
                total = np.float32(total + np.float32(ap))
            mean = np.float32(total / np.float32(len(num_pos)))
            out.append((i, float(mean), per_label))
        return out


def _ignored_train_layers(train_net, test_net):
    have = set(test_net.layer_names)
    return [name for name in train_net.layer_names if name not in have]


def test_detection(solver, test_net_id):
    """Run test net ``test_net_id`` of ``solver`` and log its mAP as SSD-Caffe's TestDetection.

    Returns ``[(output name, mAP)]`` (empty when interrupted or nothing was detected)."""
    net = solver.test_nets[test_net_id]
    p = solver.param
    glog.info("Iteration %d, Testing net (#%d)" % (solver.iter, test_net_id),
              where="solver.cpp:433")
    for name in _ignored_train_layers(solver.net, net):
        glog.info("Ignoring source layer " + name, where="net.cpp:693")
    scores = DetectionScores()
    loss = np.float32(0)
    iters = p.test_iter[test_net_id]
    with torch.no_grad():
        for _ in range(iters):
            request = solver._take_request()
            while request is not None:
                if request == "snapshot":
                    solver.snapshot()
                elif request == "stop":
                    solver.requested_early_exit = True
                request = solver._take_request()
            if solver.requested_early_exit:
                break
            total = net.run()
            if p.test_compute_loss and total is not None:
                loss = np.float32(loss + np.float32(float(total.detach())))
            for j, name in enumerate(net.outputs):
                blob = net._data[name]
                shape = tuple(blob.shape)
                width = _legacy(shape, 3)
                if width != 5:
                    raise CaffeError("Check failed: result[j]->width() == 5 (%d vs. 5) (test net "
                                     "output #%d '%s' has shape %s; eval_type \"detection\" "
                                     "needs DetectionEvaluate outputs)"
                                     % (width, j, name, " ".join(str(d) for d in shape)),
                                     where="solver.cpp:464")
                height = _legacy(shape, 2)
                flat = blob.detach().reshape(-1)[:height * 5].to("cpu", torch.float32).numpy()
                scores.add(j, flat)
    if solver.requested_early_exit:
        glog.info("Test interrupted.", where="solver.cpp:494")
        return []
    if p.test_compute_loss:
        glog.info("Test loss: %s" % glog.format_number(np.float32(loss / np.float32(iters))),
                  where="solver.cpp:499")
    logged = []
    for i, mean, per_label in scores.results(p.ap_version):
        for label, ap in per_label:
            if ap is None:
                glog.warning("Missing true_pos for label: %d" % label, where="solver.cpp:524")
            elif p.show_per_class_result:
                glog.info("class%d: %s" % (label, glog.format_number(np.float32(ap))),
                          where="solver.cpp:540")
        name = net.outputs[i]
        glog.info("    Test net output #%d: %s = %s" % (i, name, glog.format_number(mean)),
                  where="solver.cpp:546")
        logged.append((name, mean))
    return logged
