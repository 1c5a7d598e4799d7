"""Legacy nets end to end: a V1 (``layers { type: CONVOLUTION blobs_lr: 1 }``) and a V0
(``layers { layer { type: "conv" } }``) LeNet are upgraded as Caffe upgrades them (with its log
lines) and trained by `trainer train` in a subprocess; a V1 binary .caffemodel loads into the V2
LeNet by layer name.
"""
import os
import re
import subprocess
import sys

import numpy as np

import caffelog
from conftest import ROOT

TRAIN_LMDB = os.path.join(ROOT, "configs", "lenet", "digits_train_lmdb")
TEST_LMDB = os.path.join(ROOT, "configs", "lenet", "digits_test_lmdb")
ITERATIONS = 30


def run_trainer(args, cwd, timeout=300):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "cli"] + args, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _v1_layer(name, type_, bottoms, tops, body="", blobs_lr=True):
    text = "layers {\n  name: \"%s\"\n  type: %s\n" % (name, type_)
    text += "".join('  bottom: "%s"\n' % b for b in bottoms)
    text += "".join('  top: "%s"\n' % t for t in tops)
    if blobs_lr:
        text += "  blobs_lr: 1\n  blobs_lr: 2\n  weight_decay: 1\n  weight_decay: 0\n"
    return text + body + "}\n"


XAVIER = 'weight_filler { type: "xavier" } bias_filler { type: "constant" }'

# Caffe's examples/mnist/lenet_train_test.prototxt as it was in V1 days (2014), data scale in
# data_param (the deprecated transformation field), on the digits LMDB of configs/lenet.
V1_LENET = ('name: "LeNet"\n'
            + _v1_layer("digits", "DATA", [], ["data", "label"],
                        '  data_param { source: "%s" backend: LMDB batch_size: 32 '
                        'scale: 0.00390625 }\n  include: { phase: TRAIN }\n' % TRAIN_LMDB,
                        blobs_lr=False)
            + _v1_layer("digits", "DATA", [], ["data", "label"],
                        '  data_param { source: "%s" backend: LMDB batch_size: 100 '
                        'scale: 0.00390625 }\n  include: { phase: TEST }\n' % TEST_LMDB,
                        blobs_lr=False)
            + _v1_layer("conv1", "CONVOLUTION", ["data"], ["conv1"],
                        "  convolution_param { num_output: 20 kernel_size: 5 stride: 1 %s }\n"
                        % XAVIER)
            + _v1_layer("pool1", "POOLING", ["conv1"], ["pool1"],
                        "  pooling_param { pool: MAX kernel_size: 2 stride: 2 }\n", False)
            + _v1_layer("conv2", "CONVOLUTION", ["pool1"], ["conv2"],
                        "  convolution_param { num_output: 50 kernel_size: 5 stride: 1 %s }\n"
                        % XAVIER)
            + _v1_layer("pool2", "POOLING", ["conv2"], ["pool2"],
                        "  pooling_param { pool: MAX kernel_size: 2 stride: 2 }\n", False)
            + _v1_layer("ip1", "INNER_PRODUCT", ["pool2"], ["ip1"],
                        "  inner_product_param { num_output: 500 %s }\n" % XAVIER)
            + _v1_layer("relu1", "RELU", ["ip1"], ["ip1"], blobs_lr=False)
            + _v1_layer("ip2", "INNER_PRODUCT", ["ip1"], ["ip2"],
                        "  inner_product_param { num_output: 10 %s }\n" % XAVIER)
            + _v1_layer("accuracy", "ACCURACY", ["ip2", "label"], ["accuracy"],
                        "  include: { phase: TEST }\n", blobs_lr=False)
            + _v1_layer("loss", "SOFTMAX_LOSS", ["ip2", "label"], ["loss"], blobs_lr=False))


def _v0_layer(body, bottoms, tops):
    return ("layers {\n  layer {\n%s  }\n" % body
            + "".join('  bottom: "%s"\n' % b for b in bottoms)
            + "".join('  top: "%s"\n' % t for t in tops) + "}\n")


V0_XAVIER = ('    weight_filler { type: "xavier" }\n    bias_filler { type: "constant" }\n'
             "    blobs_lr: 1.\n    blobs_lr: 2.\n")

# The 2013 (V0) LeNet: one layer message inside each connection, V0 type strings and fields
# (batchsize, kernelsize, no backend: the upgraded Data layer reads the LMDB with a warning).
V0_LENET = ('name: "LeNet"\n'
            + _v0_layer('    name: "mnist"\n    type: "data"\n    source: "%s"\n'
                        "    batchsize: 32\n    scale: 0.00390625\n" % TRAIN_LMDB, [],
                        ["data", "label"])
            + _v0_layer('    name: "conv1"\n    type: "conv"\n    num_output: 20\n'
                        "    kernelsize: 5\n    stride: 1\n" + V0_XAVIER, ["data"], ["conv1"])
            + _v0_layer('    name: "pool1"\n    type: "pool"\n    kernelsize: 2\n    stride: 2\n'
                        "    pool: MAX\n", ["conv1"], ["pool1"])
            + _v0_layer('    name: "conv2"\n    type: "conv"\n    num_output: 50\n'
                        "    kernelsize: 5\n    stride: 1\n" + V0_XAVIER, ["pool1"], ["conv2"])
            + _v0_layer('    name: "pool2"\n    type: "pool"\n    kernelsize: 2\n    stride: 2\n'
                        "    pool: MAX\n", ["conv2"], ["pool2"])
            + _v0_layer('    name: "ip1"\n    type: "innerproduct"\n    num_output: 500\n'
                        + V0_XAVIER, ["pool2"], ["ip1"])
            + _v0_layer('    name: "relu1"\n    type: "relu"\n', ["ip1"], ["ip1"])
            + _v0_layer('    name: "ip2"\n    type: "innerproduct"\n    num_output: 10\n'
                        + V0_XAVIER, ["ip1"], ["ip2"])
            + _v0_layer('    name: "loss"\n    type: "softmax_loss"\n', ["ip2", "label"],
                        ["loss"]))

SOLVER = """net: "{net}"
{test}base_lr: 0.01
momentum: 0.9
weight_decay: 0.0005
lr_policy: "inv"
gamma: 0.0001
power: 0.75
display: 1
max_iter: 10000
snapshot_prefix: "{prefix}"
solver_type: SGD
solver_mode: CPU
random_seed: 1701
"""


def _train(tmp_path, net_text, name, test=""):
    (tmp_path / (name + ".prototxt")).write_text(net_text)
    (tmp_path / "solver.prototxt").write_text(SOLVER.format(
        net=name + ".prototxt", test=test, prefix=str(tmp_path / name)))
    proc = run_trainer(["train", "--solver=solver.prototxt",
                        "--iterations=%d" % ITERATIONS], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr


def _texts(log, tag_prefix):
    return [text for _, tag, text in caffelog.parse(log) if tag.startswith(tag_prefix)]


def _check_trained(log, tmp_path, name):
    losses = caffelog.iteration_losses(caffelog.parse(log))
    assert sorted(losses) == list(range(ITERATIONS)), sorted(losses)
    first = np.mean([losses[i] for i in range(3)])
    last = np.mean([losses[i] for i in range(ITERATIONS - 3, ITERATIONS)])
    assert first > 2.0 and last < first - 0.2, (first, last)
    assert (tmp_path / ("%s_iter_%d.caffemodel" % (name, ITERATIONS))).exists()
    assert (tmp_path / ("%s_iter_%d.solverstate" % (name, ITERATIONS))).exists()


def test_v1_lenet_upgrades_and_trains(tmp_path):
    log = _train(tmp_path, V1_LENET, "lenet_v1", test="test_iter: 2\ntest_interval: 15\n")
    upgrade = _texts(log, "upgrade_proto.cpp")
    net_file = "lenet_v1.prototxt"
    # once for the train net, once for the test net, as Caffe reads the file for each
    assert upgrade.count("Attempting to upgrade input file specified using deprecated "
                         "V1LayerParameter: %s" % net_file) == 2, upgrade
    assert upgrade.count("Successfully upgraded file specified using deprecated "
                         "V1LayerParameter") == 2
    assert upgrade.count("Attempting to upgrade input file specified using deprecated "
                         "transformation parameters: %s" % net_file) == 2
    assert ("Attempting to upgrade input file specified using deprecated 'solver_type' field "
            "(enum)': solver.prototxt") in upgrade
    # the upgraded net is what the log shows: V2 layer types, param specs from blobs_lr
    init = [t for t in _texts(log, "net.cpp:53")]
    assert init and 'type: "Convolution"' in init[0] and "lr_mult: 2" in init[0]
    assert "decay_mult: 0" in init[0] and "scale: 0.00390625" in init[0]
    assert "layers {" not in init[0]
    _check_trained(log, tmp_path, "lenet_v1")
    accuracies = [float(m.group(1)) for m in re.finditer(
        r"Test net output #0: accuracy = (\S+)", log)]
    assert len(accuracies) == 3 and accuracies[-1] > 0.3, accuracies


def test_v0_lenet_upgrades_and_trains(tmp_path):
    log = _train(tmp_path, V0_LENET, "lenet_v0")
    upgrade = _texts(log, "upgrade_proto.cpp")
    assert ("Attempting to upgrade input file specified using deprecated V0LayerParameter: "
            "lenet_v0.prototxt") in upgrade
    assert "Successfully upgraded file specified using deprecated V0LayerParameter" in upgrade
    assert any(t.startswith("Note that future Caffe releases will not support V0NetParameter")
               for t in upgrade)
    assert "Successfully upgraded file specified using deprecated V1LayerParameter" in upgrade
    init = _texts(log, "net.cpp:53")[0]
    assert 'type: "Pooling"' in init and "kernel_size: 5" in init and "batch_size: 32" in init
    _check_trained(log, tmp_path, "lenet_v0")


def test_v0_upgrade_problems_are_logged_not_silent(tmp_path, glog_capture):
    """A V0 field that has no home in its layer type is Caffe's LOG(ERROR) and a warning line,
    and the net still builds (Caffe continues too)."""
    from layers.net import Net
    bad = V0_LENET.replace('    type: "relu"\n', '    type: "relu"\n    num_output: 3\n')
    (tmp_path / "bad.prototxt").write_text(bad)
    net = Net(str(tmp_path / "bad.prototxt"), log=False)
    assert net.layer_types[net.layer_names.index("relu1")] == "ReLU"
    errors = [text for sev, tag, text in caffelog.parse(glog_capture.getvalue()) if sev == "E"]
    assert any("Unknown parameter num_output for layer type relu" in e for e in errors), errors
    assert any("had one or more problems upgrading V0NetParameter" in e for e in errors)


# ------------------------------------------------------------------ V1 binary caffemodel
def _v1_caffemodel(path, rs):
    """A V1 .caffemodel of LeNet (``layers`` with enum types and legacy 4-D blobs), as
    Caffe rc1 wrote them; returns {layer: [arrays in the V2 net's shapes]}."""
    from converters import caffe_pb2
    V1 = caffe_pb2.V1LayerParameter
    net = caffe_pb2.NetParameter()
    net.name = "LeNet"
    want = {}
    shapes = {"conv1": ((20, 1, 5, 5), (20,)), "conv2": ((50, 20, 5, 5), (50,)),
              "ip1": ((500, 800), (500,)), "ip2": ((10, 500), (10,))}
    for name, type_ in (("conv1", V1.CONVOLUTION), ("pool1", V1.POOLING),
                        ("conv2", V1.CONVOLUTION), ("pool2", V1.POOLING),
                        ("ip1", V1.INNER_PRODUCT), ("relu1", V1.RELU),
                        ("ip2", V1.INNER_PRODUCT), ("loss", V1.SOFTMAX_LOSS)):
        layer = net.layers.add()
        layer.name, layer.type = name, type_
        layer.blobs_lr.extend([1, 2])
        for shape in shapes.get(name, ()):
            arr = rs.randn(*shape).astype(np.float32)
            legacy = (1,) * (4 - len(shape)) + shape     # num, channels, height, width
            blob = layer.blobs.add()
            blob.num, blob.channels, blob.height, blob.width = legacy
            blob.data.extend(arr.ravel().tolist())
            want.setdefault(name, []).append(arr)
    with open(path, "wb") as f:
        f.write(net.SerializeToString())
    return want


def test_v1_caffemodel_loads_into_v2_net(tmp_path, glog_capture):
    from layers.net import Net
    want = _v1_caffemodel(tmp_path / "v1.caffemodel", np.random.RandomState(7))
    net = Net(os.path.join(ROOT, "configs", "lenet", "lenet_train_test.prototxt"), phase="TEST",
              weights=str(tmp_path / "v1.caffemodel"), log=False)
    for name, arrays in want.items():
        assert len(net.params[name]) == len(arrays)
        for p, arr in zip(net.params[name], arrays):
            assert np.array_equal(p.data, arr), name
    log = glog_capture.getvalue()
    assert "deprecated V1LayerParameter: %s" % (tmp_path / "v1.caffemodel") in log


def test_v1_caffemodel_finetunes_from_the_cli(tmp_path):
    """`trainer train --weights v1.caffemodel` on the V2 LeNet: weights copied by layer name,
    the V1 upgrade logged, training runs (from the repository root, where the LeNet's
    relative LMDB paths resolve)."""
    _v1_caffemodel(tmp_path / "v1.caffemodel", np.random.RandomState(3))
    solver = tmp_path / "solver.prototxt"
    solver.write_text('net: "%s"\nbase_lr: 0.001\nmomentum: 0.9\nlr_policy: "fixed"\n'
                      "display: 1\nmax_iter: 2\nsnapshot_prefix: \"%s\"\n"
                      % (os.path.join(ROOT, "configs", "lenet", "lenet_train_test.prototxt"),
                         tmp_path / "ft"))
    weights = tmp_path / "v1.caffemodel"
    proc = run_trainer(["train", "--solver=%s" % solver, "--weights=%s" % weights], ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    upgrade = _texts(proc.stderr, "upgrade_proto.cpp")
    assert ("Attempting to upgrade input file specified using deprecated V1LayerParameter: "
            "%s" % weights) in upgrade
    from converters.caffemodel import read_caffemodel, blob_to_array
    saved = {l.name: l for l in read_caffemodel(str(tmp_path / "ft_iter_2.caffemodel")).layer}
    assert blob_to_array(saved["conv1"].blobs[0]).shape == (20, 1, 5, 5)
