"""Every layer type of BVLC Caffe 1.0 (+ master's Clip and Swish) and of SSD-Caffe is known:
either implemented (registered, and a minimal net using it builds, runs forward and backward) or
refused with an error that names the layer and the reason (the few that need a foreign runtime).

Also the numbers of the layers of layers/misc.py (BatchReindex, Filter, LSTMUnit, RNN, LSTM)
against numpy transcriptions of Caffe's Forward/Backward and of the recurrent layers' unrolled nets.
"""
import os

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from conftest import ROOT
from converters import caffe_pb2
from converters.errors import CaffeError
from converters.upgrade import V1_LAYER_TYPES
from layers import registry
from layers.net import Net

# REGISTER_LAYER_CLASS / REGISTER_LAYER_CREATOR names of BVLC Caffe 1.0 (src/caffe/layers/*.cpp,
# layer_factory.cpp), plus Clip and Swish of BVLC master (the refs' build, commit 9b89154).
BVLC_TYPES = [
    "AbsVal", "Accuracy", "ArgMax", "BatchNorm", "BatchReindex", "Bias", "BNLL", "Clip",
    "Concat", "ContrastiveLoss", "Convolution", "Crop", "Data", "Deconvolution", "Dropout",
    "DummyData", "Eltwise", "ELU", "Embed", "EuclideanLoss", "Exp", "Filter", "Flatten",
    "HDF5Data", "HDF5Output", "HingeLoss", "Im2col", "ImageData", "InfogainLoss", "InnerProduct",
    "Input", "Log", "LRN", "LSTM", "LSTMUnit", "MemoryData", "MultinomialLogisticLoss", "MVN",
    "Parameter", "Pooling", "Power", "PReLU", "Python", "Reduction", "ReLU", "Reshape", "RNN",
    "Scale", "Sigmoid", "SigmoidCrossEntropyLoss", "Silence", "Slice", "Softmax",
    "SoftmaxWithLoss", "Split", "SPP", "Swish", "TanH", "Threshold", "Tile", "WindowData",
]
# SSD-Caffe (weiliu89/caffe, branch ssd) adds these.
SSD_TYPES = [
    "AnnotatedData", "DetectionEvaluate", "DetectionOutput", "MultiBoxLoss", "Normalize",
    "Permute", "PriorBox", "SmoothL1Loss", "VideoData",
]
# Types needing a runtime trainer does not have: refused with a clear error, by design.
REFUSED = {
    "WindowData": "R-CNN window file",
    "VideoData": "VideoCapture",
    "HDF5Output": "HDF5 file",
}
V1_NAMES = [n for n in caffe_pb2.V1LayerParameter.LayerType.keys() if n != "NONE"]


# ============================================================================ the registry
@pytest.mark.parametrize("type_name", [t for t in BVLC_TYPES + SSD_TYPES if t != "Python"])
def test_type_is_registered(type_name):
    assert type_name in registry.registered_types()


@pytest.mark.parametrize("v1_name", V1_NAMES)
def test_v1_enum_name_is_an_alias_of_its_v2_type(v1_name):
    v2 = V1_LAYER_TYPES[caffe_pb2.V1LayerParameter.LayerType.Value(v1_name)]
    assert v1_name in registry.registered_types()
    assert registry.get(v1_name) is registry.get(v2)


def test_no_registered_type_is_unaccounted_for():
    """Everything registered is a BVLC / SSD type or a V1 alias of one (no stray names)."""
    known = set(BVLC_TYPES) | set(SSD_TYPES) | set(V1_NAMES) | {"INPUT"}
    assert sorted(set(registry.registered_types()) - known) == []


def _net_text(layers, inputs=(), force_backward=True, extra=""):
    text = 'name: "smoke"\n'
    if force_backward:
        text += "force_backward: true\n"
    if inputs:
        text += 'layer { name: "input" type: "Input" %s input_param { %s } }\n' % (
            " ".join('top: "%s"' % n for n, _ in inputs),
            " ".join("shape { %s }" % " ".join("dim: %d" % d for d in s) for _, s in inputs))
    return text + extra + layers


def _net(text, phase="TRAIN"):
    param = caffe_pb2.NetParameter()
    text_format.Parse(text, param)
    return Net(param, phase=phase, log=False)


@pytest.mark.parametrize("type_name", sorted(REFUSED))
def test_foreign_runtime_layers_are_refused_clearly(type_name):
    text = _net_text('layer { name: "odd_one" type: "%s" bottom: "x" top: "y" }' % type_name,
                     [("x", (2, 3))])
    with pytest.raises(CaffeError) as info:
        _net(text)
    msg = str(info.value)
    assert "odd_one" in msg and type_name in msg and "not supported" in msg, msg
    assert REFUSED[type_name] in msg, msg
    assert "Unknown layer type" not in msg


@pytest.mark.parametrize("v1_name", ["WINDOW_DATA", "HDF5_OUTPUT"])
def test_refused_v1_layers_name_the_layer(v1_name, tmp_path):
    proto = tmp_path / "v1.prototxt"
    proto.write_text('name: "v1" input: "x" input_dim: 2 input_dim: 3 input_dim: 1 '
                     'input_dim: 1 layers { name: "legacy" type: %s bottom: "x" top: "y" }'
                     % v1_name)
    with pytest.raises(CaffeError) as info:
        Net(str(proto), log=False)
    assert "legacy" in str(info.value) and "not supported" in str(info.value)


@pytest.mark.parametrize("allow", [False, True])
def test_python_layers_are_refused_and_never_imported(allow, monkeypatch):
    from layers import net as net_module
    monkeypatch.setattr(net_module, "ALLOW_PYTHON_LAYERS", allow)
    text = _net_text('layer { name: "pyl" type: "Python" bottom: "x" top: "y" python_param { '
                     'module: "trainer_no_such_module" layer: "Evil" } }', [("x", (2, 3))])
    with pytest.raises(CaffeError) as info:
        _net(text)
    msg = str(info.value)
    assert "pyl" in msg and "Python layer" in msg and "not supported" in msg, msg
    assert "trainer_no_such_module" in msg and "Unknown layer type" not in msg


# ============================================================================ smoke table
def _rand(*shape, seed=0, low=None, high=None):
    rs = np.random.RandomState(seed)
    if low is not None:
        return rs.uniform(low, high, shape).astype(np.float32)
    return rs.randn(*shape).astype(np.float32)


X4 = ("x", (2, 3, 4, 4))
X2 = ("x", (4, 6))
LBL = ("label", (4,))
LABEL4 = np.array([0, 2, 5, 1], np.float32)
GT_ROW = np.array([[[[0, 1, 0, 0.1, 0.1, 0.5, 0.5, 0]]]], np.float32)
PRIOR_NET = ('layer { name: "pb" type: "PriorBox" bottom: "f" bottom: "img" top: "prior" '
             'prior_box_param { min_size: 8 variance: 0.1 variance: 0.1 variance: 0.2 '
             'variance: 0.2 step: 8 } }\n')
W = 'weight_filler { type: "gaussian" std: 0.1 } bias_filler { type: "constant" value: 0.1 }'


def case(type_name, layer, inputs=(), feed=None, grads=("x",), params=False, phase="TRAIN",
         extra="", ntop=None, marks=()):
    """One smoke case: ``layer`` is the layer text (or texts) after an Input layer of ``inputs``;
    ``feed`` the arrays (random normal by default); ``grads`` the input blobs that must get a
    non-zero diff, ``params`` whether some param must."""
    return pytest.param(dict(type=type_name, layer=layer, inputs=inputs, feed=feed or {},
                             grads=grads, params=params, phase=phase, extra=extra),
                        id=type_name, marks=marks)


def L(type_name, body="", bottoms=("x",), tops=("y",), name="l"):
    return 'layer { name: "%s" type: "%s" %s %s %s }\n' % (
        name, type_name, " ".join('bottom: "%s"' % b for b in bottoms),
        " ".join('top: "%s"' % t for t in tops), body)


LMDB = os.path.join(ROOT, "configs", "lenet", "digits_train_lmdb")

SMOKE = [
    # ---- vision / common
    case("Convolution", L("Convolution", "convolution_param { num_output: 2 kernel_size: 3 pad: 1 "
                          + W + " }"), [X4], params=True),
    case("Deconvolution", L("Deconvolution", "convolution_param { num_output: 2 kernel_size: 2 "
                            "stride: 2 " + W + " }"), [X4], params=True),
    case("Pooling", L("Pooling", "pooling_param { pool: MAX kernel_size: 3 stride: 2 }"), [X4]),
    case("SPP", L("SPP", "spp_param { pyramid_height: 2 }"), [X4]),
    case("Im2col", L("Im2col", "convolution_param { kernel_size: 2 }"), [X4]),
    case("InnerProduct", L("InnerProduct", "inner_product_param { num_output: 3 " + W + " }"),
         [X4], params=True),
    case("Concat", L("Concat", bottoms=("x", "x")), [X4]),
    case("Slice", L("Slice", "slice_param { axis: 1 slice_point: 1 }", tops=("y", "z")), [X4]),
    case("Split", L("Split", tops=("y", "z")), [X4]),
    case("Eltwise", L("Eltwise", "eltwise_param { operation: PROD }", bottoms=("x", "w")),
         [X4, ("w", (2, 3, 4, 4))]),
    case("Flatten", L("Flatten"), [X4]),
    case("Reshape", L("Reshape", "reshape_param { shape { dim: 0 dim: -1 } }"), [X4]),
    case("Crop", L("Crop", "crop_param { axis: 2 offset: 1 }", bottoms=("x", "r")),
         [X4, ("r", (2, 3, 2, 2))]),
    case("Scale", L("Scale", "scale_param { bias_term: true filler { value: 2 } }"), [X4],
         params=True),
    case("Bias", L("Bias", "bias_param { filler { value: 1 } }"), [X4], params=True),
    case("Tile", L("Tile", "tile_param { axis: 1 tiles: 2 }"), [X4]),
    case("Reduction", L("Reduction", "reduction_param { operation: SUMSQ axis: 1 }"), [X4]),
    case("Embed", L("Embed", "embed_param { num_output: 3 input_dim: 6 " + W + " }",
                    bottoms=("label",)), [LBL], feed={"label": LABEL4}, grads=(), params=True),
    case("Parameter", L("Parameter", "parameter_param { shape { dim: 2 dim: 3 } }", bottoms=()),
         grads=(), params=True),
    case("Silence", L("Silence", bottoms=("x",), tops=()), [X4], grads=()),
    case("ArgMax", L("ArgMax", "argmax_param { top_k: 2 }"), [X2], grads=()),
    case("Accuracy", L("Accuracy", bottoms=("x", "label")), [X2, LBL],
         feed={"label": LABEL4}, grads=()),
    case("Dropout", L("Dropout", "dropout_param { dropout_ratio: 0.3 }"), [X4]),
    case("BatchReindex", L("BatchReindex", bottoms=("x", "idx")), [X2, ("idx", (5,))],
         feed={"idx": np.array([0, 2, 2, 3, 1], np.float32)}),
    case("Filter", L("Filter", bottoms=("x", "sel")), [X2, ("sel", (4,))],
         feed={"sel": np.array([1, 0, 1, 1], np.float32)}),
    # ---- neurons
    case("ReLU", L("ReLU", "relu_param { negative_slope: 0.1 }"), [X4]),
    case("PReLU", L("PReLU"), [X4], params=True),
    case("ELU", L("ELU"), [X4]),
    case("Sigmoid", L("Sigmoid"), [X4]),
    case("TanH", L("TanH"), [X4]),
    case("AbsVal", L("AbsVal"), [X4]),
    case("BNLL", L("BNLL"), [X4]),
    case("Clip", L("Clip", "clip_param { min: -0.5 max: 0.5 }"), [X4]),
    case("Swish", L("Swish"), [X4]),
    case("Power", L("Power", "power_param { power: 2 scale: 0.5 shift: 1 }"), [X4]),
    case("Exp", L("Exp", "exp_param { base: 2 }"), [X4]),
    case("Log", L("Log"), [X4], feed={"x": _rand(2, 3, 4, 4, low=0.5, high=2)}),
    case("Threshold", L("Threshold", "threshold_param { threshold: 0.2 }"), [X4], grads=()),
    case("Softmax", L("Softmax"), [X4]),
    # ---- normalization
    case("BatchNorm", L("BatchNorm"), [X4]),
    case("LRN", L("LRN", "lrn_param { local_size: 3 }"), [X4]),
    case("MVN", L("MVN"), [X4]),
    case("Normalize", L("Normalize", "norm_param { scale_filler { value: 20 } }"), [X4],
         params=True),
    case("Permute", L("Permute", "permute_param { order: 0 order: 2 order: 3 order: 1 }"), [X4]),
    # ---- losses
    case("SoftmaxWithLoss", L("SoftmaxWithLoss", bottoms=("x", "label")), [X2, LBL],
         feed={"label": LABEL4}),
    case("EuclideanLoss", L("EuclideanLoss", bottoms=("x", "t")), [X2, ("t", (4, 6))]),
    case("SigmoidCrossEntropyLoss", L("SigmoidCrossEntropyLoss", bottoms=("x", "t")),
         [X2, ("t", (4, 6))], feed={"t": _rand(4, 6, low=0, high=1)}),
    case("HingeLoss", L("HingeLoss", bottoms=("x", "label")), [X2, LBL], feed={"label": LABEL4}),
    case("MultinomialLogisticLoss", L("MultinomialLogisticLoss", bottoms=("x", "label")),
         [X2, LBL], feed={"x": _rand(4, 6, low=0.05, high=1), "label": LABEL4}),
    case("InfogainLoss", L("InfogainLoss", bottoms=("x", "label", "H")),
         [X2, LBL, ("H", (6, 6))], feed={"label": LABEL4, "H": np.eye(6, dtype=np.float32)}),
    case("ContrastiveLoss", L("ContrastiveLoss", bottoms=("x", "w", "sim")),
         [X2, ("w", (4, 6)), ("sim", (4,))], feed={"sim": np.array([1, 0, 1, 0], np.float32)}),
    case("SmoothL1Loss", L("SmoothL1Loss", bottoms=("x", "t")), [X2, ("t", (4, 6))]),
    # ---- recurrent
    case("LSTMUnit", L("LSTMUnit", bottoms=("c", "x", "cont"), tops=("c1", "h1")),
         [("c", (1, 2, 3)), ("x", (1, 2, 12)), ("cont", (1, 2))],
         feed={"cont": np.array([[1, 0]], np.float32)}, grads=("x", "c")),
    case("RNN", L("RNN", "recurrent_param { num_output: 5 weight_filler { type: 'uniform' "
                  "min: -0.3 max: 0.3 } bias_filler { type: 'constant' value: 0.1 } }",
                  bottoms=("x", "cont")), [("x", (3, 2, 4)), ("cont", (3, 2))],
         feed={"cont": np.array([[0, 0], [1, 1], [1, 0]], np.float32)}, params=True),
    case("LSTM", L("LSTM", "recurrent_param { num_output: 5 weight_filler { type: 'uniform' "
                   "min: -0.3 max: 0.3 } bias_filler { type: 'constant' value: 0.1 } }",
                   bottoms=("x", "cont")), [("x", (3, 2, 4)), ("cont", (3, 2))],
         feed={"cont": np.array([[0, 0], [1, 1], [1, 0]], np.float32)}, params=True),
    # ---- SSD
    case("PriorBox", PRIOR_NET, [("f", (1, 2, 2, 2)), ("img", (1, 3, 16, 16))], grads=()),
    case("MultiBoxLoss", PRIOR_NET + L("MultiBoxLoss", "multibox_loss_param { num_classes: 2 }",
                                       bottoms=("loc", "conf", "prior", "label")),
         [("f", (1, 2, 2, 2)), ("img", (1, 3, 16, 16)), ("loc", (1, 16)), ("conf", (1, 8)),
          ("label", (1, 1, 1, 8))], feed={"label": GT_ROW}, grads=("loc", "conf")),
    case("DetectionOutput", PRIOR_NET + L(
        "DetectionOutput", "detection_output_param { num_classes: 2 nms_param { "
        "nms_threshold: 0.45 } confidence_threshold: 0.01 }", bottoms=("loc", "conf", "prior")),
         [("f", (1, 2, 2, 2)), ("img", (1, 3, 16, 16)), ("loc", (1, 16)), ("conf", (1, 8))],
         feed={"conf": _rand(1, 8, low=0, high=1)}, grads=(), phase="TEST"),
    case("DetectionEvaluate", L("DetectionEvaluate", "detection_evaluate_param { num_classes: 2 }",
                                bottoms=("det", "label")),
         [("det", (1, 1, 1, 7)), ("label", (1, 1, 1, 8))],
         feed={"det": np.array([[[[0, 1, 0.9, 0.1, 0.1, 0.5, 0.5]]]], np.float32),
               "label": GT_ROW}, grads=(), phase="TEST"),
    # ---- data (forward only)
    case("Input", "", [X4], grads=()),
    case("DummyData", L("DummyData", "dummy_data_param { shape { dim: 2 dim: 3 } "
                        "data_filler { type: 'constant' value: 1 } }", bottoms=()), grads=()),
    case("Data", L("Data", "data_param { source: '%s' batch_size: 4 backend: LMDB } "
                   "transform_param { scale: 0.00390625 }" % LMDB, bottoms=(),
                   tops=("data", "label")), grads=()),
    case("MemoryData", L("MemoryData", "memory_data_param { batch_size: 2 channels: 1 height: 2 "
                         "width: 2 }", bottoms=(), tops=("data", "label"), name="mem"), grads=()),
    case("ImageData", "IMAGE_DATA", grads=()),
    case("HDF5Data", "HDF5_DATA", grads=()),
    case("AnnotatedData", "ANNOTATED_DATA", grads=()),
]


def test_smoke_table_covers_every_implemented_type():
    covered = {p.values[0]["type"] for p in SMOKE}
    implemented = {t for t in BVLC_TYPES + SSD_TYPES if t not in REFUSED and t != "Python"}
    assert sorted(implemented - covered) == []


def _special_layer(c, tmp_path):
    """Data layers that need files: written into tmp_path."""
    if c["layer"] == "IMAGE_DATA":
        from PIL import Image
        lines = []
        for i in range(2):
            path = tmp_path / ("img%d.png" % i)
            Image.fromarray((np.arange(48).reshape(4, 4, 3) * (i + 1)).astype(np.uint8)).save(path)
            lines.append("%s %d" % (path, i))
        (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
        return L("ImageData", "image_data_param { source: '%s' batch_size: 2 }"
                 % (tmp_path / "list.txt"), bottoms=(), tops=("data", "label"))
    if c["layer"] == "HDF5_DATA":
        h5py = pytest.importorskip("h5py")
        with h5py.File(tmp_path / "d.h5", "w") as f:
            f["data"] = np.zeros((4, 3), np.float32)
            f["label"] = np.arange(4, dtype=np.float32)
        (tmp_path / "list.txt").write_text(str(tmp_path / "d.h5") + "\n")
        return L("HDF5Data", "hdf5_data_param { source: '%s' batch_size: 2 }"
                 % (tmp_path / "list.txt"), bottoms=(), tops=("data", "label"))
    if c["layer"] == "ANNOTATED_DATA":
        from conftest import refs_path
        lmdb = refs_path("ssd", "annotated_data", "lmdb_jpg64")
        return L("AnnotatedData", "data_param { source: '%s' batch_size: 2 backend: LMDB } "
                 "transform_param { resize_param { prob: 1 resize_mode: WARP height: 32 "
                 "width: 32 interp_mode: LINEAR } }" % lmdb, bottoms=(),
                 tops=("data", "label"))
    return c["layer"]


def run_smoke(c, tmp_path, device="cpu", seed=0):
    """Build the case's net (weights from ``seed``), run it forward and backward on ``device``:
    (net, outputs, {blob: diff}, {layer: [param diffs]}) as numpy arrays."""
    layer = _special_layer(c, tmp_path)
    torch.manual_seed(seed)
    net = _net(_net_text(layer, c["inputs"]), phase=c["phase"]).to(device)
    if c["type"] == "MemoryData":
        net.layer_dict["mem"].reset(np.ones((4, 1, 2, 2), np.float32), np.arange(4))
    feed = {}
    for i, (name, shape) in enumerate(c["inputs"]):
        feed[name] = c["feed"].get(name, _rand(*shape, seed=i + 1))
    outs = net.forward(**feed)
    diffs = {}
    for i, name in enumerate(net.outputs):
        if not net.output_loss_weight(name) and net._data[name].requires_grad:
            diffs[name] = _rand(*net._data[name].shape, seed=100 + i)   # Filter: fewer
    net.backward(**diffs)
    blob_diffs = {name: np.array(net.blobs[name].diff) for name in net.blobs}
    param_diffs = {name: [np.array(p.diff) for p in ps] for name, ps in net.params.items()}
    return net, {k: np.array(v) for k, v in outs.items()}, blob_diffs, param_diffs


@pytest.mark.parametrize("c", SMOKE)
def test_smoke_forward_backward(c, tmp_path):
    net, outs, blob_diffs, param_diffs = run_smoke(c, tmp_path)
    assert outs or c["type"] == "Silence"
    for name, value in outs.items():
        assert np.all(np.isfinite(value)), name
    for name in c["grads"]:
        assert np.abs(blob_diffs[name]).sum() > 0, "no gradient reached %s" % name
    if c["params"]:
        assert any(np.abs(d).sum() > 0 for ds in param_diffs.values() for d in ds)


# ============================================================================ BatchReindex
def _make(type_name, text, shapes, tops=1, phase="TRAIN"):
    lp = caffe_pb2.LayerParameter()
    text_format.Parse(text, lp)
    lp.name, lp.type = "l", type_name
    lp.bottom.extend("b%d" % i for i in range(len(shapes)))
    lp.top.extend("t%d" % i for i in range(tops))
    return registry.get(type_name)(lp, [tuple(s) for s in shapes], phase)


def test_batch_reindex_values_and_scattered_gradient():
    x = torch.tensor(_rand(4, 2, 3), requires_grad=True)
    idx = torch.tensor([3, 0, 0, 2.7])      # Caffe's static_cast<int>: 2.7 -> 2
    layer = _make("BatchReindex", "", [(4, 2, 3), (4,)])
    assert layer.top_shapes() == [(4, 2, 3)]
    top = layer(x, idx)
    assert np.array_equal(top.detach().numpy(), x.detach().numpy()[[3, 0, 0, 2]])
    g = _rand(4, 2, 3, seed=5)
    top.backward(torch.tensor(g))
    want = np.zeros((4, 2, 3), np.float32)
    for i, j in enumerate([3, 0, 0, 2]):
        want[j] += g[i]
    assert np.allclose(x.grad.numpy(), want)


@pytest.mark.parametrize("idx,msg", [([0, -1], "was negative"), ([0, 4], "greater than batch")])
def test_batch_reindex_checks_indices(idx, msg):
    layer = _make("BatchReindex", "", [(4, 3), (2,)])
    with pytest.raises(CaffeError, match=msg):
        layer(torch.zeros(4, 3), torch.tensor(idx, dtype=torch.float32))


def test_batch_reindex_index_must_be_1d():
    with pytest.raises(CaffeError, match="num_axes"):
        _make("BatchReindex", "", [(4, 3), (2, 1)])


# ============================================================================ Filter
def test_filter_keeps_selected_items_and_zeroes_other_gradients():
    layer = _make("Filter", "", [(4, 3), (4, 2, 2), (4, 1)], tops=2)
    assert layer.top_shapes() == [(4, 3), (4, 2, 2)]     # the whole batch at set-up
    a = torch.tensor(_rand(4, 3), requires_grad=True)
    b = torch.tensor(_rand(4, 2, 2, seed=2), requires_grad=True)
    ta, tb = layer(a, b, torch.tensor([[0.], [2.], [0.], [-1.]]))
    assert np.array_equal(ta.detach().numpy(), a.detach().numpy()[[1, 3]])
    assert tb.shape == (2, 2, 2)
    ta.sum().backward()
    assert np.array_equal(a.grad.numpy(), np.array([[0] * 3, [1] * 3, [0] * 3, [1] * 3]))
    assert layer.allow_force_backward(0) and not layer.allow_force_backward(2)


@pytest.mark.parametrize("shapes,tops,msg", [
    ([(4, 3), (4,)], 2, "top.size() == bottom.size() - 1"),
    ([(4, 3), (4, 2)], 1, "Selector blob dimensions must be singletons"),
    ([(4, 3), (5,)], 1, "same 0th dimension"),
])
def test_filter_checks(shapes, tops, msg):
    with pytest.raises(CaffeError) as info:
        _make("Filter", "", shapes, tops=tops)
    assert msg in str(info.value)


# ============================================================================ LSTMUnit
def _sig(x):
    return 1 / (1 + np.exp(-x))


def np_lstm_unit(c_prev, x, cont):
    d = c_prev.shape[-1]
    i, f, o, g = (_sig(x[..., :d]), cont[..., None] * _sig(x[..., d:2 * d]),
                  _sig(x[..., 2 * d:3 * d]), np.tanh(x[..., 3 * d:]))
    c = f * c_prev + i * g
    return c, o * np.tanh(c)


def test_lstm_unit_forward_and_caffe_backward():
    c_prev, x = _rand(1, 3, 4), _rand(1, 3, 16, seed=1)
    cont = np.array([[1, 0, 1]], np.float32)
    layer = _make("LSTMUnit", "", [c_prev.shape, x.shape, cont.shape], tops=2)
    assert layer.top_shapes() == [(1, 3, 4), (1, 3, 4)]
    ct, xt = torch.tensor(c_prev, requires_grad=True), torch.tensor(x, requires_grad=True)
    c, h = layer(ct, xt, torch.tensor(cont))
    c_ref, h_ref = np_lstm_unit(c_prev, x, cont)
    assert np.allclose(c.detach().numpy(), c_ref, atol=1e-6)
    assert np.allclose(h.detach().numpy(), h_ref, atol=1e-6)
    dc, dh = _rand(1, 3, 4, seed=2), _rand(1, 3, 4, seed=3)
    torch.autograd.backward([c, h], [torch.tensor(dc), torch.tensor(dh)])
    # binary cont: Caffe's backward is the exact derivative; compare with autograd of the formula
    ct2, xt2 = torch.tensor(c_prev, requires_grad=True), torch.tensor(x, requires_grad=True)
    d = 4
    i, f = torch.sigmoid(xt2[..., :d]), torch.tensor(cont)[..., None] * torch.sigmoid(
        xt2[..., d:2 * d])
    o, g = torch.sigmoid(xt2[..., 2 * d:3 * d]), torch.tanh(xt2[..., 3 * d:])
    c2 = f * ct2 + i * g
    h2 = o * torch.tanh(c2)
    torch.autograd.backward([c2, h2], [torch.tensor(dc), torch.tensor(dh)])
    assert np.allclose(xt.grad.numpy(), xt2.grad.numpy(), atol=1e-6)
    assert np.allclose(ct.grad.numpy(), ct2.grad.numpy(), atol=1e-6)
    assert not layer.allow_force_backward(2)


def test_lstm_unit_checks_shapes():
    with pytest.raises(CaffeError, match="4 \\* hidden_dim_"):
        _make("LSTMUnit", "", [(1, 3, 4), (1, 3, 15), (1, 3)], tops=2)
    with pytest.raises(CaffeError, match="1 == bottom"):
        _make("LSTMUnit", "", [(2, 3, 4), (2, 3, 16), (2, 3)], tops=2)


# ============================================================================ RNN / LSTM
def np_rnn(x, cont, blobs, h0, static=None):
    """Caffe's unrolled RNN (rnn_layer.cpp FillUnrolledNet) in numpy."""
    if static is not None:
        w_xh, b_h, w_s, w_hh, w_ho, b_o = blobs
    else:
        (w_xh, b_h, w_hh, w_ho, b_o), w_s = blobs, None
    T, N = x.shape[:2]
    wx = x.reshape(T, N, -1) @ w_xh.T + b_h
    h, outs = h0, []
    for t in range(T):
        s = (h * cont[t][None, :, None]) @ w_hh.T + wx[t:t + 1]
        if w_s is not None:
            s = s + (static.reshape(N, -1) @ w_s.T)[None]
        h = np.tanh(s)
        outs.append(np.tanh(h @ w_ho.T + b_o))
    return np.concatenate(outs), h


def np_lstm(x, cont, blobs, h0, c0, static=None):
    """Caffe's unrolled LSTM (lstm_layer.cpp FillUnrolledNet) in numpy."""
    if static is not None:
        w_xc, b_c, w_s, w_hc = blobs
    else:
        (w_xc, b_c, w_hc), w_s = blobs, None
    T, N = x.shape[:2]
    wx = x.reshape(T, N, -1) @ w_xc.T + b_c
    h, c, outs = h0, c0, []
    for t in range(T):
        gates = (h * cont[t][None, :, None]) @ w_hc.T + wx[t:t + 1]
        if w_s is not None:
            gates = gates + (static.reshape(N, -1) @ w_s.T)[None]
        c, h = np_lstm_unit(c, gates, cont[t:t + 1])
        outs.append(h)
    return np.concatenate(outs), h, c


REC = ("recurrent_param { num_output: 3 weight_filler { type: 'uniform' min: -0.5 max: 0.5 } "
       "bias_filler { type: 'uniform' min: -0.5 max: 0.5 } %s }")


@pytest.mark.parametrize("kind", ["RNN", "LSTM"])
@pytest.mark.parametrize("static", [False, True])
def test_recurrent_matches_unrolled_net_and_carries_state(kind, static):
    T, N, D = 4, 2, 3
    x, x_static = _rand(T, N, 2, 2, seed=1), _rand(N, 5, seed=2)
    cont = np.array([[0, 0], [1, 1], [1, 0], [1, 1]], np.float32)
    shapes = [x.shape, cont.shape] + ([x_static.shape] if static else [])
    layer = _make(kind, REC % "", shapes)
    names = [n for _, n in layer.extra_log_lines()]
    assert names[0] == ("Initializing recurrent layer: assuming input batch contains 4 "
                        "timesteps of 2 independent streams.")
    blob_shapes = [tuple(b.shape) for b in layer.blobs]
    if kind == "RNN":
        assert blob_shapes == [(D, 4), (D,)] + ([(D, 5)] if static else []) + [
            (D, D), (D, D), (D,)]
    else:
        assert blob_shapes == [(4 * D, 4), (4 * D,)] + ([(4 * D, 5)] if static else []) + [
            (4 * D, D)]
    assert layer.top_shapes() == [(T, N, D)]
    blobs = [b.detach().numpy().copy() for b in layer.blobs]
    args = [torch.tensor(x), torch.tensor(cont)] + ([torch.tensor(x_static)] if static else [])
    zeros = np.zeros((1, N, D), np.float32)
    if kind == "RNN":
        want, h_T = np_rnn(x, cont, blobs, zeros, x_static if static else None)
        state = (h_T,)
    else:
        want, h_T, c_T = np_lstm(x, cont, blobs, zeros, zeros, x_static if static else None)
        state = (h_T, c_T)
    out = layer(*args)
    assert np.allclose(out.detach().numpy(), want, atol=1e-5)
    # the next forward starts from the last state (Caffe copies h_T to h_0); stream 1's cont is 1
    # at t=0 this time, so it continues its sequence
    cont2 = np.ones_like(cont)
    cont2[0, 0] = 0
    args[1] = torch.tensor(cont2)
    if kind == "RNN":
        want2, _ = np_rnn(x, cont2, blobs, state[0], x_static if static else None)
    else:
        want2, _, _ = np_lstm(x, cont2, blobs, state[0], state[1], x_static if static else None)
    assert np.allclose(layer(*args).detach().numpy(), want2, atol=1e-5)


@pytest.mark.parametrize("kind", ["RNN", "LSTM"])
def test_recurrent_gradients_match_numeric(kind):
    """Autograd through the loop (and LSTMUnit's hand-written backward) = finite differences,
    for the inputs, the static input and every blob."""
    T, N = 3, 2
    layer = _make(kind, REC % "", [(T, N, 3), (T, N), (N, 2)]).double()
    x = torch.tensor(_rand(T, N, 3, seed=4), dtype=torch.float64, requires_grad=True)
    s = torch.tensor(_rand(N, 2, seed=6), dtype=torch.float64, requires_grad=True)
    cont = torch.tensor([[0, 0], [1, 1], [1, 0]], dtype=torch.float64)
    names = ["blobs.%d" % i for i in range(len(layer.blobs))]
    params = [b.detach().clone().requires_grad_(True) for b in layer.blobs]

    def fn(x, s, *ps):
        layer.reset()
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x, cont, s))
    assert torch.autograd.gradcheck(fn, (x, s, *params))


@pytest.mark.parametrize("kind,n", [("RNN", 1), ("LSTM", 2)])
def test_recurrent_expose_hidden(kind, n):
    T, N, D = 3, 2, 3
    shapes = [(T, N, 4), (T, N)] + [(1, N, D)] * n
    layer = _make(kind, REC % "expose_hidden: true", shapes, tops=1 + n)
    assert layer.top_shapes() == [(T, N, D)] + [(1, N, D)] * n
    x, cont = _rand(T, N, 4), np.ones((T, N), np.float32)
    h0 = [_rand(1, N, D, seed=10 + j) for j in range(n)]
    tops = layer(torch.tensor(x), torch.tensor(cont), *[torch.tensor(h) for h in h0])
    blobs = [b.detach().numpy() for b in layer.blobs]
    if kind == "RNN":
        want, h_T = np_rnn(x, cont, blobs, h0[0])
        finals = [h_T]
    else:
        want, h_T, c_T = np_lstm(x, cont, blobs, h0[0], h0[1])
        finals = [h_T, c_T]
    assert np.allclose(tops[0].detach().numpy(), want, atol=1e-5)
    for got, ref in zip(tops[1:], finals):
        assert np.allclose(got.numpy(), ref, atol=1e-5)
        assert not got.requires_grad           # Caffe shares the data of h_T, not its diff
    # exposed: no state is carried, the same inputs give the same outputs
    again = layer(torch.tensor(x), torch.tensor(cont), *[torch.tensor(h) for h in h0])
    assert np.allclose(again[0].detach().numpy(), want, atol=1e-5)


@pytest.mark.parametrize("shapes,text,msg", [
    ([(4,), (4, 2)], REC % "", "at least 2 axes"),
    ([(4, 2, 3), (4, 2, 1)], REC % "", "exactly 2 axes"),
    ([(4, 2, 3), (3, 2)], REC % "", "T_ == bottom[1]->shape(0)"),
    ([(4, 2, 3), (4, 2)], "recurrent_param { num_output: 0 }", "num_output must be positive"),
    ([(4, 2, 3), (4, 2), (3, 5)], REC % "", "N_ == bottom[2]->shape(0)"),
    ([(4, 2, 3), (4, 2), (1, 2, 4)], REC % "expose_hidden: true", "hidden state input shape"),
])
def test_recurrent_checks(shapes, text, msg):
    with pytest.raises(CaffeError) as info:
        _make("RNN", text, shapes, tops=2 if "expose" in text else 1)
    assert msg in str(info.value)


def test_recurrent_refuses_another_number_of_timesteps():
    layer = _make("LSTM", REC % "", [(4, 2, 3), (4, 2)])
    with pytest.raises(CaffeError, match="input number of timesteps changed"):
        layer(torch.zeros(5, 2, 3), torch.zeros(5, 2))


def test_lstm_trains_in_a_net_with_solver_param_specs():
    """An LSTM in a net: lr_mult per blob is applied by index, the loss goes down under SGD."""
    text = _net_text(
        L("LSTM", 'param { lr_mult: 1 } param { lr_mult: 2 } param { lr_mult: 1 } ' + REC % "",
          bottoms=("x", "cont"), tops=("h",), name="lstm")
        + L("InnerProduct", "inner_product_param { num_output: 1 axis: 2 " + W + " }",
            bottoms=("h",), tops=("y",), name="ip")
        + L("EuclideanLoss", bottoms=("y", "t"), tops=("loss",), name="loss"),
        [("x", (5, 3, 2)), ("cont", (5, 3)), ("t", (5, 3, 1))], force_backward=False)
    net = _net(text)
    assert net.need_backward[net.layer_names.index("lstm")]
    x = _rand(5, 3, 2, seed=3)
    cont = np.ones((5, 3), np.float32)
    cont[0] = 0
    t = np.cumsum(x[..., :1], axis=0) * 0.3
    params = [p for ps in net.params.values() for p in ps]
    losses = []
    for _ in range(60):
        net.layer_dict["lstm"].reset()
        losses.append(float(net.forward(x=x, cont=cont, t=t)["loss"]))
        net.backward()
        with torch.no_grad():
            for lp in net.learnable_params:
                if lp.tensor.grad is not None:
                    lp.tensor -= 0.5 * lp.lr_mult * lp.tensor.grad
    assert len(params) == 5
    assert losses[-1] < 0.5 * losses[0], losses[::10]
