"""Caffe's upgrade of legacy nets and solvers (``src/caffe/util/upgrade_proto.cpp``).

``upgrade_net_as_needed`` runs, in Caffe's order and with Caffe's log lines:

1. V0 -> V1 (``layers { layer { type: "conv" ... } }``): padding layers folded into the
   following conv/pool, V0 fields moved to the V1 layer's typed params (``UpgradeV0Net``).
2. Data transformation: ``scale`` / ``mean_file`` / ``crop_size`` / ``mirror`` of Data,
   ImageData and WindowData V1 layers move to ``transform_param``.
3. V1 -> V2 (``layers`` -> ``layer``): enum type -> type string (``UpgradeV1LayerType``),
   ``blobs_lr`` / ``weight_decay`` / ``param`` / ``blob_share_mode`` -> ``param { ... }``.
4. ``input`` / ``input_shape`` / ``input_dim`` -> an ``Input`` layer named "input", first.
5. BatchNorm layers declaring 3 ``param`` get ``lr_mult: 0`` and ``decay_mult: 0`` on all three
   (BVLC master's ``UpgradeNetBatchNorm``; names and share modes are kept).

``upgrade_solver_as_needed`` turns the ``solver_type`` enum into the ``type`` string, and
``upgrade_snapshot_prefix`` is BVLC master's ``UpgradeSnapshotPrefixProperty``.

Problems Caffe reports with ``LOG(ERROR)`` and continues on are logged the same way; the cases
where Caffe aborts (``LOG(FATAL)`` / ``CHECK``) raise :class:`CaffeError`.
"""
import os

from . import caffe_pb2, glog
from .errors import CaffeError

__all__ = ["upgrade_net_as_needed", "net_needs_upgrade", "upgrade_v0_net", "upgrade_v1_net",
           "upgrade_v1_layer", "upgrade_net_data_transformation", "upgrade_net_input",
           "upgrade_net_batch_norm", "upgrade_solver_as_needed", "upgrade_solver_type",
           "upgrade_snapshot_prefix", "V1_LAYER_TYPES", "V0_LAYER_TYPES", "SOLVER_TYPES"]

# Source tags of the log lines (BVLC upgrade_proto.cpp, Caffe 1.0 / master layout).
_TAG = {
    "v0_try": "upgrade_proto.cpp:26", "v0_err": "upgrade_proto.cpp:31",
    "v0_ok": "upgrade_proto.cpp:34", "v0_warn": "upgrade_proto.cpp:37",
    "data_try": "upgrade_proto.cpp:44", "data_ok": "upgrade_proto.cpp:47",
    "data_warn": "upgrade_proto.cpp:49",
    "v1_try": "upgrade_proto.cpp:53", "v1_err": "upgrade_proto.cpp:58",
    "v1_ok": "upgrade_proto.cpp:61",
    "input_try": "upgrade_proto.cpp:67", "input_ok": "upgrade_proto.cpp:70",
    "input_warn": "upgrade_proto.cpp:72",
    "bn_try": "upgrade_proto.cpp:77", "bn_ok": "upgrade_proto.cpp:80",
    # Lines inside the upgrade helpers and the solver part are approximate.
    "v0_layer": "upgrade_proto.cpp:231",
    "v1_layer_fail": "upgrade_proto.cpp:602",
    "solver_try": "upgrade_proto.cpp:1082", "solver_err": "upgrade_proto.cpp:1086",
    "solver_ok": "upgrade_proto.cpp:1089", "solver_warn": "upgrade_proto.cpp:1091",
    "solver_uptodate": "upgrade_proto.cpp:1068",
    "prefix": "upgrade_proto.cpp:1107",
}

V1 = caffe_pb2.V1LayerParameter

# UpgradeV1LayerType: V1 enum -> V2 type string.
V1_LAYER_TYPES = {
    V1.NONE: "", V1.ABSVAL: "AbsVal", V1.ACCURACY: "Accuracy", V1.ARGMAX: "ArgMax",
    V1.BNLL: "BNLL", V1.CONCAT: "Concat", V1.CONTRASTIVE_LOSS: "ContrastiveLoss",
    V1.CONVOLUTION: "Convolution", V1.DECONVOLUTION: "Deconvolution", V1.DATA: "Data",
    V1.DROPOUT: "Dropout", V1.DUMMY_DATA: "DummyData", V1.EUCLIDEAN_LOSS: "EuclideanLoss",
    V1.ELTWISE: "Eltwise", V1.EXP: "Exp", V1.FLATTEN: "Flatten", V1.HDF5_DATA: "HDF5Data",
    V1.HDF5_OUTPUT: "HDF5Output", V1.HINGE_LOSS: "HingeLoss", V1.IM2COL: "Im2col",
    V1.IMAGE_DATA: "ImageData", V1.INFOGAIN_LOSS: "InfogainLoss",
    V1.INNER_PRODUCT: "InnerProduct", V1.LRN: "LRN", V1.MEMORY_DATA: "MemoryData",
    V1.MULTINOMIAL_LOGISTIC_LOSS: "MultinomialLogisticLoss", V1.MVN: "MVN",
    V1.POOLING: "Pooling", V1.POWER: "Power", V1.RELU: "ReLU", V1.SIGMOID: "Sigmoid",
    V1.SIGMOID_CROSS_ENTROPY_LOSS: "SigmoidCrossEntropyLoss", V1.SILENCE: "Silence",
    V1.SOFTMAX: "Softmax", V1.SOFTMAX_LOSS: "SoftmaxWithLoss", V1.SPLIT: "Split",
    V1.SLICE: "Slice", V1.TANH: "TanH", V1.WINDOW_DATA: "WindowData",
    V1.THRESHOLD: "Threshold",
}

# UpgradeV0LayerType: V0 type string -> V1 enum.
V0_LAYER_TYPES = {
    "accuracy": V1.ACCURACY, "bnll": V1.BNLL, "concat": V1.CONCAT, "conv": V1.CONVOLUTION,
    "data": V1.DATA, "dropout": V1.DROPOUT, "euclidean_loss": V1.EUCLIDEAN_LOSS,
    "flatten": V1.FLATTEN, "hdf5_data": V1.HDF5_DATA, "hdf5_output": V1.HDF5_OUTPUT,
    "im2col": V1.IM2COL, "images": V1.IMAGE_DATA, "infogain_loss": V1.INFOGAIN_LOSS,
    "innerproduct": V1.INNER_PRODUCT, "lrn": V1.LRN,
    "multinomial_logistic_loss": V1.MULTINOMIAL_LOGISTIC_LOSS, "pool": V1.POOLING,
    "relu": V1.RELU, "sigmoid": V1.SIGMOID, "softmax": V1.SOFTMAX,
    "softmax_loss": V1.SOFTMAX_LOSS, "split": V1.SPLIT, "tanh": V1.TANH,
    "window_data": V1.WINDOW_DATA,
}

S = caffe_pb2.SolverParameter
SOLVER_TYPES = {S.SGD: "SGD", S.NESTEROV: "Nesterov", S.ADAGRAD: "AdaGrad",
                S.RMSPROP: "RMSProp", S.ADADELTA: "AdaDelta", S.ADAM: "Adam"}


# ---------------------------------------------------------------------------------------------
# Net

def net_needs_v0_to_v1_upgrade(net):
    return any(l.HasField("layer") for l in net.layers)


def net_needs_v1_to_v2_upgrade(net):
    return len(net.layers) > 0


def net_needs_data_upgrade(net):
    for l in net.layers:
        sub = _legacy_data_param(l)
        if sub is not None and any(sub.HasField(f) for f in ("scale", "mean_file", "crop_size",
                                                              "mirror")):
            return True
    return False


def net_needs_input_upgrade(net):
    return len(net.input) > 0


def net_needs_batch_norm_upgrade(net):
    return any(l.type == "BatchNorm" and len(l.param) == 3 for l in net.layer)


def net_needs_upgrade(net):
    return (net_needs_v0_to_v1_upgrade(net) or net_needs_v1_to_v2_upgrade(net)
            or net_needs_data_upgrade(net) or net_needs_input_upgrade(net)
            or net_needs_batch_norm_upgrade(net))


def upgrade_net_as_needed(param_file, net):
    """Upgrade ``net`` in place as ``UpgradeNetAsNeeded``; return False if a step had problems."""
    success = True
    if net_needs_v0_to_v1_upgrade(net):
        glog.info("Attempting to upgrade input file specified using deprecated "
                  "V0LayerParameter: %s" % param_file, where=_TAG["v0_try"])
        original = caffe_pb2.NetParameter()
        original.CopyFrom(net)
        if not upgrade_v0_net(original, net):
            success = False
            glog.error("Warning: had one or more problems upgrading V0NetParameter to "
                       "NetParameter (see above); continuing anyway.", where=_TAG["v0_err"])
        else:
            glog.info("Successfully upgraded file specified using deprecated V0LayerParameter",
                      where=_TAG["v0_ok"])
        glog.warning("Note that future Caffe releases will not support V0NetParameter; use "
                     "./build/tools/upgrade_net_proto_text for prototxt and "
                     "./build/tools/upgrade_net_proto_binary for model weights upgrade this "
                     "and any other net protos to the new format.", where=_TAG["v0_warn"])
    if net_needs_data_upgrade(net):
        glog.info("Attempting to upgrade input file specified using deprecated transformation "
                  "parameters: %s" % param_file, where=_TAG["data_try"])
        upgrade_net_data_transformation(net)
        glog.info("Successfully upgraded file specified using deprecated data transformation "
                  "parameters.", where=_TAG["data_ok"])
        glog.warning("Note that future Caffe releases will only support transform_param "
                     "messages for transformation fields.", where=_TAG["data_warn"])
    if net_needs_v1_to_v2_upgrade(net):
        glog.info("Attempting to upgrade input file specified using deprecated "
                  "V1LayerParameter: %s" % param_file, where=_TAG["v1_try"])
        original = caffe_pb2.NetParameter()
        original.CopyFrom(net)
        try:
            upgraded = upgrade_v1_net(original, net)
        except CaffeError as exc:
            exc.message = "%s: %s" % (param_file, exc.message)
            exc.args = (exc.message,)
            raise
        if not upgraded:
            success = False
            glog.error("Warning: had one or more problems upgrading V1LayerParameter (see "
                       "above); continuing anyway.", where=_TAG["v1_err"])
        else:
            glog.info("Successfully upgraded file specified using deprecated V1LayerParameter",
                      where=_TAG["v1_ok"])
    if net_needs_input_upgrade(net):
        glog.info("Attempting to upgrade input file specified using deprecated input fields: "
                  "%s" % param_file, where=_TAG["input_try"])
        upgrade_net_input(net)
        glog.info("Successfully upgraded file specified using deprecated input fields.",
                  where=_TAG["input_ok"])
        glog.warning("Note that future Caffe releases will only support input layers and not "
                     "input fields.", where=_TAG["input_warn"])
    if net_needs_batch_norm_upgrade(net):
        glog.info("Attempting to upgrade batch norm layers using deprecated params: %s"
                  % param_file, where=_TAG["bn_try"])
        upgrade_net_batch_norm(net)
        glog.info("Successfully upgraded batch norm layers using deprecated params.",
                  where=_TAG["bn_ok"])
    return success


# ---- V0 -> V1

def _v0_padding_layers(param):
    """UpgradeV0PaddingLayers: drop "padding" layers, moving their pad into the next conv/pool."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(param)
    del out.layers[:]
    last_top = {name: -1 for name in param.input}
    for i, conn in enumerate(param.layers):
        layer = conn.layer
        if layer.type != "padding":
            out.layers.add().CopyFrom(conn)
        for j, blob in enumerate(conn.bottom):
            if blob not in last_top:
                raise CaffeError("Unknown blob input %s to layer %d" % (blob, j))
            top_idx = last_top[blob]
            if top_idx == -1:
                continue
            source = param.layers[top_idx]
            if source.layer.type == "padding":
                if layer.type not in ("conv", "pool"):
                    raise CaffeError("Padding layer input to non-convolutional / non-pooling "
                                     "layer type %s" % layer.type)
                if len(conn.bottom) != 1:
                    raise CaffeError("Conv Layer takes a single blob as input.")
                if len(source.bottom) != 1:
                    raise CaffeError("Padding Layer takes a single blob as input.")
                if len(source.top) != 1:
                    raise CaffeError("Padding Layer produces a single blob as output.")
                target = out.layers[len(out.layers) - 1]
                target.layer.pad = source.layer.pad
                target.bottom[j] = source.bottom[0]
        for blob in conn.top:
            last_top[blob] = i
    return out


def upgrade_v0_net(v0_net_with_padding, net):
    """UpgradeV0Net: rebuild ``net`` as a V1 net; return False if some field had no V1 home."""
    v0 = _v0_padding_layers(v0_net_with_padding)
    ok = True
    net.Clear()
    if v0.HasField("name"):
        net.name = v0.name
    for conn in v0.layers:
        ok &= _upgrade_v0_layer(conn, net.layers.add())
    net.input.extend(v0.input)
    net.input_dim.extend(v0.input_dim)
    if v0.HasField("force_backward"):
        net.force_backward = v0.force_backward
    return ok


def _unknown(field, type_):
    glog.error("Unknown parameter %s for layer type %s" % (field, type_), where=_TAG["v0_layer"])
    return False


def _upgrade_v0_layer(conn, out):
    """UpgradeV0LayerParameter."""
    ok = True
    out.Clear()
    out.bottom.extend(conn.bottom)
    out.top.extend(conn.top)
    if not conn.HasField("layer"):
        return ok
    v0 = conn.layer
    t = v0.type
    if v0.HasField("name"):
        out.name = v0.name
    if v0.HasField("type"):
        if t not in V0_LAYER_TYPES:
            raise CaffeError("Unknown layer name: %s" % t)
        out.type = V0_LAYER_TYPES[t]
    for b in v0.blobs:
        out.blobs.add().CopyFrom(b)
    out.blobs_lr.extend(v0.blobs_lr)
    out.weight_decay.extend(v0.weight_decay)

    def conv_or_ip(field, setter_conv, setter_ip):
        nonlocal ok
        if not v0.HasField(field):
            return
        if t == "conv":
            setter_conv()
        elif t == "innerproduct":
            setter_ip()
        else:
            ok = _unknown(field, t) and ok

    conv_or_ip("num_output", lambda: setattr(out.convolution_param, "num_output", v0.num_output),
               lambda: setattr(out.inner_product_param, "num_output", v0.num_output))
    conv_or_ip("biasterm", lambda: setattr(out.convolution_param, "bias_term", v0.biasterm),
               lambda: setattr(out.inner_product_param, "bias_term", v0.biasterm))
    conv_or_ip("weight_filler",
               lambda: out.convolution_param.weight_filler.CopyFrom(v0.weight_filler),
               lambda: out.inner_product_param.weight_filler.CopyFrom(v0.weight_filler))
    conv_or_ip("bias_filler",
               lambda: out.convolution_param.bias_filler.CopyFrom(v0.bias_filler),
               lambda: out.inner_product_param.bias_filler.CopyFrom(v0.bias_filler))
    for field, conv_name in (("pad", "pad"), ("kernelsize", "kernel_size"),
                             ("stride", "stride")):
        if v0.HasField(field):
            value = getattr(v0, field)
            if t == "conv":
                getattr(out.convolution_param, conv_name).append(value)
            elif t == "pool":
                setattr(out.pooling_param, conv_name, value)
            else:
                ok = _unknown(field, t) and ok
    if v0.HasField("group"):
        if t == "conv":
            out.convolution_param.group = v0.group
        else:
            ok = _unknown("group", t) and ok
    if v0.HasField("pool"):
        if t == "pool":
            out.pooling_param.pool = v0.pool  # MAX/AVE/STOCHASTIC share numbers
        else:
            ok = _unknown("pool", t) and ok
    if v0.HasField("dropout_ratio"):
        if t == "dropout":
            out.dropout_param.dropout_ratio = v0.dropout_ratio
        else:
            ok = _unknown("dropout_ratio", t) and ok
    for field in ("local_size", "alpha", "beta", "k"):
        if v0.HasField(field):
            if t == "lrn":
                setattr(out.lrn_param, field, getattr(v0, field))
            else:
                ok = _unknown(field, t) and ok
    if v0.HasField("source"):
        target = {"data": out.data_param, "hdf5_data": out.hdf5_data_param,
                  "images": out.image_data_param, "window_data": out.window_data_param,
                  "infogain_loss": out.infogain_loss_param}.get(t)
        if target is not None:
            target.source = v0.source
        else:
            ok = _unknown("source", t) and ok
    if v0.HasField("scale"):
        out.transform_param.scale = v0.scale
    if v0.HasField("meanfile"):
        out.transform_param.mean_file = v0.meanfile
    if v0.HasField("batchsize"):
        target = {"data": out.data_param, "hdf5_data": out.hdf5_data_param,
                  "images": out.image_data_param, "window_data": out.window_data_param}.get(t)
        if target is not None:
            target.batch_size = v0.batchsize
        else:
            ok = _unknown("batchsize", t) and ok
    if v0.HasField("cropsize"):
        out.transform_param.crop_size = v0.cropsize
    if v0.HasField("mirror"):
        out.transform_param.mirror = v0.mirror
    if v0.HasField("rand_skip"):
        target = {"data": out.data_param, "images": out.image_data_param}.get(t)
        if target is not None:
            target.rand_skip = v0.rand_skip
        else:
            ok = _unknown("rand_skip", t) and ok
    for field, name in (("shuffle_images", "shuffle"), ("new_height", "new_height"),
                        ("new_width", "new_width")):
        if v0.HasField(field):
            if t == "images":
                setattr(out.image_data_param, name, getattr(v0, field))
            else:
                ok = _unknown(name if field == "shuffle_images" else field, t) and ok
    if v0.HasField("concat_dim"):
        if t == "concat":
            out.concat_param.concat_dim = v0.concat_dim
        else:
            ok = _unknown("concat_dim", t) and ok
    for field, name in (("det_fg_threshold", "fg_threshold"),
                        ("det_bg_threshold", "bg_threshold"),
                        ("det_fg_fraction", "fg_fraction"), ("det_context_pad", "context_pad"),
                        ("det_crop_mode", "crop_mode")):
        if v0.HasField(field):
            if t == "window_data":
                setattr(out.window_data_param, name, getattr(v0, field))
            else:
                ok = _unknown(field, t) and ok
    if v0.HasField("hdf5_output_param"):
        if t == "hdf5_output":
            out.hdf5_output_param.CopyFrom(v0.hdf5_output_param)
        else:
            ok = _unknown("hdf5_output_param", t) and ok
    return ok


# ---- data transformation fields

def _legacy_data_param(v1_layer):
    if v1_layer.type == V1.DATA:
        return v1_layer.data_param
    if v1_layer.type == V1.IMAGE_DATA:
        return v1_layer.image_data_param
    if v1_layer.type == V1.WINDOW_DATA:
        return v1_layer.window_data_param
    return None


def upgrade_net_data_transformation(net):
    """UpgradeNetDataTransformation: move legacy transform fields into ``transform_param``."""
    for l in net.layers:
        sub = _legacy_data_param(l)
        if sub is None:
            continue
        for field in ("scale", "mean_file", "crop_size", "mirror"):
            if sub.HasField(field):
                setattr(l.transform_param, field, getattr(sub, field))
                sub.ClearField(field)


# ---- V1 -> V2

def upgrade_v1_net(v1_net, net):
    """UpgradeV1Net: ``layers`` (V1) -> ``layer`` (V2); return False on problems."""
    ok = True
    if len(v1_net.layer) > 0:      # Caffe 1.0's LOG(FATAL): mixing would drop the 'layer's
        raise CaffeError(
            "Refusing to upgrade inconsistent NetParameter input; the definition includes both "
            "'layer' and 'layers' fields (%d and %d). The current format defines 'layer' fields "
            "with string type like layer { type: 'Layer' ... } and not layers { type: LAYER ... "
            "}. Manually switch the definition to 'layer' format to continue."
            % (len(v1_net.layer), len(v1_net.layers)))
    net.CopyFrom(v1_net)
    net.ClearField("layers")
    net.ClearField("layer")
    for i, v1_layer in enumerate(v1_net.layers):
        if not upgrade_v1_layer(v1_layer, net.layer.add()):
            glog.error("Upgrade of input layer %d failed." % i, where=_TAG["v1_layer_fail"])
            ok = False
    return ok


_V1_TYPED_PARAMS = ("accuracy_param", "argmax_param", "concat_param", "contrastive_loss_param",
                    "convolution_param", "data_param", "dropout_param", "dummy_data_param",
                    "eltwise_param", "exp_param", "hdf5_data_param", "hdf5_output_param",
                    "hinge_loss_param", "image_data_param", "infogain_loss_param",
                    "inner_product_param", "lrn_param", "memory_data_param", "mvn_param",
                    "pooling_param", "power_param", "relu_param", "sigmoid_param",
                    "softmax_param", "slice_param", "tanh_param", "threshold_param",
                    "window_data_param", "transform_param", "loss_param")


def upgrade_v1_layer(v1, layer):
    """UpgradeV1LayerParameter: one V1 layer into the LayerParameter ``layer``."""
    layer.Clear()
    ok = True
    layer.bottom.extend(v1.bottom)
    layer.top.extend(v1.top)
    if v1.HasField("name"):
        layer.name = v1.name
    for rule in v1.include:
        layer.include.add().CopyFrom(rule)
    for rule in v1.exclude:
        layer.exclude.add().CopyFrom(rule)
    if v1.HasField("type"):
        if v1.type not in V1_LAYER_TYPES:
            raise CaffeError("Unknown V1LayerParameter layer type: %d" % v1.type)
        layer.type = V1_LAYER_TYPES[v1.type]
    for b in v1.blobs:
        layer.blobs.add().CopyFrom(b)

    def spec(i):
        while len(layer.param) <= i:
            layer.param.add()
        return layer.param[i]

    for i, name in enumerate(v1.param):
        spec(i).name = name
    for i, mode in enumerate(v1.blob_share_mode):
        spec(i).share_mode = mode  # STRICT/PERMISSIVE share numbers
    for i, lr in enumerate(v1.blobs_lr):
        spec(i).lr_mult = lr
    for i, decay in enumerate(v1.weight_decay):
        spec(i).decay_mult = decay
    layer.loss_weight.extend(v1.loss_weight)
    for name in _V1_TYPED_PARAMS:
        if v1.HasField(name):
            getattr(layer, name).CopyFrom(getattr(v1, name))
    if v1.HasField("layer"):
        glog.error("Input NetParameter has V0 layer -- ignoring.", where=_TAG["v1_layer_fail"])
        ok = False
    return ok


# ---- input fields, BatchNorm

def upgrade_net_input(net):
    """UpgradeNetInput: ``input`` + ``input_shape``/``input_dim`` -> first layer "input".

    A net with ``input`` but no shapes (old caffemodels) just loses its input fields.
    """
    has_shape = len(net.input_shape) > 0
    has_dim = len(net.input_dim) > 0
    if has_shape or has_dim:
        new = caffe_pb2.LayerParameter(name="input", type="Input")
        for i, name in enumerate(net.input):
            new.top.append(name)
            shape = new.input_param.shape.add()
            if has_shape:
                if i >= len(net.input_shape):
                    raise CaffeError("input_shape is missing for input %s" % name)
                shape.CopyFrom(net.input_shape[i])
            else:
                dims = list(net.input_dim[4 * i:4 * i + 4])
                if len(dims) != 4:
                    raise CaffeError("input_dim must have 4 values per input (input %s)" % name)
                shape.dim.extend(dims)
        layers = [caffe_pb2.LayerParameter() for _ in net.layer]
        for copy, l in zip(layers, net.layer):
            copy.CopyFrom(l)
        del net.layer[:]
        net.layer.add().CopyFrom(new)
        for l in layers:
            net.layer.add().CopyFrom(l)
    net.ClearField("input")
    net.ClearField("input_shape")
    net.ClearField("input_dim")


def upgrade_net_batch_norm(net):
    """UpgradeNetBatchNorm: BatchNorm layers with 3 ``param`` get lr_mult 0 and decay_mult 0."""
    for l in net.layer:
        if l.type == "BatchNorm" and len(l.param) == 3:
            for p in l.param:
                p.lr_mult = 0.0
                p.decay_mult = 0.0


# ---------------------------------------------------------------------------------------------
# Solver

def solver_needs_type_upgrade(solver):
    return solver.HasField("solver_type")


def upgrade_solver_type(solver):
    """UpgradeSolverType: ``solver_type: NESTEROV`` -> ``type: "Nesterov"``."""
    if solver.HasField("solver_type") and solver.HasField("type"):
        raise CaffeError("Failed to upgrade solver: old solver_type field (enum) and new type "
                         "field (string) cannot be both specified in solver proto text.")
    if not solver.HasField("solver_type"):
        glog.error("Warning: solver type already up to date. ", where=_TAG["solver_uptodate"])
        return False
    solver.type = SOLVER_TYPES[solver.solver_type]
    solver.ClearField("solver_type")
    return True


def upgrade_solver_as_needed(param_file, solver):
    """UpgradeSolverAsNeeded; return False if the upgrade had problems."""
    success = True
    if solver_needs_type_upgrade(solver):
        glog.info("Attempting to upgrade input file specified using deprecated 'solver_type' "
                  "field (enum)': %s" % param_file, where=_TAG["solver_try"])
        if not upgrade_solver_type(solver):
            success = False
            glog.error("Warning: had one or more problems upgrading SolverType (see above).",
                       where=_TAG["solver_err"])
        else:
            glog.info("Successfully upgraded file specified using deprecated 'solver_type' "
                      "field (enum) to 'type' field (string).", where=_TAG["solver_ok"])
            glog.warning("Note that future Caffe releases will only support 'type' field "
                         "(string) for a solver's type.", where=_TAG["solver_warn"])
    return success


def upgrade_snapshot_prefix(param_file, solver):
    """BVLC master's UpgradeSnapshotPrefixProperty.

    No ``snapshot_prefix``: it becomes the solver file's path without its extension.
    A prefix naming an existing directory gets the solver file's stem appended.
    """
    if not solver.HasField("snapshot_prefix"):
        solver.snapshot_prefix = os.path.splitext(param_file)[0]
        glog.info("snapshot_prefix was not specified and is set to " + solver.snapshot_prefix,
                  where=_TAG["prefix"])
    elif os.path.isdir(solver.snapshot_prefix):
        stem = os.path.splitext(os.path.basename(param_file))[0]
        solver.snapshot_prefix = os.path.join(solver.snapshot_prefix, stem)
        glog.info("snapshot_prefix was a directory and is replaced to " + solver.snapshot_prefix,
                  where=_TAG["prefix"])
