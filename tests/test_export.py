"""Issue 7, feature 5: `trainer export --format torch|onnx`.

The generated torch module, loaded in a fresh namespace, must give the same outputs as our Net on
the same input (a LeNet-like net, a BN + Scale + Eltwise ResNet block, and a net exercising the
other supported layer types), need nothing but torch, and the ONNX file, run with onnxruntime,
must match too. Unsupported layers are refused with their name and type.
"""
import ast
import importlib.util
import os
import sys

import numpy as np
import pytest
import torch

from test_explain import run_cli

LENET = """name: "LeNet"
layer { name: "data" type: "Input" top: "data" input_param {
  shape { dim: 2 dim: 1 dim: 28 dim: 28 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 6 kernel_size: 5 weight_filler { type: "xavier" }
                      bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "norm1" type: "LRN" bottom: "pool1" top: "norm1"
  lrn_param { local_size: 3 alpha: 0.1 beta: 0.75 } }
layer { name: "conv2" type: "Convolution" bottom: "norm1" top: "conv2"
  convolution_param { num_output: 8 kernel_size: 3 pad: 1 group: 2
  weight_filler { type: "xavier" } } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" relu_param { negative_slope: 0.1 } }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2"
  pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "flat" type: "Flatten" bottom: "pool2" top: "flat" }
layer { name: "ip1" type: "InnerProduct" bottom: "flat" top: "ip1"
  inner_product_param { num_output: 20 weight_filler { type: "xavier" }
                        bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "drop" type: "Dropout" bottom: "ip1" top: "ip1" dropout_param { dropout_ratio: 0.5 } }
layer { name: "sig" type: "Sigmoid" bottom: "ip1" top: "sig" }
layer { name: "cat" type: "Concat" bottom: "ip1" bottom: "sig" top: "cat" }
layer { name: "resh" type: "Reshape" bottom: "cat" top: "resh" reshape_param {
  shape { dim: 0 dim: -1 } } }
layer { name: "ip2" type: "InnerProduct" bottom: "resh" top: "ip2"
  inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
layer { name: "prob" type: "Softmax" bottom: "ip2" top: "prob" }
"""

RESBLOCK = """name: "res-block"
layer { name: "data" type: "Input" top: "data" input_param {
  shape { dim: 2 dim: 3 dim: 17 dim: 17 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 8 kernel_size: 3 stride: 2 pad: 1 bias_term: false
                      weight_filler { type: "msra" } } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "res_a" type: "Convolution" bottom: "pool1" top: "res_a"
  convolution_param { num_output: 8 kernel_size: 3 pad: 1 bias_term: false
  weight_filler { type: "msra" } } }
layer { name: "bn_a" type: "BatchNorm" bottom: "res_a" top: "res_a" }
layer { name: "scale_a" type: "Scale" bottom: "res_a" top: "res_a" scale_param { bias_term: true } }
layer { name: "relu_a" type: "ReLU" bottom: "res_a" top: "res_a" }
layer { name: "res_b" type: "Convolution" bottom: "res_a" top: "res_b"
  convolution_param { num_output: 8 kernel_size: 3 pad: 1 bias_term: false
  weight_filler { type: "msra" } } }
layer { name: "bn_b" type: "BatchNorm" bottom: "res_b" top: "res_b" }
layer { name: "scale_b" type: "Scale" bottom: "res_b" top: "res_b" scale_param { bias_term: true } }
layer { name: "res" type: "Eltwise" bottom: "pool1" bottom: "res_b" top: "res" }
layer { name: "res_relu" type: "ReLU" bottom: "res" top: "res" }
layer { name: "pool5" type: "Pooling" bottom: "res" top: "pool5"
  pooling_param { pool: AVE global_pooling: true } }
layer { name: "fc" type: "InnerProduct" bottom: "pool5" top: "fc"
  inner_product_param { num_output: 5 weight_filler { type: "xavier" } } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""

MISC = """name: "misc"
layer { name: "data" type: "Input" top: "data" top: "aux"
  input_param { shape { dim: 2 dim: 4 dim: 9 dim: 9 } shape { dim: 2 dim: 4 dim: 9 dim: 9 } } }
layer { name: "deconv" type: "Deconvolution" bottom: "data" top: "deconv"
  convolution_param { num_output: 4 kernel_size: 3 stride: 2 pad: 1 weight_filler { type: "xavier" }
                      bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "crop" type: "Crop" bottom: "deconv" bottom: "data" top: "crop"
  crop_param { axis: 2 offset: 2 } }
layer { name: "prelu" type: "PReLU" bottom: "crop" top: "prelu" prelu_param {
  filler { type: "gaussian" std: 0.5 } } }
layer { name: "elu" type: "ELU" bottom: "prelu" top: "elu" elu_param { alpha: 0.7 } }
layer { name: "tanh" type: "TanH" bottom: "elu" top: "tanh" }
layer { name: "abs" type: "AbsVal" bottom: "tanh" top: "abs" }
layer { name: "bnll" type: "BNLL" bottom: "abs" top: "bnll" }
layer { name: "power" type: "Power" bottom: "bnll" top: "power"
  power_param { power: 1.5 scale: 2 shift: 0.5 } }
layer { name: "log" type: "Log" bottom: "power" top: "log" log_param { base: 2 scale: 3 shift: 1 } }
layer { name: "exp" type: "Exp" bottom: "log" top: "exp"
  exp_param { base: 1.5 scale: 0.5 shift: 0.1 } }
layer { name: "clip" type: "Clip" bottom: "exp" top: "clip" clip_param { min: 0.5 max: 3 } }
layer { name: "swish" type: "Swish" bottom: "aux" top: "swish" swish_param { beta: 1.3 } }
layer { name: "thr" type: "Threshold" bottom: "aux" top: "thr" threshold_param { threshold: 0.2 } }
layer { name: "emax" type: "Eltwise" bottom: "clip" bottom: "swish" bottom: "thr" top: "emax"
  eltwise_param { operation: MAX } }
layer { name: "eprod" type: "Eltwise" bottom: "emax" bottom: "swish" top: "eprod"
  eltwise_param { operation: PROD } }
layer { name: "esum" type: "Eltwise" bottom: "eprod" bottom: "aux" top: "esum"
  eltwise_param { operation: SUM coeff: 0.5 coeff: -2 } }
layer { name: "slice" type: "Slice" bottom: "esum" top: "s1" top: "s2"
  slice_param { axis: 1 slice_point: 2 } }
layer { name: "bias" type: "Bias" bottom: "s2" top: "bias" bias_param {
  filler { type: "gaussian" std: 1 } } }
layer { name: "scale2" type: "Scale" bottom: "bias" bottom: "s1" top: "scale2"
  scale_param { axis: 0 } }
layer { name: "mpool" type: "Pooling" bottom: "scale2" top: "mpool"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 2 } }
layer { name: "apool" type: "Pooling" bottom: "scale2" top: "apool"
  pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 2 } }
layer { name: "abs2" type: "AbsVal" bottom: "scale2" top: "abs2" }
layer { name: "spool" type: "Pooling" bottom: "abs2" top: "spool"
  pooling_param { pool: STOCHASTIC kernel_size: 3 stride: 2 } }
layer { name: "cat" type: "Concat" bottom: "mpool" bottom: "apool" top: "cat"
  concat_param { axis: 1 } }
layer { name: "norm" type: "Normalize" bottom: "cat" top: "norm"
  norm_param { across_spatial: false channel_shared: false
  scale_filler { type: "constant" value: 20 } } }
layer { name: "norm2" type: "Normalize" bottom: "cat" top: "norm2" }
layer { name: "perm" type: "Permute" bottom: "norm" top: "perm"
  permute_param { order: 0 order: 2 order: 3 order: 1 } }
layer { name: "flat" type: "Flatten" bottom: "perm" top: "flat" }
layer { name: "prior" type: "PriorBox" bottom: "norm" bottom: "data" top: "prior"
  prior_box_param { min_size: 3 max_size: 6 aspect_ratio: 2 flip: true clip: true
                    variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 } }
layer { name: "mvn" type: "MVN" bottom: "norm2" top: "mvn" }
layer { name: "mvn2" type: "MVN" bottom: "spool" top: "mvn2"
  mvn_param { normalize_variance: false across_channels: true } }
layer { name: "tile" type: "Tile" bottom: "mvn" top: "tile" tile_param { axis: 1 tiles: 2 } }
layer { name: "shared1" type: "InnerProduct" bottom: "tile" top: "shared1"
  param { name: "w" } param { name: "b" }
  inner_product_param { num_output: 3 weight_filler { type: "xavier" }
  bias_filler { type: "gaussian" } } }
layer { name: "shared2" type: "InnerProduct" bottom: "tile" top: "shared2"
  param { name: "w" } param { name: "b" }
  inner_product_param { num_output: 3 weight_filler { type: "xavier" }
  bias_filler { type: "gaussian" } } }
"""


def build(tmp_path, name, text, seed=0):
    """The TEST-phase net of ``text`` with random weights (BatchNorm statistics included), saved
    as ``name``.caffemodel; returns (net, prototxt path, caffemodel path)."""
    from layers.net import Net
    torch.manual_seed(seed)
    proto = tmp_path / (name + ".prototxt")
    proto.write_text(text)
    net = Net(str(proto), "TEST", log=False)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for li, kind in enumerate(net.layer_types):
            blobs = net.layer_modules[li].blobs
            if kind == "BatchNorm":
                c = blobs[0].numel()
                blobs[2].fill_(7.5)                                   # Caffe's factor
                blobs[0].copy_(torch.randn(c, generator=g) * 7.5)
                blobs[1].copy_((torch.rand(c, generator=g) + 0.5) * 7.5)
            elif kind == "Scale":
                for b in blobs:
                    b.copy_(torch.randn(b.shape, generator=g))
    model = tmp_path / (name + ".caffemodel")
    net.save(str(model))
    return net, str(proto), str(model)


def feeds_for(net, seed=0):
    rng = np.random.RandomState(seed)
    return {t: rng.randn(*net.blob_shapes[t]).astype(np.float32) for t in net.inputs}


def load_fresh(py_path, name):
    spec = importlib.util.spec_from_file_location("exported_%s" % name, py_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_torch(net, py_path, pt_path, name):
    source = open(py_path).read()
    imports = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imports.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            imports.add(node.module.split(".")[0])
    assert imports <= {"math", "os", "torch"}, imports
    module = load_fresh(py_path, name)
    model = module.load(pt_path)
    feeds = feeds_for(net)
    ref = net.forward(**feeds)
    with torch.no_grad():
        out = model(*[torch.from_numpy(feeds[t]) for t in model.input_names])
    out = (out,) if isinstance(out, torch.Tensor) else out
    assert list(model.output_names) == list(net.outputs)
    for o, n in zip(out, model.output_names):
        np.testing.assert_allclose(o.numpy(), ref[n], rtol=1e-6, atol=1e-6, err_msg=n)
    return module, feeds, ref


def check_onnx(net, onnx_path, feeds, ref):
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(net.inputs)
    out = session.run(None, feeds)
    for o, n in zip(out, net.outputs):
        np.testing.assert_allclose(o, ref[n], rtol=1e-4, atol=2e-5, err_msg=n)


def test_lenet_cli_torch_and_onnx(tmp_path):
    net, proto, model = build(tmp_path, "lenet", LENET)
    res = run_cli(["export", "--model", proto, "--weights", model, "--format", "torch",
                   "-o", str(tmp_path / "lenet_torch.py")])
    assert res.exit_code == 0, res.output[-3000:]
    py, pt = str(tmp_path / "lenet_torch.py"), str(tmp_path / "lenet_torch.pt")
    assert os.path.isfile(pt)
    module, feeds, ref = check_torch(net, py, pt, "lenet")
    # the default weights are the .pt beside the .py
    assert torch.equal(module.load().ip2_weight, module.load(pt).ip2_weight)
    pytest.importorskip("onnx")
    res = run_cli(["export", "--model", proto, "--weights", model, "--format", "onnx",
                   "-o", str(tmp_path / "lenet.onnx")])
    assert res.exit_code == 0, res.output[-3000:]
    check_onnx(net, str(tmp_path / "lenet.onnx"), feeds, ref)


@pytest.mark.parametrize("name,text", [("resblock", RESBLOCK), ("misc", MISC)],
                         ids=["resblock", "misc"])
def test_export_matches_net(tmp_path, name, text):
    from layers.export import export_onnx, export_torch
    net, proto, model = build(tmp_path, name, text)
    py, pt = str(tmp_path / (name + ".py")), str(tmp_path / (name + ".pt"))
    _, state = export_torch(net, py, pt)
    if name == "resblock":
        assert {"bn1_mean", "bn1_var", "scale1_scale", "scale1_bias"} <= set(state)
        torch.testing.assert_close(state["bn1_mean"], net.layer_dict["bn1"].blobs[0] / 7.5)
    else:
        assert "shared1_weight" in state and "shared2_weight" not in state   # one tensor
    _, feeds, ref = check_torch(net, py, pt, name)
    pytest.importorskip("onnx")
    path = str(tmp_path / (name + ".onnx"))
    export_onnx(net, path)
    check_onnx(net, path, feeds, ref)


def test_unsupported_layer_is_named(tmp_path):
    from converters.errors import CaffeError
    from layers.export import generate_torch
    from layers.net import Net
    text = LENET.replace('layer { name: "prob" type: "Softmax" bottom: "ip2" top: "prob" }',
                         'layer { name: "top1" type: "ArgMax" bottom: "ip2" top: "top1" }')
    proto = tmp_path / "argmax.prototxt"
    proto.write_text(text)
    with pytest.raises(CaffeError) as info:
        generate_torch(Net(str(proto), "TEST", log=False))
    msg = info.value.message
    assert "'top1'" in msg and "ArgMax" in msg and "Supported types:" in msg
    res = run_cli(["export", "--model", str(proto), "-o", str(tmp_path / "x.py")])
    assert res.exit_code == 1 and "Cannot export layer 'top1'" in res.output
    assert not os.path.exists(tmp_path / "x.py")


def test_onnx_missing_is_a_clear_error(tmp_path, monkeypatch):
    from converters.errors import CaffeError
    from layers.export import export_onnx
    net, _, _ = build(tmp_path, "lenet", LENET)
    monkeypatch.setitem(sys.modules, "onnx", None)        # import onnx -> ImportError
    with pytest.raises(CaffeError) as info:
        export_onnx(net, str(tmp_path / "x.onnx"))
    assert "pip install" in info.value.message and "onnx" in info.value.message
    assert not os.path.exists(tmp_path / "x.onnx")
