"""Issue 7, trap 1 (seed 000): "why is freezing not faster?" -- ``--explain-backward``.

The seed's net (configs/frozen_backbone, its AnnotatedData replaced by an Input layer): conv_1 and
conv_2..conv_6 are frozen, conv_1_1 sits between them and trains. The analysis must say that
conv_2..conv_6 (and the ReLU / pooling layers between them) run backward only to reach conv_1_1,
that their weight-gradient part is skipped and their input-gradient part needed, and what freezing
conv_1_1 or moving it up would save -- and those predictions must be what rebuilding the net that
way really gives.
"""
import collections
import io
import os
import signal
import sys

import pytest
import torch
from click.testing import CliRunner

from conftest import ROOT

SEED_NET = os.path.join(ROOT, "configs", "frozen_backbone", "regnet_train.prototxt")

# Caffe's own backward analysis of the seed's net, from the user's log (net.cpp:226 / 228)
SEED_LOG_NEEDS_BACKWARD = {
    "mbox_loss": True, "mbox_priorbox": False, "mbox_conf": True, "mbox_loc": True,
    "conv_6_norm_mbox_priorbox": False, "conv_6_norm_mbox_conf_flat": True,
    "conv_6_norm_mbox_conf_perm": True, "conv_6_norm_mbox_conf": True,
    "conv_6_norm_mbox_loc_flat": True, "conv_6_norm_mbox_loc_perm": True,
    "conv_6_norm_mbox_loc": True, "conv_6_norm_conv_6_norm_0_split": True, "conv_6_norm": True,
    "relu_6": True, "conv_6": True, "pool_5": True, "relu_5": True, "conv_5": True,
    "pool_4": True, "relu_4": True, "conv_4": True, "pool_3": True, "relu_3": True,
    "conv_3": True, "pool_2": True, "relu_2": True, "conv_2": True, "pool_1": True,
    "relu_1_1": True, "conv_1_1": True, "relu_1": False, "conv_1": False,
    "data_data_0_split": False, "data": False,
}
BETWEEN = ["relu_1_1", "pool_1", "conv_2", "relu_2", "pool_2", "conv_3", "relu_3", "pool_3",
           "conv_4", "relu_4", "pool_4", "conv_5", "relu_5", "pool_5", "conv_6", "relu_6"]

Result = collections.namedtuple("Result", "exit_code output exception")


def run_cli(args, cwd=ROOT):
    """`trainer <args>` in this process (CliRunner), glog captured; signal handlers restored."""
    from cli.main import _register, main
    from converters import glog
    _register()
    buf = io.StringIO()
    old_cwd = os.getcwd()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    glog.configure(stream=buf, min_level=0)
    try:
        os.chdir(cwd)
        result = CliRunner().invoke(main, args, catch_exceptions=True)
    finally:
        os.chdir(old_cwd)
        glog._State.stream = None   # follow sys.stderr at call time again
        for s, h in handlers.items():
            signal.signal(s, h)
    exc = result.exception
    if isinstance(exc, SystemExit):
        exc = None
    return Result(result.exit_code, buf.getvalue() + (result.output or ""), exc)


def seed_param(batch=2, size=64):
    from converters.prototxt import read_net
    param = read_net(SEED_NET)
    param.layer[0].input_param.shape[0].dim[:] = [batch, 3, size, size]
    return param


def seed_net(edit=None):
    from layers.net import Net
    param = seed_param()
    if edit:
        edit(param)
    return Net(param, "TRAIN", log=False)


def _layer(param, name):
    return [lp for lp in param.layer if lp.name == name][0]


@pytest.fixture(scope="module")
def seed():
    from layers.explain import analyse
    torch.manual_seed(0)
    net = seed_net()
    return net, analyse(net)


def test_backward_column_is_caffes_analysis(seed):
    net, analysis = seed
    got = {r.name: r.backward for r in analysis.rows}
    assert got == SEED_LOG_NEEDS_BACKWARD


def test_frozen_layers_between_run_backward_only_for_conv_1_1(seed):
    net, analysis = seed
    t = net.layer_names.index("conv_1_1")
    for name in BETWEEN:
        row = analysis.row(name)
        assert row.backward and not row.trainable
        assert row.reach == {t}
        assert row.inputs == [True]
        assert row.why == "only to pass gradients down to conv_1_1"
        if name.startswith("conv_"):
            assert row.weight == "skipped" and row.weight_cost == 0
            assert row.input_costs[0] > 0
    row = analysis.row("conv_1_1")
    assert row.trainable and row.weight == "computed" and row.inputs == [False]
    assert row.why == "trains its own params"
    for name in ("conv_1", "relu_1", "data_data_0_split"):
        assert not analysis.row(name).backward
        assert analysis.row(name).why == "nothing at or below it trains"
    # the trainable Normalize above: trains, and passes gradients down to conv_1_1
    assert analysis.row("conv_6_norm").why == \
        "trains its own params; passes gradients down to conv_1_1"
    saving = analysis.saving("conv_1_1")
    assert [net.layer_names[i] for i in saving.only_for] == BETWEEN
    assert net.layer_names[saving.highest] == "relu_6"
    assert 0 < saving.move_up_saving < saving.freeze_saving < analysis.total


def test_freezing_prediction_is_what_freezing_gives(seed):
    """Rebuild the net with conv_1_1 frozen: exactly the predicted layers stop running backward
    and the FLOP total drops by exactly the predicted saving."""
    from layers.explain import analyse
    net, analysis = seed
    saving = analysis.saving("conv_1_1")

    def freeze(param):
        for spec in _layer(param, "conv_1_1").param:
            spec.lr_mult = 0
    frozen = seed_net(freeze)
    after = analyse(frozen)
    stopped = {r.name for r in analysis.rows if r.backward} - \
        {r.name for r in after.rows if r.backward}
    assert stopped == set(BETWEEN) | {"conv_1_1"}
    assert after.total == pytest.approx(analysis.total - saving.freeze_saving, rel=1e-9)


def test_moving_up_prediction_is_what_moving_gives(seed):
    """Move conv_1_1 (+ relu_1_1) up past relu_6: conv_2..relu_6 no longer run backward, and the
    FLOP total drops by the predicted saving, minus conv_1_1's old cost, plus its new one."""
    from converters import caffe_pb2
    from layers.explain import analyse
    net, analysis = seed
    saving = analysis.saving("conv_1_1")

    def move(param):
        layers = []
        for lp in param.layer:
            copy = caffe_pb2.LayerParameter()
            copy.CopyFrom(lp)
            layers.append(copy)
        by_name = {lp.name: lp for lp in layers}
        conv, relu = by_name["conv_1_1"], by_name["relu_1_1"]
        conv.bottom[0] = "conv_6"                      # now reads relu_6's output
        conv.convolution_param.num_output = 32
        by_name["pool_1"].bottom[0] = "conv_1"
        by_name["conv_6_norm"].bottom[0] = "conv_1_1"
        order = [lp for lp in layers if lp.name not in ("conv_1_1", "relu_1_1")]
        at = order.index(by_name["conv_6_norm"])
        del param.layer[:]
        param.layer.extend(order[:at] + [conv, relu] + order[at:])
    moved_net = seed_net(move)
    moved = analyse(moved_net)
    for name in BETWEEN[1:]:
        assert not moved.row(name).backward, name
    old = analysis.row("conv_1_1")
    new = moved.row("conv_1_1")
    new_costs = moved.row("relu_1_1").weight_cost + sum(moved.row("relu_1_1").input_costs)
    expected = (analysis.total - saving.move_up_saving
                - old.weight_cost - sum(old.input_costs)
                - analysis.row("relu_1_1").weight_cost
                + new.weight_cost + sum(new.input_costs) + new_costs)
    assert moved.total == pytest.approx(expected, rel=1e-9)


def test_measured_times_give_the_costs(seed):
    from layers.explain import analyse, table_lines
    from layers.profile import LayerwiseRunner
    net, _ = seed
    runner = LayerwiseRunner(net)
    times = [0.0] * len(net.layer_modules)
    _, graphs = runner.forward()
    runner.backward(graphs, times)
    analysis = analyse(net, times)
    assert analysis.unit == "s"
    assert analysis.total == pytest.approx(sum(times))
    for r in analysis.rows:
        if not r.backward:
            assert r.weight_cost == 0 and sum(r.input_costs) == 0
    saving = analysis.saving("conv_1_1")
    assert 0 < saving.freeze_saving <= analysis.total
    text = "\n".join(table_lines(analysis))
    assert "measured per-layer backward times" in text and " ms" in text


def test_time_prints_the_table(tmp_path):
    from converters.prototxt import write_text
    path = tmp_path / "seed_small.prototxt"
    path.write_text(write_text(seed_param(batch=1, size=64)))
    res = run_cli(["time", "--model", str(path), "--iterations", "1"])
    assert res.exit_code == 0, res.output[-3000:]
    out = res.output
    head = out.index("Backward analysis (--explain-backward)")
    assert head < out.index("Performing Forward")
    rows = [ln for ln in out.splitlines() if "explain.py" in ln and "] conv_2 " in ln]
    assert len(rows) == 1
    assert "skipped (lr_mult 0)" in rows[0] and "needed" in rows[0]
    assert rows[0].endswith("only to pass gradients down to conv_1_1")
    tail = out[out.index("*** Benchmark ends ***"):]
    assert "16 layers run backward only to reach the trainable layer conv_1_1" in tail
    assert " ms (" in tail
    res = run_cli(["time", "--model", str(path), "--iterations", "1", "--no-explain-backward"])
    assert res.exit_code == 0 and "Backward analysis" not in res.output


def test_train_explain_backward_prints_and_trains(tmp_path):
    solver = tmp_path / "solver.prototxt"
    solver.write_text('net: "configs/shared_weights/shared_train_test.prototxt"\n'
                      'base_lr: 0.01 lr_policy: "fixed" max_iter: 2 display: 1\n'
                      'snapshot_after_train: false\n')
    res = run_cli(["train", "--solver", str(solver), "--explain-backward"])
    assert res.exit_code == 0, res.output[-3000:]
    out = res.output
    assert out.index("Backward analysis") < out.index("Starting Optimization")
    assert "Optimization Done." in out
    rows = {ln.split("] ", 1)[1].split()[0]: ln for ln in out.splitlines() if "explain.py" in ln}
    assert "trains its own params" in rows["ip1_b"]
    assert "nothing at or below it trains" in rows["slice_pair"]
