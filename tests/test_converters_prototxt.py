"""converters.prototxt: parsing every reference prototxt, Caffe-exact text output, errors."""
import glob
import os
import re

import pytest

from converters import caffe_pb2, prototxt
from converters.errors import CaffeError

REFS = "/work/shared/refs"
needs_refs = pytest.mark.skipif(not os.path.isdir(REFS), reason="reference files not available")
GLOG_LINE = re.compile(r"^[IWEF](?:\d{4})?\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ [^ ]+:\d+\] ")


def _ref_prototxts():
    return sorted(glob.glob(os.path.join(REFS, "**", "*.prototxt"), recursive=True))


def _kind(path):
    name = os.path.basename(path)
    if name.startswith("solver"):
        return caffe_pb2.SolverParameter
    if name.startswith("labelmap"):
        return caffe_pb2.LabelMap
    return caffe_pb2.NetParameter


@needs_refs
@pytest.mark.parametrize("path", _ref_prototxts(), ids=lambda p: os.path.relpath(p, REFS))
def test_every_reference_prototxt_parses_and_round_trips(path):
    cls = _kind(path)
    if cls is caffe_pb2.NetParameter:
        msg = prototxt.read_net(path)
        assert len(msg.layer) > 0
    elif cls is caffe_pb2.SolverParameter:
        msg = prototxt.read_solver(path, upgrade_snapshot_prefix=False)
    else:
        msg = prototxt.read_text_proto(path, cls())
    again = prototxt.parse_text(prototxt.write_text(msg), cls(), "round-trip")
    assert again == msg


def _log_blocks(log_path, marker):
    """The multi-line proto dumps that follow ``marker`` in a glog file."""
    lines = open(log_path).read().split("\n")
    blocks = []
    for i, line in enumerate(lines):
        if GLOG_LINE.match(line) and line.endswith(marker):
            body = []
            for nxt in lines[i + 1:]:
                if GLOG_LINE.match(nxt):
                    break
                body.append(nxt + "\n")
            blocks.append("".join(body))
    return blocks


def _state_meets_rule(state, rule):
    """Net::StateMeetsRule (used here only to rebuild the filtered nets Caffe logs)."""
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    if any(s not in state.stage for s in rule.stage):
        return False
    if any(s in state.stage for s in rule.not_stage):
        return False
    return True


def _filter_net(net, state):
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    del out.layer[:]
    for layer in net.layer:
        if layer.include:
            keep = any(_state_meets_rule(state, r) for r in layer.include)
        else:
            keep = not any(_state_meets_rule(state, r) for r in layer.exclude)
        if keep:
            out.layer.add().CopyFrom(layer)
    return out


def _training_logs():
    logs = []
    for log in sorted(glob.glob(os.path.join(REFS, "bvlc", "**", "train*.log"), recursive=True)):
        if "glog_default_prefix" not in log:
            logs.append(log)
    return logs


@needs_refs
@pytest.mark.parametrize("log", _training_logs(), ids=lambda p: os.path.relpath(p, REFS))
def test_solver_and_net_dumps_match_caffe_logs_byte_for_byte(log):
    case = os.path.dirname(log)
    solver_file = "solver_resume.prototxt" if "resume" in os.path.basename(log) \
        else "solver.prototxt"
    solver = prototxt.read_solver(os.path.join(case, solver_file), upgrade_snapshot_prefix=False)
    # What caffe.cpp adds before logging: --level, --stage (""), --weights.
    solver.train_state.level = 0
    solver.train_state.stage.append("")
    if "resume" not in os.path.basename(log):
        solver.weights.append("init.caffemodel")
    [dump] = _log_blocks(log, "Initializing solver from parameters: ")
    assert prototxt.write_text(solver) == dump

    net = prototxt.read_net(os.path.join(case, solver.net))
    train_state = caffe_pb2.NetState()
    train_state.CopyFrom(solver.train_state)
    train_state.phase = caffe_pb2.TRAIN
    test_state = caffe_pb2.NetState(phase=caffe_pb2.TEST)
    expected = []
    for state in (train_state, test_state):
        filtered = _filter_net(net, state)
        filtered.state.CopyFrom(state)
        expected.append(prototxt.write_text(filtered))
    assert _log_blocks(log, "Initializing net from parameters: ") == expected


@pytest.mark.parametrize("value,text", [
    (0.01, "0.01"), (0.0001, "0.0001"), (0.9, "0.9"), (0.0005, "0.0005"), (1.0, "1"),
    (0.00390625, "0.00390625"), (1e-8, "1e-08"), (0.999, "0.999"), (1e38, "1e+38"),
    (-1.0, "-1"), (25.6, "25.6"), (1.0 / 3.0, "0.333333343"), (float("inf"), "inf"),
    (123456789.0, "123456792"), (0.1 + 1e-9, "0.1"),
])
def test_float_format_is_protobuf_simple_ftoa(value, text):
    assert prototxt.format_float(value) == text


def test_write_text_layout():
    net = caffe_pb2.NetParameter(name="n")
    layer = net.layer.add(name="c", type="Convolution", bottom=["a"], top=["b"])
    layer.param.add(lr_mult=1)
    layer.convolution_param.num_output = 4
    layer.convolution_param.kernel_size.extend([3, 3])
    layer.convolution_param.bias_term = False
    layer.convolution_param.weight_filler.type = "gaussian"
    layer.convolution_param.weight_filler.std = 0.01
    layer.include.add(phase=caffe_pb2.TEST)
    assert prototxt.write_text(net) == (
        'name: "n"\nlayer {\n  name: "c"\n  type: "Convolution"\n  bottom: "a"\n  top: "b"\n'
        '  param {\n    lr_mult: 1\n  }\n  include {\n    phase: TEST\n  }\n'
        '  convolution_param {\n    num_output: 4\n    bias_term: false\n    kernel_size: 3\n'
        '    kernel_size: 3\n    weight_filler {\n      type: "gaussian"\n      std: 0.01\n'
        '    }\n  }\n}\n')


def test_string_escaping_round_trips():
    net = caffe_pb2.NetParameter(name='we"ird\\na\nme\t\x01')
    text = prototxt.write_text(net)
    assert text == 'name: "we\\"ird\\\\na\\nme\\t\\001"\n'
    assert prototxt.parse_text(text, caffe_pb2.NetParameter()) == net


@pytest.mark.parametrize("text,where,what", [
    ('name: "x"\nlayer {\n  name: "a"\n  bogus_field: 1\n}\n', "4:3",
     'has no field named "bogus_field"'),
    ('layer {\n  name: "a"\n  name: "b"\n}\n', "3:9", 'multiple "name" fields'),
    ('layer {\n  type: "ReLU"\n  include { phase: TRAINING }\n}\n', "3:20",
     'has no value named TRAINING'),
    ('layer {\n  name: "a"\n', "2:", 'Expected "}"'),
    ('layer {\n  convolution_param { num_output: -3 }\n}\n', "2:35", "out of range"),
])
def test_parse_errors_carry_file_line_column(text, where, what):
    with pytest.raises(CaffeError) as info:
        prototxt.parse_text(text, caffe_pb2.NetParameter(), "net.prototxt")
    err = info.value
    assert err.message.startswith("net.prototxt:" + where), err.message
    assert what in err.message
    assert err.severity == "F"
    assert err.where.startswith("prototxt.py:"), err.where     # our own tag, file:line


def test_errors_from_files(tmp_path):
    missing = tmp_path / "nope.prototxt"
    with pytest.raises(CaffeError, match="nope.prototxt"):
        prototxt.read_net(str(missing))
    bad = tmp_path / "bad.prototxt"
    bad.write_text('base_lr: 0.1\nmomentum: "fast"\n')
    with pytest.raises(CaffeError) as info:
        prototxt.read_solver(str(bad))
    assert info.value.message.startswith(str(bad) + ":2:")
    binary = tmp_path / "bin.prototxt"
    binary.write_bytes(b"\xff\xfe\x00junk")
    with pytest.raises(CaffeError, match="bin.prototxt"):
        prototxt.read_net(str(binary))


def test_read_solver_upgrades_solver_type_and_snapshot_prefix(tmp_path, capsys):
    path = tmp_path / "my_solver.prototxt"
    path.write_text('net: "x.prototxt"\nbase_lr: 0.1\nsolver_type: NESTEROV\n')
    solver = prototxt.read_solver(str(path))
    assert solver.type == "Nesterov" and not solver.HasField("solver_type")
    assert solver.snapshot_prefix == str(tmp_path / "my_solver")
    err = capsys.readouterr().err
    assert "deprecated 'solver_type' field (enum)': " + str(path) in err
    assert "to 'type' field (string)." in err
    snapdir = tmp_path / "snaps"
    snapdir.mkdir()
    path.write_text('type: "Adam"\nsnapshot_prefix: "%s"\n' % snapdir)
    solver = prototxt.read_solver(str(path))
    assert solver.snapshot_prefix == os.path.join(str(snapdir), "my_solver")
    path.write_text('type: "Adam"\nsolver_type: ADAM\n')
    with pytest.raises(CaffeError, match="cannot be both specified"):
        prototxt.read_solver(str(path))


_SSD_CASES = {"ssd_layers": ["layers_fb", "multibox_bg0", "multibox_bg1", "detection_output"],
              "annotated_data": ["data_deterministic_jpg64", "data_deterministic_png_mixed",
                                 "data_random_ssd"]}


@needs_refs
@pytest.mark.parametrize("case", sorted(_SSD_CASES))
def test_ssd_net_dumps_match_ssd_caffe_logs(case):
    """SSD-Caffe's "Initializing net from parameters:" dumps (year-prefixed glog)."""
    nets = {}
    for name in _SSD_CASES[case]:
        net = prototxt.read_net(os.path.join(REFS, "ssd", case, name + ".prototxt"))
        nets[net.name] = net
    blocks = _log_blocks(os.path.join(REFS, "ssd", case, "glog.txt"),
                         "Initializing net from parameters: ")
    assert len(blocks) == 4
    for block in blocks:
        logged = prototxt.parse_text(block, caffe_pb2.NetParameter())
        filtered = _filter_net(nets[logged.name], logged.state)
        filtered.state.CopyFrom(logged.state)
        assert prototxt.write_text(filtered) == block
