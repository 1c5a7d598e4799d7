"""Issue 6: "Never a traceback, never a lost snapshot" -- a corpus of user mistakes.

Every case runs the CLI (`trainer train ...`, `trainer test ...`) in a fresh directory and checks
that it ends with a non-zero exit and exactly ONE glog line of severity F (or E) that names the
culprit (file:line:column, layer, blob, path, value), with no Python traceback and no "Internal
error" (which would be a bug of ours, not the user's mistake).

Most cases run in-process through click's CliRunner with glog pointed at a buffer (fast); a few
representative ones run `python -m cli` in a subprocess, where a traceback would really show.
"""
import gc
import io
import os
import re
import signal
import sys

import lmdb
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import ROOT

# glog's prefix, the tag always file:line (a line without one is not counted, so fails the checks)
LOG_LINE = re.compile(r"^([IWEF])(\d{4}|\d{8}) (\d\d:\d\d:\d\d\.\d{6}) +(\d+) ([^ \]:]+:\d+)\] (.*)$")

# ----------------------------------------------------------------------------- tiny files
DATA_TRAIN = """layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TRAIN }}
  transform_param {{ scale: 0.00390625 }}
  data_param {{ source: "{train}" batch_size: 4 backend: LMDB }} }}
"""
DATA_TEST = """layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TEST }}
  transform_param {{ scale: 0.00390625 }}
  data_param {{ source: "{test}" batch_size: 5 backend: LMDB }} }}
"""
BODY = """layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  inner_product_param { num_output: 8 weight_filler { type: "xavier" } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param { num_output: 4 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""
SOLVER = """net: "net.prototxt"
base_lr: 0.01
momentum: 0.9
lr_policy: "fixed"
display: 1
max_iter: 3
snapshot_prefix: "tiny"
random_seed: 1701
"""


def make_lmdb(path, n=12, shape=(1, 4, 4), labels=None, records=None, seed=0):
    """An LMDB of ``n`` uint8 Datums (labels i % 4) or of the given raw ``records`` values."""
    from converters.datum import make_datum
    rng = np.random.RandomState(seed)
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        if records is None:
            records = []
            for i in range(n):
                arr = rng.randint(0, 255, size=shape).astype(np.uint8)
                label = labels[i] if labels is not None else i % 4
                records.append(make_datum(arr, label).SerializeToString())
        for i, value in enumerate(records):
            txn.put(b"%08d" % i, value)
    env.close()
    return str(path)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Shared read-only inputs: good LMDBs and a good caffemodel of the tiny net."""
    root = tmp_path_factory.mktemp("bad_inputs_base")
    files = {"train": make_lmdb(root / "train_lmdb"), "test": make_lmdb(root / "test_lmdb", n=10,
                                                                        seed=1)}
    from layers.net import Net
    from converters.prototxt import parse_text
    from converters import caffe_pb2
    text = DATA_TRAIN.format(**files) + BODY
    net = Net(parse_text(text, caffe_pb2.NetParameter()), "TRAIN", log=False)
    files["model"] = str(root / "tiny.caffemodel")
    net.save(files["model"])
    for layer in net.layer_modules:
        if hasattr(layer, "close"):
            layer.close()
    return files


class Case:
    """A directory with ``net.prototxt`` / ``solver.prototxt`` (editable) and a CLI run."""

    def __init__(self, path, base):
        self.path = path
        self.base = base
        self.net = DATA_TRAIN.format(**base) + DATA_TEST.format(**base) + BODY
        self.solver = SOLVER

    def write(self, name, text):
        p = os.path.join(self.path, name)
        with open(p, "w" if isinstance(text, str) else "wb") as f:
            f.write(text)
        return p

    def files(self):
        if self.net is not None:
            self.write("net.prototxt", self.net)
        if self.solver is not None:
            self.write("solver.prototxt", self.solver)


class Result:
    def __init__(self, code, text, exception=None):
        self.code, self.text, self.exception = code, text, exception
        self.entries = [LOG_LINE.match(l) for l in text.splitlines()]
        self.entries = [m for m in self.entries if m]

    def lines(self, severities):
        return [m.group(0) for m in self.entries if m.group(1) in severities]

    def failure_line(self):
        bad = self.lines("FE")
        return bad[0] if len(bad) == 1 else None


def run_in_process(args, cwd):
    """`trainer <args>` in this process (CliRunner), glog captured; signal handlers restored."""
    from cli.main import _register, main
    from converters import glog
    _register()
    buf = io.StringIO()
    old_cwd = os.getcwd()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    saved = (glog._State.stream, glog._State.min_level, glog._State.year)
    glog.configure(stream=buf, min_level=0)
    try:
        os.chdir(cwd)
        result = CliRunner().invoke(main, args, catch_exceptions=True)
        exc = result.exception
        if isinstance(exc, SystemExit):
            exc = None
        elif exc is not None:      # keep the traceback's text, not its frames
            import traceback
            exc = "".join(traceback.format_exception(exc))
        result.exception = result.exc_info = None    # (they hold the frames, hence the nets)
        gc.collect()             # the run's data layers stop their prefetch threads now
    finally:
        os.chdir(old_cwd)
        glog._State.stream, glog._State.min_level, glog._State.year = saved
        for s, h in handlers.items():
            signal.signal(s, h)
    out = buf.getvalue() + (result.output or "")
    try:
        out += result.stderr or ""
    except (ValueError, AttributeError):
        pass
    return Result(result.exit_code, out, exc)


def check_failure(res, *must_contain):
    """Non-zero exit, no traceback, exactly one F/E line, naming every ``must_contain``."""
    assert res.exception is None, "escaped exception:\n%s\n%s" % (res.exception, res.text[-3000:])
    assert res.code != 0, res.text[-3000:]
    assert "Traceback" not in res.text, res.text[-3000:]
    bad = res.lines("FE")
    assert len(bad) == 1, "want exactly one F/E line, got %d:\n%s" % (len(bad), res.text[-3000:])
    line = bad[0]
    assert "Internal error" not in line, line
    for text in must_contain:
        assert text in line, "%r not in the error line:\n%s" % (text, line)
    return line


# ----------------------------------------------------------------------------- the corpus
# Each entry: id -> function(case) that edits the case and returns (args, [substrings]).
CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


TRAIN = ["train", "--solver=solver.prototxt"]


@case
def malformed_net_prototxt(c):
    c.net = c.net + 'layer { name: "x" type: "ReLU" bottom: "ip2" top: "x" \n'   # no closing }
    return TRAIN, ["net.prototxt:", "Expected"]


@case
def malformed_net_position(c):
    c.net = 'name: "n"\nlayer {\n  name: "a"\n  type: "ReLU" bottom: "x" top "y"\n}\n'
    return TRAIN, ["net.prototxt:4:"]


@case
def malformed_solver_prototxt(c):
    c.solver = SOLVER + "max_iter 7\n"
    return TRAIN, ["solver.prototxt:9:"]


@case
def solver_not_utf8(c):
    c.solver = None
    c.write("solver.prototxt", b"net: \"net.prototxt\"\n\xff\xfe\x00junk")
    return TRAIN, ["solver.prototxt", "UTF-8"]


@case
def unknown_field_in_layer(c):
    c.net = c.net.replace("num_output: 8", "num_outputs: 8")
    return TRAIN, ["net.prototxt:", "num_outputs"]


@case
def unknown_field_in_solver(c):
    c.solver = SOLVER + "learning_rate: 0.1\n"
    return TRAIN, ["solver.prototxt:9:", "learning_rate"]


@case
def unknown_enum_value(c):
    c.solver = SOLVER + "solver_mode: TPU\n"
    return TRAIN, ["solver.prototxt:9:", "TPU"]


@case
def unknown_layer_type(c):
    c.net = c.net.replace('type: "ReLU"', 'type: "Relu"')
    return TRAIN, ["Unknown layer type: Relu", "relu1", "ReLU"]


@case
def bottom_not_produced(c):
    c.net = c.net.replace('bottom: "ip1" top: "ip2"', 'bottom: "ip0" top: "ip2"')
    return TRAIN, ["'ip0'", "ip2"]


@case
def duplicate_top(c):
    c.net = c.net.replace('name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1"',
                          'name: "relu1" type: "ReLU" bottom: "data" top: "ip1"')
    return TRAIN, ["produced by multiple sources", "'ip1'", "relu1", "'ip1'"]


@case
def include_and_exclude(c):
    c.net = c.net.replace('name: "relu1" type: "ReLU"',
                          'name: "relu1" type: "ReLU" include { phase: TRAIN } '
                          'exclude { phase: TEST }')
    return TRAIN, ["include", "exclude", "relu1"]


SHARED = """layer { name: "ipa" type: "InnerProduct" bottom: "data" top: "ipa"
  param { name: "w" lr_mult: 1 } param { name: "b" }
  inner_product_param { num_output: 4 weight_filler { type: "xavier" } } }
layer { name: "ipb" type: "InnerProduct" bottom: "data" top: "ipb"
  param { name: "w" %s } param { name: "b" }
  inner_product_param { num_output: %d weight_filler { type: "xavier" } } }
layer { name: "sum" type: "Eltwise" bottom: "ipa" bottom: "ipb" top: "ip2" }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""


@case
def shared_param_shape(c):
    c.net = DATA_TRAIN.format(**c.base) + SHARED % ("", 5)
    return TRAIN, ["shape", "'w'", "ipa", "ipb", "4 16", "5 16"]


@case
def shared_param_lr_mult(c):
    c.net = DATA_TRAIN.format(**c.base) + SHARED % ("lr_mult: 2", 4)
    return TRAIN, ["lr_mult", "'w'", "ipa", "ipb"]


@case
def caffemodel_truncated(c):
    data = open(c.base["model"], "rb").read()
    c.write("w.caffemodel", data[: len(data) // 2 + 3])
    return TRAIN + ["--weights=w.caffemodel"], ["w.caffemodel", "truncated"]


@case
def caffemodel_not_netparameter(c):
    c.write("w.caffemodel", b"this is not a protobuf at all \x00\x01\x02" * 20)
    return TRAIN + ["--weights=w.caffemodel"], ["w.caffemodel"]


@case
def caffemodel_is_a_prototxt(c):
    c.write("w.caffemodel", c.net)
    return TRAIN + ["--weights=w.caffemodel"], ["w.caffemodel"]


@case
def caffemodel_missing(c):
    return TRAIN + ["--weights=nowhere.caffemodel"], ["nowhere.caffemodel"]


@case
def caffemodel_shape_mismatch(c):
    c.net = c.net.replace("num_output: 8", "num_output: 6")
    return TRAIN + ["--weights=" + c.base["model"]], ["ip1", "param 0", "8 16", "6 16"]


@case
def caffemodel_blob_count_mismatch(c):
    c.net = c.net.replace("inner_product_param { num_output: 4",
                          "inner_product_param { bias_term: false num_output: 4")
    return TRAIN + ["--weights=" + c.base["model"]], ["ip2", "blobs"]


@case
def lmdb_missing(c):
    c.net = c.net.replace(c.base["train"], "no_such_lmdb")
    return TRAIN, ["no_such_lmdb", "data"]


@case
def lmdb_empty(c):
    make_lmdb(os.path.join(c.path, "empty_lmdb"), records=[])
    c.net = c.net.replace(c.base["train"], "empty_lmdb")
    return TRAIN, ["empty_lmdb", "no records"]


@case
def lmdb_is_a_file(c):
    c.write("file_lmdb", "not a database")
    c.net = c.net.replace(c.base["train"], "file_lmdb")
    return TRAIN, ["file_lmdb"]


@case
def corrupt_datum_first(c):
    make_lmdb(os.path.join(c.path, "bad_lmdb"), records=[b"\xff\xff\xff\xff garbage"] * 4)
    c.net = c.net.replace(c.base["train"], "bad_lmdb")
    return TRAIN, ["bad_lmdb", "00000000"]


@case
def corrupt_datum_later(c):
    """A bad record met during training (read by the prefetch thread)."""
    from converters.datum import make_datum
    good = [make_datum(np.zeros((1, 4, 4), np.uint8), 1).SerializeToString()] * 9
    make_lmdb(os.path.join(c.path, "bad_lmdb"), records=good + [b"\x0a\xff\xff\xff"] + good)
    c.net = c.net.replace(c.base["train"], "bad_lmdb")
    return TRAIN, ["bad_lmdb", "00000009"]


@case
def datum_size_mismatch(c):
    from converters import caffe_pb2
    bad = caffe_pb2.Datum(channels=1, height=4, width=4, data=b"\x00" * 10, label=0)
    make_lmdb(os.path.join(c.path, "bad_lmdb"), records=[bad.SerializeToString()] * 4)
    c.net = c.net.replace(c.base["train"], "bad_lmdb")
    return TRAIN, ["bad_lmdb", "00000000", "10"]


@case
def corrupt_encoded_image(c):
    from converters import caffe_pb2
    bad = caffe_pb2.Datum(channels=3, height=4, width=4, encoded=True,
                          data=b"\xff\xd8\xff\xe0 this is no jpeg", label=0)
    make_lmdb(os.path.join(c.path, "bad_lmdb"), records=[bad.SerializeToString()] * 4)
    c.net = c.net.replace(c.base["train"], "bad_lmdb")
    return TRAIN, ["00000000", "decode"]


@case
def label_out_of_range(c):
    make_lmdb(os.path.join(c.path, "lab_lmdb"), labels=[0, 1, 2, 3, 1, 7, 2, 3, 0, 1, 2, 3])
    c.net = c.net.replace(c.base["train"], "lab_lmdb")
    return TRAIN, ["loss", "7"]


@case
def label_negative(c):
    make_lmdb(os.path.join(c.path, "lab_lmdb"), labels=[0, 1, -1, 3] * 3)
    c.net = c.net.replace(c.base["train"], "lab_lmdb")
    return TRAIN, ["loss", "-1"]


@case
def cmd_test_label_through_split(c):
    """`trainer test`: the label goes to Accuracy and the loss (through a Split layer)."""
    make_lmdb(os.path.join(c.path, "lab_lmdb"), n=10, labels=[0, 1, 2, 3, 4, 0, 1, 2, 3, 0])
    c.net = DATA_TEST.format(train="", test="lab_lmdb") + BODY + (
        'layer { name: "acc" type: "Accuracy" bottom: "ip2" bottom: "label" top: "acc" }\n')
    return ["test", "--model=net.prototxt", "--weights=" + c.base["model"], "--iterations=2"], \
        ["label 4", "00000004", "loss"]


@case
def solver_without_net(c):
    c.solver = SOLVER.replace('net: "net.prototxt"\n', "")
    return TRAIN, ["no training net"]


@case
def solver_net_file_missing(c):
    c.solver = SOLVER.replace('net: "net.prototxt"', 'net: "nonet.prototxt"')
    return TRAIN, ["nonet.prototxt"]


@case
def solver_file_missing(c):
    return ["train", "--solver=nosolver.prototxt"], ["nosolver.prototxt"]


@case
def solver_is_directory(c):
    os.mkdir(os.path.join(c.path, "adir"))
    return ["train", "--solver=adir"], ["adir"]


@case
def no_solver_flag(c):
    return ["train"], ["solver"]


@case
def interval_without_test_iter(c):
    c.solver = SOLVER + "test_interval: 2\n"
    return TRAIN, ["test_iter"]


@case
def average_loss_zero(c):
    c.solver = SOLVER + "average_loss: 0\n"
    return TRAIN, ["average_loss"]


@case
def iter_size_zero(c):
    c.solver = SOLVER + "iter_size: 0\n"
    return TRAIN, ["iter_size"]


@case
def adagrad_with_momentum(c):
    c.solver = SOLVER.replace("momentum: 0.9", "momentum: -0.5") + 'type: "AdaGrad"\n'
    return TRAIN, ["AdaGrad", "omentum"]


@case
def rmsprop_bad_decay(c):
    c.solver = SOLVER.replace("momentum: 0.9\n", "") + 'type: "RMSProp"\nrms_decay: 1.5\n'
    return TRAIN, ["rms_decay"]


@case
def step_policy_without_stepsize(c):
    c.solver = SOLVER.replace('"fixed"', '"step"') + "gamma: 0.1\n"
    return TRAIN, ["stepsize"]


@case
def negative_gamma(c):
    c.solver = SOLVER.replace('"fixed"', '"inv"') + "gamma: -0.1\npower: 0.75\n"
    return TRAIN, ["gamma", "-0.1"]


@case
def unknown_lr_policy(c):
    c.solver = SOLVER.replace('"fixed"', '"cosine"')
    return TRAIN, ["cosine"]


@case
def unknown_solver_type(c):
    c.solver = SOLVER + 'type: "Adamm"\n'
    return TRAIN, ["Adamm", "Adam"]


@case
def weights_and_snapshot(c):
    return TRAIN + ["--weights=a.caffemodel", "--snapshot=b.solverstate"], ["snapshot",
                                                                            "weights"]


@case
def snapshot_prefix_dir_missing(c):
    c.solver = SOLVER.replace('snapshot_prefix: "tiny"', 'snapshot_prefix: "nodir/sub/tiny"')
    return TRAIN, ["nodir/sub", "does not exist"]


@case
def snapshot_prefix_under_a_file(c):
    c.write("afile", "x")
    c.solver = SOLVER.replace('snapshot_prefix: "tiny"', 'snapshot_prefix: "afile/tiny"')
    return TRAIN, ["afile"]


@case
def snapshot_prefix_not_writable(c):
    if os.geteuid() == 0:
        target = "/sys/trainer_snapshot_test"       # sysfs refuses new files, even to root
        try:
            open(os.path.join("/sys", "trainer_probe"), "wb").close()
            pytest.skip("/sys is writable here")
        except OSError:
            pass
        c.solver = SOLVER.replace('snapshot_prefix: "tiny"', 'snapshot_prefix: "%s"' % target)
        return TRAIN, ["/sys", "not writable"]
    d = os.path.join(c.path, "ro")
    os.mkdir(d)
    os.chmod(d, 0o555)
    c.solver = SOLVER.replace('snapshot_prefix: "tiny"', 'snapshot_prefix: "ro/tiny"')
    return TRAIN, ["ro", "not writable"]


@case
def snapshot_file_missing(c):
    return TRAIN + ["--snapshot=none.solverstate"], ["none.solverstate"]


@case
def snapshot_not_a_solverstate(c):
    c.write("s.solverstate", b"\x00\x01garbage" * 7)
    return TRAIN + ["--snapshot=s.solverstate"], ["s.solverstate"]


@case
def snapshot_history_mismatch(c):
    """A solverstate of another net (history of 2 blobs) for this 4-param net."""
    from converters import caffe_pb2
    from converters.caffemodel import array_to_blob, write_solverstate
    state = caffe_pb2.SolverState(iter=2, learned_net=c.base["model"])
    for _ in range(2):
        state.history.add().CopyFrom(array_to_blob(np.zeros((3,), np.float32)))
    write_solverstate(os.path.join(c.path, "s.solverstate"), state)
    return TRAIN + ["--snapshot=s.solverstate"], ["s.solverstate", "history"]


@case
def python_layer_refused(c):
    c.net = c.net.replace('name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1"',
                          'name: "pyl" type: "Python" bottom: "ip1" top: "ip1" '
                          'python_param { module: "evil" layer: "Evil" }')
    return TRAIN, ["Python", "pyl", "evil"]


@case
def python_layer_with_flag(c):
    c.net = c.net.replace('name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1"',
                          'name: "pyl" type: "Python" bottom: "ip1" top: "ip1" '
                          'python_param { module: "evil" layer: "Evil" }')
    return TRAIN + ["--allow-python-layers"], ["Python", "pyl", "not supported"]


@case
def bad_gpu_flag(c):
    return TRAIN + ["--gpu=zero"], ["--gpu", "zero"]


@case
def bad_sigint_effect(c):
    return TRAIN + ["--sigint_effect=explode"], ["sigint_effect", "explode"]


@case
def unknown_flag(c):
    return TRAIN + ["--solverr=x"], ["solverr"]


@case
def blob_count_for_layer(c):
    c.net = c.net.replace('bottom: "ip2" bottom: "label" top: "loss"', 'bottom: "ip2" top: "loss"')
    return TRAIN, ["loss", "bottom blob"]


@case
def filler_min_above_max(c):
    """A parameter the layer itself does not check: the error still names the layer."""
    c.net = c.net.replace('num_output: 8 weight_filler { type: "xavier" }',
                          'num_output: 8 weight_filler { type: "uniform" min: 3 max: 1 }')
    return TRAIN, ["'ip1'", "InnerProduct", "uniform"]


@case
def degenerate_layer_in_forward(c):
    c.net = c.net.replace('layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }',
                          'layer { name: "bn" type: "BatchNorm" bottom: "ip1" top: "ip1" '
                          'batch_norm_param { eps: -1 } }')
    return TRAIN, ["'bn'", "BatchNorm", "eps"]


@case
def hdf5_snapshot_format(c):
    c.solver = SOLVER + "snapshot_format: HDF5\n"
    return TRAIN, ["HDF5"]


@case
def cmd_test_weights_shape_mismatch(c):
    """`trainer test` on a net whose input (8x8 images) does not fit the 4x4 weights."""
    make_lmdb(os.path.join(c.path, "big_lmdb"), n=10, shape=(1, 8, 8))
    c.net = DATA_TEST.format(train="", test="big_lmdb") + BODY
    return ["test", "--model=net.prototxt", "--weights=" + c.base["model"], "--iterations=2"], \
        ["ip1", "16", "64"]


@case
def cmd_test_record_shape_changes(c):
    """`trainer test`: a batch whose records are larger than the first ones."""
    from converters.datum import make_datum
    small = make_datum(np.zeros((1, 4, 4), np.uint8), 1).SerializeToString()
    large = make_datum(np.zeros((1, 5, 5), np.uint8), 1).SerializeToString()
    make_lmdb(os.path.join(c.path, "mixed_lmdb"), records=[small] * 5 + [large] * 5)
    c.net = DATA_TEST.format(train="", test="mixed_lmdb") + BODY
    return ["test", "--model=net.prototxt", "--weights=" + c.base["model"], "--iterations=2"], \
        ["'ip1'", "'data'", "5 1 5 5", "5 1 4 4"]


@case
def cmd_test_model_missing(c):
    return ["test", "--model=none.prototxt", "--weights=" + c.base["model"]], ["none.prototxt"]


@case
def cmd_test_no_weights(c):
    return ["test", "--model=net.prototxt"], ["weights"]


@case
def input_layer_net_for_test_weights(c):
    """`trainer test` with an Input-fed deploy net whose input shape does not fit the weights."""
    c.net = ('layer { name: "data" type: "Input" top: "data" '
             'input_param { shape { dim: 2 dim: 1 dim: 3 dim: 3 } } }\n' + BODY.split(
                 'layer { name: "loss"')[0])
    return ["test", "--model=net.prototxt", "--weights=" + c.base["model"], "--iterations=1"], \
        ["ip1", "8 16", "8 9"]


@case
def same_top_twice_in_one_layer(c):
    c.net = c.net.replace('name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1"',
                          'name: "sp" type: "Split" bottom: "ip1" top: "x" top: "x"')
    return TRAIN, ["Top blob 'x' produced by multiple sources", "'sp'"]


@case
def solver_net_and_train_net(c):
    c.solver = SOLVER + 'train_net: "net.prototxt"\n'
    return TRAIN, ["more than one of these fields specifying a train net", "net, train_net"]


@case
def solver_test_iter_without_test_net(c):
    c.solver = SOLVER.replace('net: "net.prototxt"', 'train_net: "net.prototxt"') + \
        "test_iter: 2\ntest_interval: 2\n"
    return TRAIN, ["test_iter must be specified for each test network", "0 test nets"]


@case
def train_iterations_negative(c):
    return TRAIN + ["--iterations=-5"], ["--iterations", "-5"]


@case
def cmd_test_iterations_zero(c):
    return ["test", "--model=net.prototxt", "--weights=" + c.base["model"], "--iterations=0"], \
        ["--iterations must be at least 1"]


@case
def batch_too_big_for_a_blob(c):
    """Refused before the loader thread starts reading a billion records."""
    c.net = c.net.replace("batch_size: 4", "batch_size: 1000000000")
    return TRAIN, ["exceeds INT_MAX", "'data'", "1000000000 1 4 4"]


@case
def inner_product_without_num_output(c):
    c.net = c.net.replace("num_output: 8 ", "")
    return TRAIN, ["num_output must be positive", "ip1"]


@case
def conv_without_bottom(c):
    c.net = c.net.replace('layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }',
                          'layer { name: "c" type: "Convolution" top: "c" '
                          'convolution_param { num_output: 2 kernel_size: 1 } }')
    return TRAIN, ["Check failed: MinBottomBlobs() <= bottom.size() (1 vs. 0)", "layer c"]


@case
def snapshot_of_another_net(c):
    """A solverstate whose learned_net was written for ip1 with 8 outputs; the net has 6."""
    from converters import caffe_pb2
    from converters.caffemodel import write_solverstate
    write_solverstate(os.path.join(c.path, "s.solverstate"),
                      caffe_pb2.SolverState(iter=2, learned_net=c.base["model"]))
    c.net = c.net.replace("num_output: 8", "num_output: 6")
    return TRAIN + ["--snapshot=s.solverstate"], \
        ["'ip1'", "tiny.caffemodel", "learned_net of s.solverstate", "--weights"]


@case
def input_without_shape(c):
    c.net = 'layer { name: "data" type: "Input" top: "data" }\n' + BODY.split(
        'layer { name: "loss"')[0]
    return ["test", "--model=net.prototxt", "--weights=" + c.base["model"], "--iterations=1"], \
        ["ip1", "bottom 'data' has no shape", "Input layer 'data'"]


@case
def mean_file_of_another_size(c):
    from converters import caffe_pb2
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.extend([1, 3, 4, 4])
    blob.data.extend([0.0] * 48)
    c.write("mean.binaryproto", blob.SerializeToString())
    c.net = c.net.replace("transform_param { scale: 0.00390625 }",
                          'transform_param { mean_file: "mean.binaryproto" }', 1)
    return TRAIN, ["datum_channels == data_mean_.channels() (1 vs. 3)", "mean.binaryproto",
                   "3x4x4", "1x4x4"]


@case
def argmax_under_a_loss(c):
    """ArgMax has no backward (Caffe: Not Implemented Yet at the first backward); the weights
    below it would silently never train."""
    c.net = c.net.replace(
        'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }',
        'layer { name: "am" type: "ArgMax" bottom: "ip2" top: "am" }\n'
        'layer { name: "loss" type: "EuclideanLoss" bottom: "am" bottom: "label" top: "loss" }')
    return TRAIN, ["Layer 'am' (type ArgMax) needs backward computation", "no backward", "'ip2'",
                   "propagate_down"]


@case
def snapshot_in_hdf5(c):
    c.write("s.solverstate.h5", b"\x89HDF\r\n\x1a\n" + b"\x00" * 32)
    return TRAIN + ["--snapshot=s.solverstate.h5"], ["s.solverstate.h5", "HDF5 solverstate"]


@case
def unknown_weight_filler(c):
    c.net = c.net.replace('num_output: 8 weight_filler { type: "xavier" }',
                          'num_output: 8 weight_filler { type: "bogus" }')
    return TRAIN, ["Unknown filler name: bogus", "layer ip1"]


@case
def unknown_dummy_data_filler(c):
    c.net = c.net + ('layer { name: "dd" type: "DummyData" top: "dd" dummy_data_param { '
                     'shape { dim: 2 dim: 3 } data_filler { type: "bogus" } } }\n'
                     'layer { name: "sil" type: "Silence" bottom: "dd" }\n')
    return TRAIN, ["Unknown filler name: bogus", "layer dd"]


@case
def image_data_file_is_not_an_image(c):
    c.write("text.png", "not an image\n")
    c.write("list.txt", "text.png 1\n")
    c.net = ('layer { name: "img" type: "ImageData" top: "data" top: "label" '
             'image_data_param { source: "list.txt" batch_size: 1 } }\n' + BODY)
    return TRAIN, ["text.png", "layer img"]


@case
def records_of_two_sizes_in_one_batch(c):
    from converters.datum import make_datum
    small = make_datum(np.zeros((1, 4, 4), np.uint8), 1).SerializeToString()
    large = make_datum(np.zeros((1, 5, 5), np.uint8), 1).SerializeToString()
    make_lmdb(os.path.join(c.path, "mixed_lmdb"), records=[small] * 2 + [large] * 10)
    c.net = DATA_TRAIN.format(train="mixed_lmdb", test="") + BODY
    return TRAIN, ["items of a batch differ in size", "record key '00000002'", "1x5x5",
                   "record key '00000000'", "1x4x4"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name, base, tmp_path):
    c = Case(str(tmp_path), base)
    args, must = CASES[name](c)
    c.files()
    res = run_in_process(args, str(tmp_path))
    check_failure(res, *must)


def test_corpus_is_large_enough():
    assert len(CASES) >= 30


# ----------------------------------------------------------------------------- subprocess
SUBPROCESS_CASES = ["malformed_net_position", "corrupt_datum_later", "python_layer_refused",
                    "unknown_flag"]


@pytest.fixture(scope="module")
def subprocess_runs(base, tmp_path_factory):
    """The real command line for a few cases (and one with --debug), all started at once."""
    import subprocess
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    jobs = {}
    for name in SUBPROCESS_CASES + ["debug"]:
        path = tmp_path_factory.mktemp("sub_" + name)
        c = Case(str(path), base)
        args, must = CASES["unknown_layer_type" if name == "debug" else name](c)
        c.files()
        if name == "debug":
            args, must = args + ["--debug"], []
        proc = subprocess.Popen([sys.executable, "-m", "cli"] + args, cwd=str(path), env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        jobs[name] = (proc, must)
    results = {}
    for name, (proc, must) in jobs.items():
        out, err = proc.communicate(timeout=300)
        results[name] = (Result(proc.returncode, out + err), must)
    return results


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_bad_input_subprocess(name, subprocess_runs):
    """`python -m cli ...`: one glog F line on stderr, no traceback, non-zero exit."""
    res, must = subprocess_runs[name]
    line = check_failure(res, *must)
    assert line.startswith("F"), line


def test_debug_shows_traceback(subprocess_runs):
    res, _ = subprocess_runs["debug"]
    assert res.code != 0
    assert "Traceback" in res.text
    assert len(res.lines("F")) == 1


# ----------------------------------------------------------------------------- not errors
@pytest.mark.parametrize("value,level", [("abc", 0), ("2x", 2), (" 1", 1), ("", 0)])
def test_glog_minloglevel_is_read_as_glog_reads_it(monkeypatch, value, level):
    """glog reads GLOG_minloglevel with strtol: a leading integer, else 0 (not a traceback)."""
    from converters import glog
    saved = glog._State.min_level
    monkeypatch.setenv("GLOG_minloglevel", value)
    try:
        glog.configure()
        assert glog._State.min_level == level
    finally:
        glog._State.min_level = saved


def test_duplicate_layer_names_are_warned(base, tmp_path):
    """Caffe accepts two layers of one name, but copies and shares weights by name: a W line."""
    c = Case(str(tmp_path), base)
    c.net = c.net.replace('name: "ip2"', 'name: "ip1"')
    c.files()
    res = run_in_process(TRAIN, str(tmp_path))
    assert res.code == 0, res.text[-3000:]
    warned = [l for l in res.lines("W") if "both named 'ip1'" in l]
    assert len(warned) == 1, res.text[-3000:]
    assert "give each layer its own name" in warned[0]


def test_corrupt_sidecar_is_reported_as_corrupt(base, tmp_path):
    c = Case(str(tmp_path), base)
    c.files()
    assert run_in_process(TRAIN, str(tmp_path)).code == 0
    sidecar = tmp_path / "tiny_iter_3.solverstate.trainer"
    sidecar.write_text(sidecar.read_text()[:40])
    c.solver = SOLVER.replace("max_iter: 3", "max_iter: 4")
    c.files()
    res = run_in_process(TRAIN + ["--snapshot=tiny_iter_3.solverstate"], str(tmp_path))
    assert res.code == 0, res.text[-3000:]
    warned = [l for l in res.lines("W") if "tiny_iter_3.solverstate.trainer" in l]
    assert len(warned) == 1 and "cannot be read" in warned[0], res.text[-3000:]


def test_gpu_request_without_cuda_falls_back(base, tmp_path, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    c = Case(str(tmp_path), base)
    c.files()
    res = run_in_process(TRAIN + ["--gpu=0"], str(tmp_path))
    assert res.exception is None and res.code == 0, res.text[-3000:]
    warnings = res.lines("W")
    assert len(warnings) == 1 and "CUDA" in warnings[0] and "CPU" in warnings[0], warnings
    assert not res.lines("FE")
    assert "Optimization Done." in res.text


def test_gpu_solver_mode_without_cuda_falls_back(base, tmp_path, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    c = Case(str(tmp_path), base)
    c.solver = SOLVER + "solver_mode: GPU\n"
    c.files()
    res = run_in_process(TRAIN, str(tmp_path))
    assert res.exception is None and res.code == 0, res.text[-3000:]
    assert len(res.lines("W")) == 1
    assert not res.lines("FE")


def test_ignore_label_is_not_out_of_range(base, tmp_path):
    make_lmdb(tmp_path / "lab_lmdb", labels=[0, 1, 255, 3] * 3)
    c = Case(str(tmp_path), base)
    c.net = (DATA_TRAIN.format(train="lab_lmdb") + BODY).replace(
        'top: "loss" }', 'top: "loss" loss_param { ignore_label: 255 } }')
    c.files()
    res = run_in_process(TRAIN, str(tmp_path))
    assert res.exception is None and res.code == 0, res.text[-3000:]
    assert not res.lines("FE")


# ----------------------------------------------------------------------------- NaN
NAN_SOLVER = SOLVER.replace("base_lr: 0.01", "base_lr: 1e30").replace("max_iter: 3",
                                                                      "max_iter: 50")


def test_nan_loss_stops_with_last_finite_snapshot(base, tmp_path):
    from converters.caffemodel import blob_to_array, read_caffemodel, read_solverstate
    c = Case(str(tmp_path), base)
    c.solver = NAN_SOLVER
    c.files()
    res = run_in_process(TRAIN, str(tmp_path))
    line = check_failure(res, "Iteration", "layer")
    m = re.search(r"Iteration (\d+)", line)
    it = int(m.group(1))
    assert re.search(r"layer '(ip1|relu1|ip2|loss)'", line), line
    models = sorted(p for p in os.listdir(tmp_path) if p.endswith("_last_finite.caffemodel"))
    states = sorted(p for p in os.listdir(tmp_path) if p.endswith("_last_finite.solverstate"))
    assert len(models) == 1 and len(states) == 1, os.listdir(tmp_path)
    assert models[0] in line
    n = int(re.match(r"tiny_iter_(\d+)_last_finite", models[0]).group(1))
    assert n in (it, it - 1)
    net = read_caffemodel(str(tmp_path / models[0]))
    count = 0
    for layer in net.layer:
        for b in layer.blobs:
            assert np.isfinite(blob_to_array(b)).all(), layer.name
            count += 1
    assert count == 4
    state = read_solverstate(str(tmp_path / states[0]))
    assert state.iter == n
    for h in state.history:
        assert np.isfinite(blob_to_array(h)).all()
    # the last-finite snapshot resumes (finite weights, finite history)
    c.solver = SOLVER.replace("max_iter: 3", "max_iter: %d" % (n + 2))
    c.files()
    res2 = run_in_process(TRAIN + ["--snapshot=" + states[0]], str(tmp_path))
    assert res2.code == 0 and not res2.lines("FE"), res2.text[-3000:]


def test_nan_from_data_names_first_layer(tmp_path):
    """Non-finite input data: the message names the data layer's top as the first culprit."""
    from converters.datum import make_datum
    recs = [make_datum(np.full((1, 4, 4), np.inf, np.float32), 1).SerializeToString()] * 4
    make_lmdb(tmp_path / "inf_lmdb", records=recs)
    c = Case(str(tmp_path), {"train": "inf_lmdb", "test": "inf_lmdb"})
    c.net = DATA_TRAIN.format(train="inf_lmdb") + BODY
    c.files()
    res = run_in_process(TRAIN, str(tmp_path))
    line = check_failure(res, "Iteration 0", "layer 'data'")
