"""The user's SSD nets as shipped examples: configs/number_plate_ssd (seed 000) and
configs/resnet_ssd (seed 003's pretrain-then-fine-tune flow), on the synthetic plates of
configs/make_detection_lmdb.py.

Training runs use temporary copies of the prototxts with a smaller input and batch (everything
else as shipped), so that the whole file stays fast on a CPU.
"""
import io
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from refcheck import backward_lines

CONFIGS = os.path.join(ROOT, "configs")
PLATES = os.path.join(CONFIGS, "number_plate_ssd")
RESNET = os.path.join(CONFIGS, "resnet_ssd")
SEED_000 = os.path.join(os.path.dirname(ROOT), "shared", "seeds", "000_7a58f5792f6c1fab.txt")

# The needs-backward lines of seed 000's log, in its order (the seed file, when present, is
# compared as well).
SEED_000_BACKWARD = [
    "mbox_loss needs backward computation.",
    "mbox_priorbox does not need backward computation.",
    "mbox_conf needs backward computation.",
    "mbox_loc needs backward computation.",
    "conv_6_norm_mbox_priorbox does not need backward computation.",
    "conv_6_norm_mbox_conf_flat needs backward computation.",
    "conv_6_norm_mbox_conf_perm needs backward computation.",
    "conv_6_norm_mbox_conf needs backward computation.",
    "conv_6_norm_mbox_loc_flat needs backward computation.",
    "conv_6_norm_mbox_loc_perm needs backward computation.",
    "conv_6_norm_mbox_loc needs backward computation.",
    "conv_6_norm_conv_6_norm_0_split needs backward computation.",
    "conv_6_norm needs backward computation.",
    "relu_6 needs backward computation.",
    "conv_6 needs backward computation.",
    "pool_5 needs backward computation.",
    "relu_5 needs backward computation.",
    "conv_5 needs backward computation.",
    "pool_4 needs backward computation.",
    "relu_4 needs backward computation.",
    "conv_4 needs backward computation.",
    "pool_3 needs backward computation.",
    "relu_3 needs backward computation.",
    "conv_3 needs backward computation.",
    "pool_2 needs backward computation.",
    "relu_2 needs backward computation.",
    "conv_2 needs backward computation.",
    "pool_1 needs backward computation.",
    "relu_1_1 needs backward computation.",
    "conv_1_1 needs backward computation.",
    "relu_1 does not need backward computation.",
    "conv_1 does not need backward computation.",
    "data_data_0_split does not need backward computation.",
    "data does not need backward computation.",
]


@pytest.fixture
def log():
    from converters import glog
    buf = io.StringIO()
    glog.configure(stream=buf, min_level=0)
    yield buf
    glog._State.stream = None   # follow sys.stderr at call time again


def _messages(text, where=None):
    out = []
    for line in text.splitlines():
        m = re.match(r"^[IWEF]\d{4} [\d:.]+ +\d+ ([^ \]]+)\] (.*)$", line)
        if m and (where is None or m.group(1).startswith(where)):
            out.append(m.group(2))
    return out


def _losses(text, name):
    return [float(v) for v in
            re.findall(r"Train net output #0: %s = ([-\d.e+naif]+)" % name, text)]


def _small_net(src, dst, train_batch, test_batch, size=None):
    """A copy of the net ``src`` with absolute data paths, other batch sizes and (for the SSD
    nets) another WARP size, PriorBox img_size following it."""
    from converters import caffe_pb2
    from converters.prototxt import read_net, write_text_file
    net = read_net(src)
    for layer in net.layer:
        if layer.type in ("Data", "AnnotatedData"):
            test = any(r.phase == caffe_pb2.TEST for r in layer.include)
            layer.data_param.source = os.path.join(ROOT, layer.data_param.source)
            layer.data_param.batch_size = test_batch if test else train_batch
            ap = layer.annotated_data_param
            if ap.HasField("label_map_file"):
                ap.label_map_file = os.path.join(ROOT, ap.label_map_file)
            rp = layer.transform_param.resize_param
            if size and layer.transform_param.HasField("resize_param"):
                rp.height = rp.width = size
                if rp.HasField("height_scale"):
                    rp.height_scale = rp.width_scale = size
        if size and layer.type == "PriorBox" and layer.prior_box_param.HasField("img_size"):
            layer.prior_box_param.img_size = size
    write_text_file(str(dst), net)
    return str(dst)


def _solver(src, net, **fields):
    from converters.prototxt import read_solver
    param = read_solver(src)
    param.net = net
    param.snapshot = 0
    param.snapshot_after_train = False
    for key, value in fields.items():
        if key == "test_iter":
            param.test_iter[:] = [value]
        else:
            setattr(param, key, value)
    return param


def _run_cli(args, cwd):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "cli"] + args, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


# ----------------------------------------------------------------------------- shipped files
def test_shipped_data_is_small_and_complete():
    for folder, names in ((PLATES, ("plates_trainval_lmdb", "plates_test_lmdb")),
                          (RESNET, ("plate_crops_train_lmdb", "plate_crops_test_lmdb"))):
        for name in names:
            path = os.path.join(folder, name, "data.mdb")
            assert os.path.exists(path), "run: python configs/make_detection_lmdb.py"
            assert os.path.getsize(path) < 3 * 1024 * 1024
    assert os.path.exists(os.path.join(PLATES, "labelmap_plates.prototxt"))


def test_shipped_plates_are_the_generators_output_through_create_annoset(tmp_path):
    """The first scenes drawn again, written as a VOC folder and put through `trainer
    create_annoset`, give the shipped records byte for byte (keys and values)."""
    import lmdb
    sys.path.insert(0, CONFIGS)
    try:
        import make_detection_lmdb as gen
    finally:
        sys.path.remove(CONFIGS)
    trainval, _ = gen.write_plate_sources(str(tmp_path / "voc"), n_train=3, n_test=1)
    gen.create_annoset(str(tmp_path / "voc"), trainval, str(tmp_path / "db"),
                       os.path.join(PLATES, "labelmap_plates.prototxt"))

    def records(path, n):
        env = lmdb.open(path, readonly=True, lock=False)
        with env.begin() as txn:
            out = [kv for _, kv in zip(range(n), txn.cursor())]
        env.close()
        return out
    ours = records(str(tmp_path / "db"), 10)
    assert len(ours) == 3
    assert ours == records(os.path.join(PLATES, "plates_trainval_lmdb"), 3)
    assert ours[0][0] == b"00000000_JPEGImages/plate_00000.jpg"


# ----------------------------------------------------------------------------- seed 000
def test_number_plate_nets_build_and_backward_lines_equal_the_seeds(log):
    from layers.net import Net
    train = Net(os.path.join(PLATES, "train_test.prototxt"), "TRAIN")
    ours = backward_lines(log.getvalue())
    assert ours == SEED_000_BACKWARD
    if os.path.exists(SEED_000):
        assert ours == backward_lines(open(SEED_000, encoding="utf-8").read())
    assert train.outputs == ["mbox_loss"]
    assert train.blob_shapes["data"] == (16, 3, 480, 480)
    frozen = {"conv_1", "conv_2", "conv_3", "conv_4", "conv_5", "conv_6"}
    for lp in train.learnable_params:
        assert (lp.layer in frozen) == (not lp.tensor.requires_grad), lp.name
    test = Net(os.path.join(PLATES, "train_test.prototxt"), "TEST")
    assert test.outputs == ["detection_eval"]
    assert "mbox_loss" not in test.layer_names


def test_number_plate_trains_and_evaluates(tmp_path, log):
    """Seed 000's net (frozen convs, lr 0.001) on 128x128 inputs, batch 8: the loss goes down,
    and the detection test pass logs SSD-Caffe's TestDetection lines."""
    from solvers.solver import Solver
    net = _small_net(os.path.join(PLATES, "train_test.prototxt"), tmp_path / "net.prototxt",
                     train_batch=8, test_batch=4, size=128)
    param = _solver(os.path.join(PLATES, "solver.prototxt"), net, max_iter=12, display=1,
                    average_loss=1, test_interval=12, test_iter=2)
    Solver(param, log_net=False).solve()
    text = log.getvalue()
    losses = _losses(text, "mbox_loss")
    assert len(losses) == 12 and all(np.isfinite(losses))
    first, last = np.mean(losses[:4]), np.mean(losses[-4:])
    assert last < 0.85 * first, losses
    msgs = _messages(text)
    start = msgs.index("Iteration 12, Testing net (#0)")
    assert msgs[start + 1] == "Ignoring source layer mbox_loss"
    assert any(re.match(r"    Test net output #0: detection_eval = [\d.e-]+$", m)
               for m in msgs[start:]), msgs[start:]
    assert _messages(text, "solver.cpp:546")


# ----------------------------------------------------------------------------- seed 003
def test_resnet_pretrain_then_ssd_finetune(tmp_path, log):
    from converters.caffemodel import blob_to_array, read_caffemodel
    from converters.prototxt import write_text_file
    from solvers.solver import Solver
    # step 1: the classifier, in process
    net = _small_net(os.path.join(RESNET, "pretrain_train_test.prototxt"),
                     tmp_path / "pretrain.prototxt", train_batch=8, test_batch=20)
    param = _solver(os.path.join(RESNET, "pretrain_solver.prototxt"), net, max_iter=6,
                    display=2, test_interval=6, test_iter=1, test_initialization=False,
                    snapshot_after_train=True, snapshot_prefix=str(tmp_path / "pretrain"))
    Solver(param, log_net=False).solve()
    text = log.getvalue()
    assert re.search(r"Test net output #0: accuracy = ", text)
    weights = tmp_path / "pretrain_iter_6.caffemodel"
    assert weights.exists()
    # step 2: the SSD, through the command line as the README says
    net = _small_net(os.path.join(RESNET, "ssd_train_test.prototxt"), tmp_path / "ssd.prototxt",
                     train_batch=2, test_batch=2, size=160)
    param = _solver(os.path.join(RESNET, "ssd_solver.prototxt"), net, max_iter=3, display=1,
                    test_interval=3, test_iter=1, snapshot_after_train=True,
                    snapshot_prefix=str(tmp_path / "ssd"))
    write_text_file(str(tmp_path / "ssd_solver.prototxt"), param)
    proc = _run_cli(["train", "--solver", "ssd_solver.prototxt",
                     "--weights", "pretrain_iter_6.caffemodel"], cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    msgs = _messages(proc.stderr, "net.cpp:758")
    # Caffe loads --weights into the train net, then into each test net
    assert msgs == ["Ignoring source layer %s" % n
                    for n in ("imagenet", "pool5", "fc2", "loss") * 2]
    assert _messages(proc.stderr, "solver.cpp:72") == \
        ["Finetuning from pretrain_iter_6.caffemodel"] * 2
    losses = _losses(proc.stderr, "mbox_loss")
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert _messages(proc.stderr, "solver.cpp:433") == ["Iteration 3, Testing net (#0)"]
    assert _messages(proc.stderr, "solver.cpp:546")[0].startswith(
        "    Test net output #0: detection_eval = ")
    # the trunk came from step 1: BatchNorm statistics (use_global_stats, never updated) and
    # the classifier-only layers absent
    pre = {l.name: l for l in read_caffemodel(str(weights)).layer}
    ssd = {l.name: l for l in read_caffemodel(str(tmp_path / "ssd_iter_3.caffemodel")).layer}
    assert not {"pool5", "fc2", "loss", "imagenet"} & set(ssd)
    for name in ("bn_conv1", "bn3a_branch1", "bn5a_branch2b"):
        for a, b in zip(pre[name].blobs, ssd[name].blobs):
            np.testing.assert_array_equal(blob_to_array(a), blob_to_array(b))


def test_cli_test_scores_detection_outputs_as_map(tmp_path):
    """`trainer test` on the SSD test net: DetectionEvaluate rows change in number per batch,
    so they are not averaged element by element (which failed); their mAP is reported as the
    solver's TestDetection computes it."""
    from layers.net import Net
    net_path = _small_net(os.path.join(ROOT, "configs", "number_plate_ssd", "train_test.prototxt"),
                          tmp_path / "net.prototxt", 2, 2)
    net = Net(net_path, "TEST", log=False)
    net.save(str(tmp_path / "init.caffemodel"))
    for layer in net.layer_modules:
        if hasattr(layer, "close"):
            layer.close()
    proc = _run_cli(["test", "--model=net.prototxt", "--weights=init.caffemodel",
                     "--iterations=3"], str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if "(mAP over 3 iterations" in l]
    assert len(lines) == 1, proc.stderr[-3000:]
    value = float(lines[0].split("] ")[1].split(" = ")[1].split()[0])
    assert 0.0 <= value <= 1.0
