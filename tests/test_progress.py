"""The tqdm bar appears only on a terminal, and glog lines stay whole lines around it."""
import io
import sys

from converters import glog


class FakeSolver:
    def __init__(self):
        self.iter = 0
        self.hooks = {}

        class P:
            max_iter = 5
        self.param = P()


def test_no_bar_when_not_a_terminal():
    from cli.progress import progress_bar
    solver = FakeSolver()
    with progress_bar(solver, enabled=False) as bar:
        assert bar is None
    assert solver.hooks == {}


def test_bar_routes_glog_through_tqdm(monkeypatch):
    from cli.progress import progress_bar
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    solver = FakeSolver()
    with progress_bar(solver, enabled=True) as bar:
        glog.info("Iteration 0, lr = 0.01", where="sgd_solver.cpp:112")
        solver.iter = 3
        for hook in solver.hooks["iteration_done"]:
            hook(solver)
        assert bar.n == 3
    assert solver.hooks["iteration_done"] == []
    lines = [l for l in err.getvalue().replace("\r", "\n").splitlines()
             if "sgd_solver.cpp:112]" in l]
    assert lines and lines[0].startswith("I") and lines[0].endswith("Iteration 0, lr = 0.01")
    assert glog._State.stream is None
