"""converters.upgrade: Caffe's V0 / V1 / data-transform / input / BatchNorm / solver upgrades."""
import io

import numpy as np
import pytest

from converters import caffe_pb2, caffemodel, glog, prototxt, upgrade
from converters.errors import CaffeError

V1_NET = """
name: "OldNet"
input: "data"
input_dim: 2 input_dim: 3 input_dim: 8 input_dim: 8
layers {
  name: "conv1" type: CONVOLUTION bottom: "data" top: "conv1"
  blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0
  param: "shared_w"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } }
}
layers { name: "relu1" type: RELU bottom: "conv1" top: "conv1" }
layers { name: "pool1" type: POOLING bottom: "conv1" top: "pool1"
         pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layers { name: "ip1" type: INNER_PRODUCT bottom: "pool1" top: "ip1"
         inner_product_param { num_output: 10 } include { phase: TRAIN } }
layers { name: "loss" type: SOFTMAX_LOSS bottom: "ip1" bottom: "label" top: "loss"
         loss_weight: 2 }
"""

V1_DATA_NET = """
layers { name: "d" type: DATA top: "data" top: "label"
         data_param { source: "db" batch_size: 4 scale: 0.5 mean_file: "m.binaryproto"
                      crop_size: 3 mirror: true } }
layers { name: "i" type: IMAGE_DATA top: "x" top: "y"
         image_data_param { source: "list.txt" scale: 2 } }
"""

V0_NET = """
name: "V0"
input: "data"
input_dim: 1 input_dim: 3 input_dim: 9 input_dim: 9
layers { layer { name: "pad1" type: "padding" pad: 2 } bottom: "data" top: "pad1" }
layers { layer { name: "conv1" type: "conv" num_output: 8 kernelsize: 3 stride: 2
                 blobs_lr: 1 blobs_lr: 2 weight_filler { type: "gaussian" std: 0.01 } }
         bottom: "pad1" top: "conv1" }
layers { layer { name: "pool1" type: "pool" pool: AVE kernelsize: 3 stride: 2 }
         bottom: "conv1" top: "pool1" }
layers { layer { name: "drop" type: "dropout" dropout_ratio: 0.3 } bottom: "pool1"
         top: "pool1" }
layers { layer { name: "norm" type: "lrn" local_size: 3 alpha: 0.1 beta: 0.5 }
         bottom: "pool1" top: "norm" }
"""


@pytest.fixture
def log():
    buf = io.StringIO()
    glog.configure(stream=buf, min_level=0)
    yield buf
    glog.configure(stream=None)
    glog._State.stream = None


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_v1_prototxt_upgrade(tmp_path, log):
    path = _write(tmp_path, "old.prototxt", V1_NET)
    net = prototxt.read_net(path)
    assert len(net.layers) == 0 and len(net.input) == 0 and len(net.input_dim) == 0
    assert [l.type for l in net.layer] == ["Input", "Convolution", "ReLU", "Pooling",
                                           "InnerProduct", "SoftmaxWithLoss"]
    inp = net.layer[0]
    assert inp.name == "input" and list(inp.top) == ["data"]
    assert list(inp.input_param.shape[0].dim) == [2, 3, 8, 8]
    conv = net.layer[1]
    assert [(p.name, p.lr_mult, p.decay_mult) for p in conv.param] == [
        ("shared_w", 1.0, 1.0), ("", 2.0, 0.0)]
    assert conv.convolution_param.num_output == 4
    assert list(conv.convolution_param.kernel_size) == [3]
    assert net.layer[4].include[0].phase == caffe_pb2.TRAIN
    assert list(net.layer[5].loss_weight) == [2.0]
    text = log.getvalue()
    assert ("upgrade_proto.cpp:53] Attempting to upgrade input file specified using deprecated "
            "V1LayerParameter: " + path) in text
    assert ("upgrade_proto.cpp:61] Successfully upgraded file specified using deprecated "
            "V1LayerParameter\n") in text
    assert "upgrade_proto.cpp:67] Attempting to upgrade input file specified using deprecated " \
           "input fields: " + path in text
    assert "upgrade_proto.cpp:70] Successfully upgraded file specified using deprecated input " \
           "fields." in text
    assert "\nW" in text and "upgrade_proto.cpp:72] Note that future Caffe releases will only " \
           "support input layers and not input fields." in text
    # An upgraded net needs no further upgrade.
    assert not upgrade.net_needs_upgrade(net)


def test_v1_type_table_is_complete():
    for name, number in caffe_pb2.V1LayerParameter.LayerType.items():
        assert number in upgrade.V1_LAYER_TYPES, name
    assert upgrade.V1_LAYER_TYPES[caffe_pb2.V1LayerParameter.SOFTMAX_LOSS] == "SoftmaxWithLoss"
    assert upgrade.V1_LAYER_TYPES[caffe_pb2.V1LayerParameter.SIGMOID_CROSS_ENTROPY_LOSS] == \
        "SigmoidCrossEntropyLoss"


def test_v1_data_transformation_upgrade(tmp_path, log):
    net = prototxt.read_net(_write(tmp_path, "d.prototxt", V1_DATA_NET))
    d, i = net.layer
    assert d.type == "Data" and i.type == "ImageData"
    assert d.transform_param.scale == 0.5 and d.transform_param.mean_file == "m.binaryproto"
    assert d.transform_param.crop_size == 3 and d.transform_param.mirror
    for f in ("scale", "mean_file", "crop_size", "mirror"):
        assert not d.data_param.HasField(f)
    assert d.data_param.source == "db" and d.data_param.batch_size == 4
    assert i.transform_param.scale == 2 and not i.image_data_param.HasField("scale")
    text = log.getvalue()
    assert "upgrade_proto.cpp:44] Attempting to upgrade input file specified using deprecated " \
           "transformation parameters: " in text
    assert "upgrade_proto.cpp:47] Successfully upgraded file specified using deprecated data " \
           "transformation parameters." in text
    assert text.index("upgrade_proto.cpp:44]") < text.index("upgrade_proto.cpp:53]")


def test_v0_upgrade_folds_padding_layers(tmp_path, log):
    net = prototxt.read_net(_write(tmp_path, "v0.prototxt", V0_NET))
    assert [l.name for l in net.layer] == ["input", "conv1", "pool1", "drop", "norm"]
    conv = net.layer[1]
    assert conv.type == "Convolution" and list(conv.bottom) == ["data"]
    cp = conv.convolution_param
    assert list(cp.pad) == [2] and list(cp.kernel_size) == [3] and list(cp.stride) == [2]
    assert cp.num_output == 8 and cp.weight_filler.std == pytest.approx(0.01)
    assert [p.lr_mult for p in conv.param] == [1, 2]
    pool = net.layer[2].pooling_param
    assert pool.pool == caffe_pb2.PoolingParameter.AVE and pool.kernel_size == 3
    assert pool.stride == 2
    assert net.layer[3].dropout_param.dropout_ratio == pytest.approx(0.3)
    assert net.layer[4].type == "LRN" and net.layer[4].lrn_param.local_size == 3
    text = log.getvalue()
    assert "upgrade_proto.cpp:26] Attempting to upgrade input file specified using deprecated " \
           "V0LayerParameter: " in text
    assert "upgrade_proto.cpp:34] Successfully upgraded file specified using deprecated " \
           "V0LayerParameter" in text


def test_v0_unknown_field_is_reported_and_continues(tmp_path, log):
    text = ('input: "data"\nlayers { layer { name: "r" type: "relu" num_output: 3 } '
            'bottom: "data" top: "r" }\n')
    net = prototxt.read_net(_write(tmp_path, "v0bad.prototxt", text))
    assert net.layer[0].type == "ReLU"
    out = log.getvalue()
    assert "Unknown parameter num_output for layer type relu" in out
    assert "had one or more problems upgrading V0NetParameter" in out


def test_v1_binary_caffemodel_upgrade(tmp_path, log):
    old = caffe_pb2.NetParameter(name="legacy")
    conv = old.layers.add(name="conv1", type=caffe_pb2.V1LayerParameter.CONVOLUTION)
    w = np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2)
    blob = conv.blobs.add(num=2, channels=3, height=2, width=2)
    blob.data.extend(w.ravel().tolist())
    b = conv.blobs.add(num=1, channels=1, height=1, width=2)
    b.data.extend([0.5, -0.5])
    conv.blobs_lr.extend([1, 2])
    path = str(tmp_path / "legacy.caffemodel")
    with open(path, "wb") as f:
        f.write(old.SerializeToString())
    net = caffemodel.read_caffemodel(path)
    assert len(net.layers) == 0 and net.layer[0].type == "Convolution"
    params = caffemodel.caffemodel_params(net)
    np.testing.assert_array_equal(params["conv1"][0], w)
    assert params["conv1"][1].shape == (1, 1, 1, 2)  # legacy blobs keep Caffe's 4-D shape
    assert "V1LayerParameter: " + path in log.getvalue()


def test_batch_norm_upgrade(tmp_path, log):
    text = ('layer { name: "bn" type: "BatchNorm" bottom: "x" top: "x"\n'
            '  param { name: "m" lr_mult: 1 } param { lr_mult: 1 decay_mult: 3 } param {} }\n'
            'layer { name: "bn2" type: "BatchNorm" bottom: "x" top: "y" }\n')
    path = _write(tmp_path, "bn.prototxt", text)
    net = prototxt.read_net(path)
    assert [(p.name, p.lr_mult, p.decay_mult) for p in net.layer[0].param] == [
        ("m", 0, 0), ("", 0, 0), ("", 0, 0)]
    assert len(net.layer[1].param) == 0
    out = log.getvalue()
    assert "upgrade_proto.cpp:77] Attempting to upgrade batch norm layers using deprecated " \
           "params: " + path in out
    assert "upgrade_proto.cpp:80] Successfully upgraded batch norm layers using deprecated " \
           "params." in out


def test_input_shape_upgrade_and_legacy_input_without_shape():
    net = caffe_pb2.NetParameter()
    net.input.extend(["a", "b"])
    net.input_shape.add().dim.extend([1, 2])
    net.input_shape.add().dim.extend([3])
    net.layer.add(name="l", type="ReLU", bottom=["a"], top=["c"])
    upgrade.upgrade_net_input(net)
    assert [l.name for l in net.layer] == ["input", "l"]
    assert list(net.layer[0].top) == ["a", "b"]
    assert [list(s.dim) for s in net.layer[0].input_param.shape] == [[1, 2], [3]]
    old_model = caffe_pb2.NetParameter()
    old_model.input.append("data")
    old_model.layer.add(name="l", type="ReLU")
    upgrade.upgrade_net_input(old_model)
    assert len(old_model.input) == 0 and [l.name for l in old_model.layer] == ["l"]


def test_unknown_v0_type_is_fatal(tmp_path, log):
    text = 'layers { layer { name: "x" type: "nonsense" } top: "x" }\n'
    with pytest.raises(CaffeError, match="Unknown layer name: nonsense"):
        prototxt.read_net(_write(tmp_path, "bad.prototxt", text))


@pytest.mark.parametrize("enum,name", [("SGD", "SGD"), ("NESTEROV", "Nesterov"),
                                       ("ADAGRAD", "AdaGrad"), ("RMSPROP", "RMSProp"),
                                       ("ADADELTA", "AdaDelta"), ("ADAM", "Adam")])
def test_solver_type_upgrade(enum, name, log):
    solver = prototxt.parse_text("solver_type: %s\n" % enum, caffe_pb2.SolverParameter())
    assert upgrade.upgrade_solver_as_needed("s.prototxt", solver)
    assert solver.type == name and not solver.HasField("solver_type")
    assert "'solver_type' field (enum)': s.prototxt" in log.getvalue()


def test_v1_net_that_also_has_layer_fields_is_refused(tmp_path):
    """Caffe 1.0 refuses it (LOG(FATAL)); upgrading only the 'layers' would drop the 'layer's
    silently (here the loss, so the net would train with loss 0)."""
    text = V1_NET + 'layer { name: "extra" type: "ReLU" bottom: "ip" top: "ip" }\n'
    path = _write(tmp_path, "mixed.prototxt", text)
    with pytest.raises(CaffeError, match="Refusing to upgrade inconsistent NetParameter") as info:
        prototxt.read_net(path)
    assert "mixed.prototxt" in info.value.message


def test_python_warnings_become_glog_w_lines():
    import warnings
    buf = io.StringIO()
    saved_show, saved_stream = warnings.showwarning, glog._State.stream
    glog.configure(stream=buf, min_level=0)
    try:
        glog.capture_warnings()
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            np.sqrt(np.float32(-1.0))
    finally:
        warnings.showwarning = saved_show
        glog._State.stream = saved_stream
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("W") and "RuntimeWarning: invalid value encountered in sqrt" \
        in lines[0]
    assert "test_converters_upgrade.py:" in lines[0]
