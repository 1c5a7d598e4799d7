"""SSD-Caffe's Solver::TestDetection (solvers/detection_eval.py) on hand-made DetectionEvaluate rows.

The AP values are worked out by hand (see each test); the log lines follow SSD-Caffe's
solver.cpp (weiliu89/caffe, branch ssd).
"""
import io
import re

import numpy as np
import pytest
import torch

from converters import caffe_pb2, glog
from converters.errors import CaffeError
from solvers.detection_eval import DetectionScores, test_detection as run_test_detection

# One label (1) with 4 ground-truth boxes and five detections, by score:
#   0.9 TP, 0.8 FP, 0.7 TP, 0.6 TP, 0.5 FP
# cumulative precision 1, 1/2, 2/3, 3/4, 3/5 at recall 1/4, 1/4, 1/2, 3/4, 3/4.
#   Integral    = 1*1/4 + 2/3*1/4 + 3/4*1/4                  = 0.6041667
#   MaxIntegral = 1*1/4 + 3/4*1/4 + 3/4*1/4 (interpolated)    = 0.625
#   11point     = (3*1 [r>=0,.1,.2] + 5*3/4 [r>=.3...7] + 0*3 [r>=.8,.9,1]) / 11 = 0.6136364
ROWS_LABEL1 = [
    [-1, 1, 4, -1, -1],
    [0, 1, 0.8, 0, 1],     # arrival order differs from score order on purpose
    [0, 1, 0.9, 1, 0],
    [1, 1, 0.6, 1, 0],
    [1, 1, 0.7, 1, 0],
    [1, 1, 0.5, 0, 1],
]
EXPECTED = {"Integral": 0.6041667, "MaxIntegral": 0.625, "11point": 0.6136364}


def _ap(rows, version):
    s = DetectionScores()
    s.add(0, rows)
    (i, mean, per_label), = s.results(version)
    return mean, per_label


@pytest.mark.parametrize("version", sorted(EXPECTED))
def test_known_ap_each_version(version):
    mean, per_label = _ap(ROWS_LABEL1, version)
    assert per_label == [(1, pytest.approx(EXPECTED[version], abs=1e-6))]
    assert mean == pytest.approx(EXPECTED[version], abs=1e-6)


@pytest.mark.parametrize("version", sorted(EXPECTED))
def test_rows_split_over_iterations_give_the_same_ap(version):
    s = DetectionScores()
    s.add(0, [[-1, 1, 1, -1, -1], [0, 1, 0.8, 0, 1], [0, 1, 0.9, 1, 0]])
    s.add(0, [[-1, 1, 3, -1, -1], [1, 1, 0.6, 1, 0], [1, 1, 0.7, 1, 0], [1, 1, 0.5, 0, 1]])
    (_, mean, _), = s.results(version)
    assert mean == pytest.approx(EXPECTED[version], abs=1e-6)


def test_perfect_and_hopeless_detectors():
    perfect = [[-1, 1, 2, -1, -1], [0, 1, 0.9, 1, 0], [0, 1, 0.3, 1, 0], [0, 1, 0.2, 0, 1]]
    wrong = [[-1, 1, 2, -1, -1], [0, 1, 0.9, 0, 1], [0, 1, 0.3, 0, 1]]
    for version in EXPECTED:
        assert _ap(perfect, version)[0] == pytest.approx(1.0)
        assert _ap(wrong, version)[0] == 0.0


def test_label_without_detections_counts_as_zero_with_a_warning():
    rows = ROWS_LABEL1 + [[-1, 2, 3, -1, -1]]
    mean, per_label = _ap(rows, "11point")
    assert per_label[1] == (2, None)
    assert mean == pytest.approx(EXPECTED["11point"] / 2, abs=1e-6)


def test_difficult_matches_are_skipped_and_zero_gt_label_gives_zero():
    rows = [[-1, 1, 1, -1, -1], [-1, 3, 0, -1, -1],
            [0, 1, 0.95, 0, 0],          # matched a difficult box: ignored
            [0, 1, 0.9, 1, 0],
            [0, 3, 0.5, 0, 1]]           # label 3 has no ground truth: AP 0
    mean, per_label = _ap(rows, "Integral")
    assert per_label == [(1, 1.0), (3, 0.0)]
    assert mean == 0.5


def test_unknown_ap_version_fails_only_when_used():
    with pytest.raises(CaffeError, match="Unknown ap_version"):
        _ap(ROWS_LABEL1, "VOC2013")
    # num_pos 0: ComputeAP returns before it looks at the version
    assert _ap([[-1, 1, 0, -1, -1], [0, 1, 0.5, 0, 1]], "VOC2013")[0] == 0.0


# ----------------------------------------------------------------------------- the solver pass
class FakeNet:
    """What test_detection uses of a Net: layer_names, outputs, run(), _data."""

    def __init__(self, layer_names, batches):
        self.layer_names = layer_names
        self.batches = list(batches)       # each: {output name: rows array}
        self.outputs = sorted(self.batches[0])
        self._data = {}
        self.runs = 0

    def run(self):
        batch = self.batches[self.runs % len(self.batches)]
        self.runs += 1
        for name, rows in batch.items():
            rows = np.asarray(rows, np.float32)
            self._data[name] = torch.from_numpy(rows.reshape(1, 1, -1, rows.shape[-1]))
        return torch.tensor(1.5)


class FakeSolver:
    def __init__(self, test_net, **solver_fields):
        self.param = caffe_pb2.SolverParameter(eval_type="detection", **solver_fields)
        self.test_nets = [test_net]
        self.net = FakeNet(["data", "data_data_0_split", "conv", "mbox_loss"],
                           [{"x": np.zeros((1, 5))}])
        self.iter = 40
        self.requested = None
        self.requested_early_exit = False

    def _take_request(self):
        request, self.requested = self.requested, None
        return request


@pytest.fixture
def log():
    buf = io.StringIO()
    glog.configure(stream=buf, min_level=0)
    yield buf
    glog.configure(stream=__import__("sys").stderr)


def _lines(buf):
    return [re.sub(r"^([IWEF])\d{4} [\d:.]+ +\d+ ", r"\1 ", l) for l in
            buf.getvalue().splitlines()]


def test_log_lines_like_ssd_caffe(log):
    first = [r for r in ROWS_LABEL1[:3]] + [[-1, 2, 0, -1, -1]]
    second = [[-1, 1, 0, -1, -1], [-1, 2, 1, -1, -1]] + [r for r in ROWS_LABEL1[3:]]
    second[0][2] = 0
    first[0] = [-1, 1, 4, -1, -1]
    net = FakeNet(["data", "data_data_0_split", "conv", "detection_out", "detection_eval"],
                  [{"detection_eval": first}, {"detection_eval": second}])
    solver = FakeSolver(net, test_iter=[2], ap_version="MaxIntegral",
                        show_per_class_result=True, test_compute_loss=True)
    result = run_test_detection(solver, 0)
    assert net.runs == 2
    assert result == [("detection_eval", pytest.approx(0.3125, abs=1e-6))]
    assert _lines(log) == [
        "I solver.cpp:433] Iteration 40, Testing net (#0)",
        "I net.cpp:693] Ignoring source layer mbox_loss",
        "I solver.cpp:499] Test loss: 1.5",
        "I solver.cpp:540] class1: 0.625",
        "W solver.cpp:524] Missing true_pos for label: 2",
        "I solver.cpp:546]     Test net output #0: detection_eval = 0.3125",
    ]


def test_no_detection_at_all_logs_no_output_line(log):
    net = FakeNet(["detection_eval"], [{"detection_eval": [[-1, 1, 3, -1, -1]]}])
    solver = FakeSolver(net, test_iter=[3])
    assert run_test_detection(solver, 0) == []
    lines = _lines(log)
    assert lines[0] == "I solver.cpp:433] Iteration 40, Testing net (#0)"
    assert not any("Test net output" in l for l in lines)


def test_two_outputs_and_caffes_missing_blob_check(log):
    det = [[-1, 1, 1, -1, -1], [0, 1, 0.9, 1, 0]]
    none = [[-1, 1, 1, -1, -1]]
    both = FakeNet(["e"], [{"eval_a": det, "eval_b": det}])
    assert [n for n, _ in run_test_detection(FakeSolver(both, test_iter=[1]), 0)] == \
        ["eval_a", "eval_b"]
    only_second = FakeNet(["e"], [{"eval_a": none, "eval_b": det}])
    with pytest.raises(CaffeError, match="Missing output_blob true_pos: 0") as err:
        run_test_detection(FakeSolver(only_second, test_iter=[1]), 0)
    assert err.value.where == "solver.cpp:503"


def test_outputs_must_be_5_wide(log):
    net = FakeNet(["e"], [{"accuracy": [[0.5]]}])
    with pytest.raises(CaffeError, match=r"width\(\) == 5 \(1 vs. 5\)"):
        run_test_detection(FakeSolver(net, test_iter=[1]), 0)


def test_stop_request_interrupts(log):
    net = FakeNet(["e"], [{"detection_eval": ROWS_LABEL1}])
    solver = FakeSolver(net, test_iter=[5])
    solver.requested = "stop"
    assert run_test_detection(solver, 0) == []
    assert net.runs == 0
    assert _lines(log)[-1] == "I solver.cpp:494] Test interrupted."
