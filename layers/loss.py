"""Caffe's loss layers, as torch modules.

Every loss top is the un-weighted loss as a 0-d tensor (Caffe's 0-axis blob); the Net multiplies
by ``loss_weight``, so autograd's gradient carries Caffe's ``top[0]->cpu_diff()[0]`` factor.
Label inputs are listed in ``label_bottoms`` (Caffe's ``AllowForceBackward``) and never get a
gradient. Where Caffe's Backward is not the exact derivative of its Forward (the log clamps of
SoftmaxWithLoss / MultinomialLogisticLoss / InfogainLoss, ContrastiveLoss's ``dist + 1e-4``),
the forward is written so that autograd gives Caffe's Backward.

Labels are float blobs in Caffe; their integer value is ``static_cast<int>`` (truncation).
Caffe only DCHECKs label ranges (release builds read out of bounds); on CPU torch refuses the
out-of-range index and we report it as a CaffeError (no extra check, no device sync).
"""
import math
import os
import re

import numpy as np
import torch
import torch.nn.functional as F

from converters import caffe_pb2
from layers.base import Layer, canonical_axis, count
from layers.registry import register

FLT_MIN = float(np.finfo(np.float32).tiny)
LOG_FLT_MIN = math.log(FLT_MIN)
_MAX_NLL = -LOG_FLT_MIN
# Caffe's kLOG_THRESHOLD (1e-20 as float).
LOG_THRESHOLD = float(np.float32(1e-20))
LOG_LOG_THRESHOLD = math.log(LOG_THRESHOLD)

_MODES = caffe_pb2.LossParameter
FULL, VALID, BATCH_SIZE, NONE = _MODES.FULL, _MODES.VALID, _MODES.BATCH_SIZE, _MODES.NONE


def _legacy_dim(layer, shape, index):
    """Caffe's Blob::LegacyShape: at most 4 axes; axes past the end count as 1."""
    if len(shape) > 4:
        layer.fail("Check failed: num_axes() <= 4 (%d vs. 4) Cannot use legacy accessors on "
                   "Blobs with > 4 axes." % len(shape), "blob.hpp:159")
    if index >= len(shape) or index < -len(shape):
        return 1
    return int(shape[index])


def _clamp_min_keep_grad(values, floor):
    """``max(values, floor)`` in value, but the gradient of ``values`` everywhere (Caffe's
    Backward ignores its forward clamps)."""
    # torch.where picks the exact floor (no x - x + floor cancellation for huge values)
    # while the gradient still flows to ``values`` everywhere.
    floored = values.detach().clamp_min(floor)
    return torch.where(values.detach() < floor, values - values.detach() + floored, values)


def _normalizer(mode, outer, inner, valid_count=None):
    """Caffe's get_normalizer; ``valid_count`` is a tensor (ignore_label in use) or None."""
    if mode == FULL:
        value = outer * inner
    elif mode == VALID:
        if valid_count is not None:
            return valid_count.clamp_min(1)
        value = outer * inner
    elif mode == BATCH_SIZE:
        value = outer
    else:
        value = 1
    return float(max(1, value))


def _label_error(layer, exc, upper):
    """A label outside [0, C): Caffe only DCHECKs it (release builds read out of bounds); torch
    refuses the index on CPU, which we report as Caffe's check (CUDA asserts on the device)."""
    text = str(exc).splitlines()[0]
    found = re.search(r"Target (-?\d+) is out of bounds", text)
    if found is None:
        layer.fail("Check failed: label_value < %d: a label is outside [0, %d) (%s)"
                   % (upper, upper, text))
    value = int(found.group(1))
    check = ("label_value >= 0 (%d vs. 0)" % value if value < 0
             else "label_value < num_classes (%d vs. %d)" % (value, upper))
    layer.fail("Check failed: %s a label is outside [0, %d)" % (check, upper))


_NO_IGNORE = -(2 ** 62)


def _cross_entropy(layer, scores, labels, ignore_index):
    """``F.cross_entropy`` per position; a label outside [0, C) is Caffe's DCHECK."""
    try:
        return F.cross_entropy(scores, labels, ignore_index=ignore_index, reduction="none")
    except (IndexError, RuntimeError) as exc:
        _label_error(layer, exc, scores.shape[1])


class LossLayer(Layer):
    """Caffe's LossLayer: two bottoms (prediction, label), a 0-axis loss top, loss weight 1 by
    default, the label gets no gradient, and both bottoms share their first dimension."""
    is_loss = True
    exact_bottoms = 2
    exact_tops = 1
    label_bottoms = (1,)

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        self.check_blob_counts(len(param.bottom), len(param.top))

    def check_first_dims(self):
        """LossLayer::Reshape's check (after the layer's own LayerSetUp checks)."""
        a, b = self.bottom_shapes[0], self.bottom_shapes[1]
        canonical_axis(0, len(a), self)
        canonical_axis(0, len(b), self)
        if a[0] != b[0]:
            self.fail("Check failed: bottom[0]->shape(0) == bottom[1]->shape(0) (%d vs. %d) The "
                      "data and label should have the same first dimension." % (a[0], b[0]),
                      "loss_layer.cpp:19")

    def top_shapes(self):
        return [()]


def _normalization_with_legacy(lp, default):
    """The normalization mode from LossParameter, honouring the legacy ``normalize`` field."""
    if lp.HasField("normalization"):
        return lp.normalization
    if lp.HasField("normalize"):
        return VALID if lp.normalize else BATCH_SIZE
    return default


@register("SoftmaxWithLoss", "SOFTMAX_LOSS")
class SoftmaxWithLoss(LossLayer):
    """Caffe SoftmaxWithLoss: softmax over ``softmax_param.axis`` (default 1), then
    ``-sum log(max(p[label], FLT_MIN)) / normalizer`` over the ``outer * inner`` positions not
    equal to ``loss_param.ignore_label``. Normalization FULL / VALID (default) / BATCH_SIZE / NONE;
    the legacy ``normalize: false`` means BATCH_SIZE (only when ``normalization`` is unset);
    normalizer ``max(1, n)``. Gradient ``(p - onehot) * loss_weight / normalizer``, 0 at ignored
    positions. Optional second top: the softmax probabilities (no gradient flows back from it, as
    in Caffe, whose Backward reads only top 0)."""
    exact_tops = None
    min_tops = 1
    max_tops = 2

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        lp = param.loss_param
        self.has_ignore_label = lp.HasField("ignore_label")
        self.ignore_label = int(lp.ignore_label)
        if not lp.HasField("normalization") and lp.HasField("normalize"):
            self.normalization = VALID if lp.normalize else BATCH_SIZE
        else:
            self.normalization = lp.normalization
        shape = self.bottom_shapes[0]
        self.check_first_dims()
        self.axis = canonical_axis(param.softmax_param.axis, len(shape), self)
        self.outer = count(shape, 0, self.axis)
        self.inner = count(shape, self.axis + 1)
        self.channels = int(shape[self.axis])
        label_count = count(self.bottom_shapes[1])
        if self.outer * self.inner != label_count:
            self.fail("Check failed: outer_num_ * inner_num_ == bottom[1]->count() (%d vs. %d) "
                      "Number of labels must match number of predictions; e.g., if softmax axis "
                      "== 1 and prediction shape is (N, C, H, W), label count (number of labels) "
                      "must be N*H*W, with integer values in {0, 1, ..., C-1}."
                      % (self.outer * self.inner, label_count), "softmax_loss_layer.cpp:47")

    def top_shapes(self):
        shapes = [()]
        if len(self.param.top) >= 2:
            shapes.append(tuple(self.bottom_shapes[0]))
        return shapes

    def extra_log_lines(self):
        # Caffe's LayerSetUp creates an internal Softmax layer through the factory, under this
        # layer's name, which logs a second "Creating layer <name>".
        return [("layer_factory.hpp:77", "Creating layer %s" % self.name)]

    def forward(self, x, label):
        if self.inner == 1:          # (N, C): torch's fastest path
            scores, lbl = x.reshape(self.outer, self.channels), label.reshape(self.outer)
        elif self.axis == 1:         # (N, C, spatial...) as is
            scores, lbl = x, label.reshape((self.outer,) + tuple(x.shape[2:]))
        else:
            scores = x.reshape(self.outer, self.channels, self.inner)
            lbl = label.reshape(self.outer, self.inner)
        lbl = lbl.long()
        # -log p[label] per position (log-softmax and pick in one fused op); 0, with no
        # gradient, where the label is ignored.
        nll = _cross_entropy(self, scores, lbl,
                             self.ignore_label if self.has_ignore_label else _NO_IGNORE)
        # Caffe: -log(max(p, FLT_MIN)), i.e. at most -log(FLT_MIN) = 87.3365 per position (the
        # loss of a diverged Caffe net), while its gradient stays p - onehot.
        # (nll + min(M - nll, 0): the value is clamped, the gradient passes unchanged; three
        # small kernels where a torch.where takes four and two more backward)
        nll = nll + (_MAX_NLL - nll.detach()).clamp_max_(0.0)
        valid = None
        if self.has_ignore_label and self.normalization == VALID:
            valid = (lbl != self.ignore_label).sum()
        loss = nll.sum() / _normalizer(self.normalization, self.outer, self.inner, valid)
        if len(self.param.top) >= 2:
            return loss, F.softmax(x.detach(), dim=self.axis)
        return loss


@register("EuclideanLoss", "EUCLIDEAN_LOSS")
class EuclideanLoss(LossLayer):
    """Caffe EuclideanLoss: ``sum((a - b)^2) / (2 * num)``; both inputs get gradients
    (``+-(a - b) * loss_weight / num``); the inputs need equal ``count(1)``."""
    label_bottoms = ()

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        self.check_first_dims()
        a, b = self.bottom_shapes
        if count(a, 1) != count(b, 1):
            self.fail("Check failed: bottom[0]->count(1) == bottom[1]->count(1) (%d vs. %d) "
                      "Inputs must have the same dimension." % (count(a, 1), count(b, 1)),
                      "euclidean_loss_layer.cpp:12")
        self.num = _legacy_dim(self, a, 0)

    def forward(self, a, b):
        if b.shape != a.shape:
            b = b.reshape(a.shape)
        return F.mse_loss(a, b, reduction="sum") / (2.0 * self.num)


@register("SigmoidCrossEntropyLoss", "SIGMOID_CROSS_ENTROPY_LOSS")
class SigmoidCrossEntropyLoss(LossLayer):
    """Caffe SigmoidCrossEntropyLoss, stable form: per element
    ``max(x, 0) - x * t + log(1 + exp(-|x|))``, skipping targets whose ``int`` value equals
    ``loss_param.ignore_label``; normalization defaults to BATCH_SIZE (legacy ``normalize: true``
    means VALID); normalizer ``max(1, n)`` with outer = shape(0), inner = count(1). Gradient
    ``(sigmoid(x) - t) * loss_weight / normalizer``, 0 where ignored."""

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        lp = param.loss_param
        self.has_ignore_label = lp.HasField("ignore_label")
        self.ignore_label = int(lp.ignore_label)
        self.normalization = _normalization_with_legacy(lp, BATCH_SIZE)
        self.check_first_dims()
        a, b = self.bottom_shapes
        self.outer = int(a[0])
        self.inner = count(a, 1)
        if count(a) != count(b):
            self.fail("Check failed: bottom[0]->count() == bottom[1]->count() (%d vs. %d) "
                      "SIGMOID_CROSS_ENTROPY_LOSS layer inputs must have the same count."
                      % (count(a), count(b)), "sigmoid_cross_entropy_loss_layer.cpp:41")

    def forward(self, x, target):
        target = target.detach()
        if target.shape != x.shape:
            target = target.reshape(x.shape)
        if not self.has_ignore_label:
            loss = F.binary_cross_entropy_with_logits(x, target, reduction="sum")
            return loss / _normalizer(self.normalization, self.outer, self.inner)
        valid = target.long() != self.ignore_label
        loss = F.binary_cross_entropy_with_logits(x, target, weight=valid.to(x.dtype),
                                                  reduction="sum")
        return loss / _normalizer(self.normalization, self.outer, self.inner, valid.sum())


@register("HingeLoss", "HINGE_LOSS")
class HingeLoss(LossLayer):
    """Caffe HingeLoss: with ``s = -1`` at the label and ``+1`` elsewhere, ``z = max(0, 1 + s x)``;
    L1 (default) ``sum(z) / num``, L2 ``sum(z^2) / num``. Gradient ``s * sign(z)`` (L1) or
    ``2 s z`` (L2), times ``loss_weight / num``."""

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        self.squared = param.hinge_loss_param.norm == caffe_pb2.HingeLossParameter.L2
        self.check_first_dims()
        shape = self.bottom_shapes[0]
        self.num = _legacy_dim(self, shape, 0)
        self.dim = count(shape) // self.num if self.num else 0

    def forward(self, x, label):
        scores = x.reshape(self.num, self.dim)
        lbl = label.detach().reshape(-1)[:self.num].long()
        try:
            sign = torch.ones_like(scores).scatter_(1, lbl.unsqueeze(1), -1.0)
        except (IndexError, RuntimeError) as exc:
            _label_error(self, exc, self.dim)
        margin = F.relu(1.0 + sign * scores)
        if self.squared:
            return (margin * margin).sum() / self.num
        return margin.sum() / self.num


@register("MultinomialLogisticLoss", "MULTINOMIAL_LOGISTIC_LOSS")
class MultinomialLogisticLoss(LossLayer):
    """Caffe MultinomialLogisticLoss on probabilities: ``-sum log(max(p[label], 1e-20)) / num``
    (Caffe's kLOG_THRESHOLD); gradient at the label ``-loss_weight / (num * max(p, 1e-20))``. The
    label blob must have channels, height and width 1."""

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        self.check_first_dims()
        label_shape = self.bottom_shapes[1]
        for index, (name, line) in enumerate((("channels", 14), ("height", 15),
                                              ("width", 16)), start=1):
            value = _legacy_dim(self, label_shape, index)
            if value != 1:
                self.fail("Check failed: bottom[1]->%s() == 1 (%d vs. 1) " % (name, value),
                          "multinomial_logistic_loss_layer.cpp:%d" % line)
        shape = self.bottom_shapes[0]
        self.num = _legacy_dim(self, shape, 0)
        self.dim = count(shape) // self.num if self.num else 0

    def forward(self, prob, label):
        probs = prob.reshape(self.num, self.dim)
        lbl = label.detach().reshape(-1)[:self.num].long()
        try:
            picked = probs.gather(1, lbl.unsqueeze(1)).squeeze(1)
        except (IndexError, RuntimeError) as exc:
            _label_error(self, exc, self.dim)
        picked = _clamp_min_keep_grad(picked, LOG_THRESHOLD)
        return -torch.log(picked).sum() / self.num


def _read_blob_array(path, layer):
    """A BlobProto file (``.binaryproto``) as a float32 array (Caffe's ReadProtoFromBinaryFile,
    resolved against the working directory)."""
    if not os.path.isfile(path):
        layer.fail("Check failed: fd != -1 (-1 vs. -1) File not found: %s" % path, "io.cpp:54")
    from converters.caffemodel import read_binaryproto
    return np.asarray(read_binaryproto(path), dtype=np.float32)


@register("InfogainLoss", "INFOGAIN_LOSS")
class InfogainLoss(LossLayer):
    """Caffe InfogainLoss (BVLC master, as built for the references): softmax over
    ``infogain_loss_param.axis`` (default 1) is applied internally to the raw scores, then
    ``-sum_l H[label, l] * log(max(p_l, 1e-20)) / normalizer`` over non-ignored positions.
    H (C x C) comes from ``infogain_loss_param.source`` (a BlobProto file, resolved against the
    working directory) or from a third bottom. Normalization as LossParameter (default VALID);
    the legacy ``normalize`` field is refused. Gradient ``p * rowsum(H)[label] - H[label]``,
    times ``loss_weight / normalizer``. Optional second top: the probabilities."""
    exact_bottoms = None
    min_bottoms = 2
    max_bottoms = 3
    exact_tops = None
    min_tops = 1
    max_tops = 2
    label_bottoms = (1, 2)

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        lp = param.loss_param
        ip = param.infogain_loss_param
        shape = self.bottom_shapes[0]
        # LayerSetUp: the internal softmax is set up first (its axis check).
        canonical_axis(ip.axis, len(shape), self)
        self.has_ignore_label = lp.HasField("ignore_label")
        self.ignore_label = int(lp.ignore_label)
        if lp.HasField("normalize"):
            self.fail('Check failed: !this->layer_param_.loss_param().has_normalize() normalize '
                      'is deprecated. use "normalization"', "infogain_loss_layer.cpp:36")
        self.normalization = lp.normalization
        self.register_buffer("infogain", torch.empty(0), persistent=False)
        h_count = None
        if len(self.bottom_shapes) < 3:
            if not ip.HasField("source"):
                self.fail("Check failed: this->layer_param_.infogain_loss_param().has_source() "
                          "Infogain matrix source must be specified.", "infogain_loss_layer.cpp:41")
            h = _read_blob_array(ip.source, self)
            self.infogain = torch.from_numpy(np.ascontiguousarray(h, dtype=np.float32))
            h_count = int(h.size)
        else:
            h_count = count(self.bottom_shapes[2])
        # Reshape
        self.check_first_dims()
        self.axis = canonical_axis(ip.axis, len(shape), self)
        self.outer = count(shape, 0, self.axis)
        self.inner = count(shape, self.axis + 1)
        self.channels = int(shape[self.axis])
        label_count = count(self.bottom_shapes[1])
        if self.outer * self.inner != label_count:
            self.fail("Check failed: outer_num_ * inner_num_ == bottom[1]->count() (%d vs. %d) "
                      "Number of labels must match number of predictions; e.g., if infogain axis "
                      "== 1 and prediction shape is (N, C, H, W), label count (number of labels) "
                      "must be N*H*W, with integer values in {0, 1, ..., C-1}."
                      % (self.outer * self.inner, label_count), "infogain_loss_layer.cpp:60")
        if h_count != self.channels * self.channels:
            self.fail("Check failed: infogain->count() == num_labels_*num_labels_ (%d vs. %d) "
                      % (h_count, self.channels * self.channels), "infogain_loss_layer.cpp:72")

    def top_shapes(self):
        shapes = [()]
        if len(self.param.top) >= 2:
            shapes.append(tuple(self.bottom_shapes[0]))
        return shapes

    def forward(self, x, label, infogain=None):
        c = self.channels
        h = (infogain.detach() if infogain is not None else self.infogain)
        h = h.to(device=x.device, dtype=x.dtype).reshape(c, c)
        logp = F.log_softmax(x, dim=self.axis).reshape(self.outer, c, self.inner)
        logp = _clamp_min_keep_grad(logp, LOG_LOG_THRESHOLD)
        lbl = label.detach().reshape(self.outer, self.inner).long()
        valid = None
        if self.has_ignore_label:
            valid = lbl != self.ignore_label
            lbl = torch.where(valid, lbl, torch.zeros_like(lbl))
        try:
            rows = h.index_select(0, lbl.reshape(-1)).reshape(self.outer, self.inner, c)
        except (IndexError, RuntimeError) as exc:
            _label_error(self, exc, c)
        if valid is not None:
            rows = rows * valid.unsqueeze(2).to(rows.dtype)
        loss = -(logp * rows.transpose(1, 2)).sum()
        norm = _normalizer(self.normalization, self.outer, self.inner,
                           valid.sum() if valid is not None else None)
        loss = loss / norm
        if len(self.param.top) >= 2:
            return loss, F.softmax(x.detach(), dim=self.axis)
        return loss


class _ContrastiveFunction(torch.autograd.Function):
    """Caffe's ContrastiveLoss Forward and Backward on (num, channels) features."""

    @staticmethod
    def forward(ctx, a, b, similar, margin, legacy):
        diff = a - b
        dist_sq = (diff * diff).sum(dim=1)
        if legacy:
            dissimilar = torch.clamp_min(margin - dist_sq, 0.0)
        else:
            gap = torch.clamp_min(margin - torch.sqrt(dist_sq), 0.0)
            dissimilar = gap * gap
        num = a.shape[0]
        loss = torch.where(similar, dist_sq, dissimilar).sum() / num / 2.0
        ctx.save_for_backward(diff, dist_sq, similar)
        ctx.margin, ctx.legacy = margin, legacy
        return loss

    @staticmethod
    def backward(ctx, grad):
        diff, dist_sq, similar = ctx.saved_tensors
        alpha = grad / diff.shape[0]
        if ctx.legacy:
            mdist = ctx.margin - dist_sq
            beta = -alpha * torch.ones_like(dist_sq)
        else:
            dist = torch.sqrt(dist_sq)
            mdist = ctx.margin - dist
            beta = -alpha * mdist / (dist + 1e-4)
        coef = torch.where(similar, alpha * torch.ones_like(dist_sq),
                           torch.where(mdist > 0, beta, torch.zeros_like(beta)))
        grad_a = coef.unsqueeze(1) * diff
        return grad_a, -grad_a, None, None, None


@register("ContrastiveLoss", "CONTRASTIVE_LOSS")
class ContrastiveLoss(LossLayer):
    """Caffe ContrastiveLoss on feature pairs (N, C, 1, 1) and a similarity label (N, 1, 1, 1):
    ``d^2`` for similar pairs (``int(sim) != 0``), else ``max(margin - d, 0)^2``
    (``legacy_version``: ``max(margin - d^2, 0)``), summed and divided by ``2 N``; margin default 1.
    Both features get gradients; Caffe's Backward divides by ``d + 1e-4`` (not ``d``) in the
    non-legacy form, reproduced exactly."""
    exact_bottoms = 3
    label_bottoms = (2,)

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        p = param.contrastive_loss_param
        self.margin = float(np.float32(p.margin))
        self.legacy = bool(p.legacy_version)
        a, b, s = self.bottom_shapes
        checks = [
            ("bottom[0]->channels() == bottom[1]->channels()", _legacy_dim(self, a, 1),
             _legacy_dim(self, b, 1), 13),
            ("bottom[0]->height() == 1", _legacy_dim(self, a, 2), 1, 14),
            ("bottom[0]->width() == 1", _legacy_dim(self, a, 3), 1, 15),
            ("bottom[1]->height() == 1", _legacy_dim(self, b, 2), 1, 16),
            ("bottom[1]->width() == 1", _legacy_dim(self, b, 3), 1, 17),
            ("bottom[2]->channels() == 1", _legacy_dim(self, s, 1), 1, 18),
            ("bottom[2]->height() == 1", _legacy_dim(self, s, 2), 1, 19),
            ("bottom[2]->width() == 1", _legacy_dim(self, s, 3), 1, 20),
        ]
        for expr, lhs, rhs, line in checks:
            if lhs != rhs:
                self.fail("Check failed: %s (%d vs. %d) " % (expr, lhs, rhs),
                          "contrastive_loss_layer.cpp:%d" % line)
        self.check_first_dims()
        self.num = _legacy_dim(self, a, 0)
        self.channels = _legacy_dim(self, a, 1)

    def forward(self, a, b, sim):
        similar = sim.detach().reshape(-1)[:self.num].long() != 0
        return _ContrastiveFunction.apply(a.reshape(self.num, self.channels),
                                          b.reshape(self.num, self.channels),
                                          similar, self.margin, self.legacy)
