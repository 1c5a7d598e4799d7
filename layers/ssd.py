"""SSD-Caffe's layers (weiliu89/caffe, branch ssd): Normalize, Permute, PriorBox, SmoothL1Loss,
MultiBoxLoss, DetectionOutput, DetectionEvaluate.

Each class docstring lists the SSD-Caffe semantics it reproduces. The box arithmetic lives in
:mod:`layers.bbox_util`. Gradients come from autograd and equal SSD-Caffe's Backward (the refs in
``shared/refs/ssd/ssd_layers`` check this); where SSD-Caffe's Backward is not the derivative of its
Forward (SmoothL1Loss with weights) a custom autograd function reproduces Caffe's numbers.
"""
import math

import numpy as np
import torch

from converters import glog
from converters.errors import CaffeError
from layers import bbox_util as bu
from layers.base import Layer, to_device_async
from layers.registry import register

# LossParameter.NormalizationMode
FULL, VALID, BATCH_SIZE, NONE = 0, 1, 2, 3
# MultiBoxLossParameter enums
L2, SMOOTH_L1 = 0, 1
SOFTMAX, LOGISTIC = 0, 1
MINING_NONE, MAX_NEGATIVE, HARD_EXAMPLE = 0, 1, 2


def _legacy_dims(shape, layer, what="bottom"):
    """Caffe's legacy num/channels/height/width of a blob (missing trailing axes are 1)."""
    if len(shape) > 4:
        layer.fail("Cannot use legacy accessors on Blobs with > 4 axes (%s shape %s)."
                   % (what, " ".join(str(d) for d in shape)), "blob.hpp:141")
    dims = list(shape) + [1] * (4 - len(shape))
    return tuple(int(d) for d in dims)


# ============================================================================ Normalize
@register("Normalize")
class Normalize(Layer):
    """SSD's L2 normalisation with a learned scale (``norm_param``).

    * ``across_spatial`` (default true): one norm per sample over C*H*W; otherwise one norm per
      spatial position over the channels. The norm is ``sqrt(sum(x^2) + eps)`` (eps, default
      1e-10, added inside the square root in both modes).
    * ``channel_shared`` (default true): one scale, stored as a 0-axis blob (shape ``()``);
      otherwise one scale per channel (shape ``(C,)``). ``scale_filler`` defaults to constant 1.
    * Bottom needs at least 2 axes; H and W are the legacy height/width (1 when absent).
    """

    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        shape = self.bottom_shapes[0]
        if len(shape) < 2:
            self.fail("Number of axes of bottom blob must be >=2.", "normalize_layer.cpp:11")
        _legacy_dims(shape, self)
        p = param.norm_param
        self.across_spatial = p.across_spatial
        self.channel_shared = p.channel_shared
        self.eps = bu.f32(p.eps)
        channels = int(shape[1])
        if p.HasField("scale_filler"):
            filler = p.scale_filler
        else:
            from converters import caffe_pb2
            filler = caffe_pb2.FillerParameter(type="constant", value=1.0)
        self.scale = self.add_blob(() if self.channel_shared else (channels,), filler)

    def forward(self, x):
        shape = x.shape
        n, c = shape[0], shape[1]
        xs = x.reshape(n, c, -1)
        sq = xs * xs
        if self.across_spatial:
            norm = torch.sqrt(sq.sum(dim=(1, 2), keepdim=True) + self.eps)
        else:
            norm = torch.sqrt(sq.sum(dim=1, keepdim=True) + self.eps)
        y = xs / norm
        if self.channel_shared:
            y = y * self.scale
        else:
            y = y * self.scale.view(1, c, 1)
        return y.reshape(shape)


# ============================================================================ Permute
@register("Permute")
class Permute(Layer):
    """SSD's Permute (``permute_param.order``): axes listed first, the others after in order.

    An order must be below the number of axes and appear once; when the result is the identity
    the top shares the bottom's values (Caffe shares data and diff).
    """

    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        num_axes = len(self.bottom_shapes[0])
        orders = []
        for order in param.permute_param.order:
            if order >= num_axes:
                self.fail("Check failed: order < num_axes_ (%d vs. %d) order should be less "
                          "than the input dimension." % (order, num_axes), "permute_layer.cpp:37")
            if order in orders:
                self.fail("there are duplicate orders", "permute_layer.cpp:40")
            orders.append(int(order))
        for i in range(num_axes):
            if i not in orders:
                orders.append(i)
        self.orders = tuple(orders)
        self.need_permute = self.orders != tuple(range(num_axes))

    def forward(self, x):
        if not self.need_permute:
            return x.view(x.shape)
        return x.permute(*self.orders).contiguous()


# ============================================================================ PriorBox
@register("PriorBox")
class PriorBox(Layer):
    """SSD's PriorBox: default boxes for every cell of bottom 0's H x W map.

    Reproduced from prior_box_layer.cpp:

    * aspect ratios: 1 first, then each ``aspect_ratio`` not already present (|diff| < 1e-6),
      followed by its inverse when ``flip``; priors per cell =
      ``len(ratios) * len(min_size) + len(max_size)``.
    * Per cell, per ``min_size`` s: the s x s box, then (with ``max_size``) the
      sqrt(s * max) square, then the other ratios (width ``s*sqrt(ar)``, height
      ``s/sqrt(ar)``; the refs of SSD-Caffe 4817bf8 confirm ``s``, not sqrt(s * max), even with
      a max_size). **min_size and max_size
      act as integers** (Caffe assigns them to ``int``: ``min_size: 25.6`` gives 25).
    * Centre ``(w + offset) * step_w``; ``step``/``step_h``/``step_w`` default to
      image size / map size; ``img_size``/``img_h``/``img_w`` default to bottom 1's size.
    * Coordinates are normalised by the image size, clipped to [0, 1] when ``clip``; the second
      channel holds the variances (1 value repeated, or 4 per prior; default 0.1).
    * Top shape ``(1, 2, H*W*num_priors*4)``; the output does not depend on the bottoms' values
      and no gradient flows to them.
    """

    exact_bottoms = 2
    exact_tops = 1

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        p = param.prior_box_param
        where = "prior_box_layer.cpp"
        if len(p.min_size) == 0:
            self.fail("Check failed: prior_box_param.min_size_size() > 0 must provide min_size.",
                      where + ":15")
        self.min_sizes = []
        for v in p.min_size:
            v = bu.f32(v)
            if not v > 0:
                self.fail("Check failed: min_sizes_.back() > 0 min_size must be positive.",
                          where + ":18")
            self.min_sizes.append(v)
        ratios = [1.0]
        self.flip = p.flip
        for ar in p.aspect_ratio:
            ar = np.float32(ar)
            if not ar > 0:    # SSD-Caffe would divide by it and take its square root: NaN priors
                self.fail("prior_box_param.aspect_ratio must be positive (got %s)"
                          % glog.format_number(ar))
            if any(abs(np.float32(ar - np.float32(r))) < 1e-6 for r in ratios):
                continue
            ratios.append(float(ar))
            if self.flip:
                ratios.append(bu.f32(1.0 / float(ar)))
        self.aspect_ratios = ratios
        self.max_sizes = []
        if len(p.max_size):
            if len(p.max_size) != len(p.min_size):
                self.fail("Check failed: prior_box_param.min_size_size() == "
                          "prior_box_param.max_size_size() (%d vs. %d)"
                          % (len(p.min_size), len(p.max_size)), where + ":42")
            for i, v in enumerate(p.max_size):
                v = bu.f32(v)
                if not v > self.min_sizes[i]:
                    self.fail("Check failed: max_sizes_[i] > min_sizes_[i] (%s vs. %s) max_size "
                              "must be greater than min_size." % (
                                  glog.format_number(v), glog.format_number(self.min_sizes[i])),
                              where + ":46")
                self.max_sizes.append(v)
        self.num_priors = len(ratios) * len(self.min_sizes) + len(self.max_sizes)
        self.clip = p.clip
        if len(p.variance) > 1:
            if len(p.variance) != 4:
                self.fail("Check failed: prior_box_param.variance_size() == 4 (%d vs. 4)"
                          % len(p.variance), where + ":54")
            for v in p.variance:
                if not v > 0:
                    self.fail("Check failed: prior_box_param.variance(i) > 0", where + ":56")
            self.variance = [bu.f32(v) for v in p.variance]
        elif len(p.variance) == 1:
            if not p.variance[0] > 0:
                self.fail("Check failed: prior_box_param.variance(0) > 0", where + ":60")
            self.variance = [bu.f32(p.variance[0])]
        else:
            self.variance = [bu.f32(0.1)]
        if p.HasField("img_h") or p.HasField("img_w"):
            if p.HasField("img_size"):
                self.fail("Either img_size or img_h/img_w should be specified; not both.",
                          where + ":69")
            self.img_h, self.img_w = int(p.img_h), int(p.img_w)
            if not self.img_h > 0:
                self.fail("img_h should be larger than 0.", where + ":72")
            if not self.img_w > 0:
                self.fail("img_w should be larger than 0.", where + ":74")
        elif p.HasField("img_size"):
            if not p.img_size > 0:
                self.fail("img_size should be larger than 0.", where + ":77")
            self.img_h = self.img_w = int(p.img_size)
        else:
            self.img_h = self.img_w = 0
        if p.HasField("step_h") or p.HasField("step_w"):
            if p.HasField("step"):
                self.fail("Either step or step_h/step_w should be specified; not both.",
                          where + ":87")
            self.step_h, self.step_w = bu.f32(p.step_h), bu.f32(p.step_w)
            if not self.step_h > 0:
                self.fail("step_h should be larger than 0.", where + ":90")
            if not self.step_w > 0:
                self.fail("step_w should be larger than 0.", where + ":92")
        elif p.HasField("step"):
            if not p.step > 0:
                self.fail("step should be larger than 0.", where + ":95")
            self.step_h = self.step_w = bu.f32(p.step)
        else:
            self.step_h = self.step_w = 0.0
        self.offset = bu.f32(p.offset)
        _, _, h, w = _legacy_dims(self.bottom_shapes[0], self)
        if h * w * self.num_priors * 4 <= 0:
            self.fail("Check failed: top_shape[2] > 0 (0 vs. 0)", where + ":118")
        self._cache = {}

    def _box_sizes(self):
        """(width, height) of each prior of one cell, in SSD-Caffe's order, as float32."""
        sizes = []
        for s, min_size in enumerate(self.min_sizes):
            mn = int(min_size)               # SSD-Caffe: int min_size_ = min_sizes_[s];
            sizes.append((np.float32(mn), np.float32(mn)))
            if self.max_sizes:
                mx = int(self.max_sizes[s])  # int max_size_ = max_sizes_[s];
                side = np.float32(np.sqrt(np.float64(mn * mx)))
                sizes.append((side, side))
            for ar in self.aspect_ratios:
                if abs(ar - 1.0) < 1e-6:
                    continue
                root = np.float64(np.sqrt(np.float32(ar)))
                sizes.append((np.float32(mn * root), np.float32(mn / root)))
        return sizes

    def _priors(self, layer_h, layer_w, img_h, img_w):
        if self.img_h == 0 or self.img_w == 0:
            img_width, img_height = img_w, img_h
        else:
            img_width, img_height = self.img_w, self.img_h
        if self.step_w == 0 or self.step_h == 0:
            step_w = np.float32(img_width) / np.float32(layer_w)
            step_h = np.float32(img_height) / np.float32(layer_h)
        else:
            step_w, step_h = np.float32(self.step_w), np.float32(self.step_h)
        off = np.float32(self.offset)
        cx = (np.arange(layer_w, dtype=np.float32) + off) * step_w      # float32, as Caffe
        cy = (np.arange(layer_h, dtype=np.float32) + off) * step_h
        sizes = self._box_sizes()
        bw = np.array([s[0] for s in sizes], np.float64)
        bh = np.array([s[1] for s in sizes], np.float64)
        cxg = cx.astype(np.float64)[None, :, None]
        cyg = cy.astype(np.float64)[:, None, None]
        boxes = np.empty((layer_h, layer_w, len(sizes), 4), np.float32)
        boxes[..., 0] = (cxg - bw / 2.0) / img_width
        boxes[..., 1] = (cyg - bh / 2.0) / img_height
        boxes[..., 2] = (cxg + bw / 2.0) / img_width
        boxes[..., 3] = (cyg + bh / 2.0) / img_height
        coords = boxes.reshape(-1)
        if self.clip:
            coords = np.clip(coords, 0.0, 1.0)
        if len(self.variance) == 1:
            var = np.full(coords.shape, self.variance[0], np.float32)
        else:
            var = np.tile(np.asarray(self.variance, np.float32), coords.size // 4)
        return np.stack([coords, var])[None]

    def forward(self, feature, image):
        _, _, layer_h, layer_w = _legacy_dims(tuple(feature.shape), self)
        _, _, img_h, img_w = _legacy_dims(tuple(image.shape), self)
        key = (layer_h, layer_w, img_h, img_w, feature.device, feature.dtype)
        out = self._cache.get(key)
        if out is None:
            out = torch.from_numpy(self._priors(layer_h, layer_w, img_h, img_w)).to(
                device=feature.device, dtype=feature.dtype)
            self._cache = {key: out}
        return out


# ============================================================================ SmoothL1Loss
class _SmoothL1Function(torch.autograd.Function):
    """Forward ``sum(smoothL1(w * (a - b))) / num``; Backward as SSD-Caffe's (ignores ``w``)."""

    @staticmethod
    def forward(ctx, a, b, w):
        d = a - b
        if w is not None:
            d = w * d
        ad = d.abs()
        err = torch.where(ad < 1, 0.5 * d * d, ad - 0.5)
        ctx.save_for_backward(d)
        ctx.num = a.shape[0]
        return err.sum() / a.shape[0]

    @staticmethod
    def backward(ctx, grad):
        (d,) = ctx.saved_tensors
        dd = torch.where(d.abs() < 1, d, torch.sign(d))
        g = dd * (grad / ctx.num)
        return g, -g, None


@register("SmoothL1Loss")
class SmoothL1Loss(Layer):
    """SSD-Caffe's (Fast R-CNN style) SmoothL1Loss: 2 or 3 bottoms (prediction, target, weights).

    ``loss = sum_i f(w_i * (a_i - b_i)) / num`` with ``f(x) = 0.5 x^2`` if ``|x| < 1`` else
    ``|x| - 0.5`` and ``num`` the first dimension. Backward gives ``+-f'(d) * top_diff / num`` to
    the prediction and the target (both allowed under force_backward); SSD-Caffe's Backward does
    not multiply by the weights, and neither does this one.
    """

    min_bottoms = 2
    max_bottoms = 3
    exact_tops = 1
    is_loss = True

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        s0 = self.bottom_shapes[0]
        s1 = self.bottom_shapes[1]
        if len(s0) == 0 or len(s1) == 0 or s0[0] != s1[0]:
            self.fail("Check failed: bottom[0]->shape(0) == bottom[1]->shape(0) The data and "
                      "label should have the same first dimension.", "loss_layer.cpp:19")
        d0 = _legacy_dims(s0, self)
        for k, s in enumerate(self.bottom_shapes[1:], 1):
            dk = _legacy_dims(s, self)
            if d0[1:] != dk[1:]:
                self.fail("Check failed: bottom[0] and bottom[%d] differ in channels/height/width "
                          "(%s vs. %s)" % (k, " ".join(map(str, s0)), " ".join(map(str, s))),
                          "smooth_L1_loss_layer.cpp:27")

    def forward(self, a, b, w=None):
        return _SmoothL1Function.apply(a, b, w)

    def top_shapes(self):
        return [()]


# ============================================================================ MultiBoxLoss
@register("MultiBoxLoss")
class MultiBoxLoss(Layer):
    """SSD's MultiBoxLoss (bottoms: loc ``(N, P*L*4)``, conf ``(N, P*C)``, priors
    ``(1, 2, P*4)``, ground truth ``(1, 1, G, 8)`` rows ``[item, label, instance, xmin, ymin,
    xmax, ymax, difficult]``). Only loc and conf get gradients.

    Reproduced from multibox_loss_layer.cpp and bbox_util.cpp (FindMatches, MineHardExamples,
    EncodeLocPrediction, EncodeConfPrediction):

    * Ground truth: rows with item -1 are skipped, a background label is an error, difficult
      boxes are dropped unless ``use_difficult_gt``.
    * Matching against the priors (``use_prior_for_matching``) or against the decoded
      predictions, BIPARTITE or PER_PREDICTION, ``overlap_threshold``,
      ``ignore_cross_boundary_bbox``; with ``share_location: false`` per class.
    * Mining (``mining_type``): MAX_NEGATIVE picks, per image, the unmatched priors with overlap
      < ``neg_overlap`` of highest confidence loss (``-log p(background)``), at most
      ``int(num_pos * neg_pos_ratio)``; HARD_EXAMPLE ranks all priors by conf + loc loss and
      keeps ``sample_size`` (optionally after NMS on the losses, ``nms_param``), turning unpicked
      positives into ignored ones; NONE uses every prior.
    * Loc loss: SMOOTH_L1 (SmoothL1Loss) or L2 (EuclideanLoss, 0.5 sum d^2) between the matched
      predictions and the encoded ground truth (CORNER / CENTER_SIZE / CORNER_SIZE,
      ``encode_variance_in_target``, ``bp_inside``), times ``loc_weight``.
    * Conf loss: SOFTMAX (SoftmaxWithLoss, normalization NONE, ``-log(max(p, FLT_MIN))``) or
      LOGISTIC (SigmoidCrossEntropyLoss over the class scores); with mining over positives and
      mined negatives, without over every prior (SSD-Caffe's target layout is kept, including
      its per-image offset of LOGISTIC targets without mining).
    * Both divided by the normalizer of ``loss_param.normalization`` (VALID = number of matches,
      FULL = N * P, BATCH_SIZE = N, NONE = 1; at least 1; legacy ``normalize``), each term only
      when the layer's ``propagate_down`` for loc / conf is true (default: loc and conf).
    * The layer logs nothing per iteration; at set-up Caffe logs the creation of its internal
      loss layers ("Creating layer <name>_smooth_L1_loc", "<name>_softmax_conf" twice).
    """

    exact_bottoms = 4
    exact_tops = 1
    is_loss = True
    label_bottoms = (2, 3)

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        src = "multibox_loss_layer.cpp"
        # SSD-Caffe adds propagate_down (true, true, false, false) to its own copy of the layer
        # parameter when none is given; the Net keeps the user's (empty) list.
        self.propagate = list(param.propagate_down) or [True, True, False, False]
        p = param.multibox_loss_param
        if not p.HasField("num_classes"):
            self.fail("Must provide num_classes.", src + ":27")
        self.num_classes = int(p.num_classes)
        if self.num_classes < 1:
            self.fail("num_classes should not be less than 1.", src + ":29")
        self.share_location = p.share_location
        self.loc_classes = 1 if self.share_location else self.num_classes
        self.match_type = p.match_type
        self.overlap_threshold = bu.f32(p.overlap_threshold)
        self.use_prior_for_matching = p.use_prior_for_matching
        self.background_label_id = int(p.background_label_id)
        self.use_difficult_gt = p.use_difficult_gt
        self.mining_type = p.mining_type
        if p.HasField("do_neg_mining"):
            glog.warning("do_neg_mining is deprecated, use mining_type instead.",
                         where=src + ":39")
            if bool(p.do_neg_mining) != (self.mining_type != MINING_NONE):
                self.fail("Check failed: do_neg_mining_ == mining_type_ != "
                          "MultiBoxLossParameter_MiningType_NONE (%d vs. %d)"
                          % (int(p.do_neg_mining), int(self.mining_type != MINING_NONE)),
                          src + ":41")
        self.do_neg_mining = self.mining_type != MINING_NONE
        self.neg_pos_ratio = bu.f32(p.neg_pos_ratio)
        self.neg_overlap = bu.f32(p.neg_overlap)
        self.code_type = p.code_type
        self.encode_variance_in_target = p.encode_variance_in_target
        self.map_object_to_agnostic = p.map_object_to_agnostic
        if self.map_object_to_agnostic and self.num_classes != 2:
            self.fail("Check failed: num_classes_ == 2 (%d vs. 2)" % self.num_classes,
                      "bbox_util.cpp:1240")
        if self.map_object_to_agnostic and self.background_label_id + 1 >= self.num_classes:
            # SSD-Caffe would index past the class scores (label background + 1).
            self.fail("map_object_to_agnostic maps objects to label %d, outside [0, %d) with "
                      "background_label_id %d" % (self.background_label_id + 1,
                                                  self.num_classes, self.background_label_id))
        self.ignore_cross_boundary_bbox = p.ignore_cross_boundary_bbox
        self.bp_inside = p.bp_inside
        self.use_prior_for_nms = p.use_prior_for_nms
        self.sample_size = int(p.sample_size)
        self.has_nms_param = p.HasField("nms_param")
        self.nms_threshold = bu.f32(p.nms_param.nms_threshold) if self.has_nms_param else 0.0
        # SSD-Caffe reads top_k() even when unset: an nms_param without top_k gives top_k 0.
        self.nms_top_k = int(p.nms_param.top_k) if self.has_nms_param else -1
        lp = param.loss_param
        if not lp.HasField("normalization") and lp.HasField("normalize"):
            self.normalization = VALID if lp.normalize else BATCH_SIZE
        else:
            self.normalization = lp.normalization
        if self.normalization not in (FULL, VALID, BATCH_SIZE, NONE):
            self.fail("Unknown normalization mode: %d" % self.normalization, "loss_layer.cpp:43")
        if self.do_neg_mining and not self.share_location:
            self.fail("Currently only support negative mining if share_location is true.",
                      src + ":64")
        if self.code_type not in (bu.CORNER, bu.CENTER_SIZE, bu.CORNER_SIZE):
            self.fail("Unknown code type %d" % self.code_type, src + ":52")
        self.loc_weight = bu.f32(p.loc_weight)
        self.loc_loss_type = p.loc_loss_type
        self._log_lines = []
        if self.loc_loss_type == L2:
            self._log_lines.append(("layer_factory.hpp:77",
                                    "Creating layer %s_l2_loc" % param.name))
        elif self.loc_loss_type == SMOOTH_L1:
            self._log_lines.append(("layer_factory.hpp:77",
                                    "Creating layer %s_smooth_L1_loc" % param.name))
        else:
            self.fail("Unknown localization loss type.", src + ":96")
        self.conf_loss_type = p.conf_loss_type
        if self.conf_loss_type == SOFTMAX:
            if not 0 <= self.background_label_id < self.num_classes:
                self.fail("background_label_id should be within [0, num_classes) for Softmax.",
                          src + ":105")
            # SoftmaxWithLoss creates its internal Softmax layer under the same name.
            self._log_lines += [("layer_factory.hpp:77",
                                 "Creating layer %s_softmax_conf" % param.name)] * 2
        elif self.conf_loss_type == LOGISTIC:
            self._log_lines.append(("layer_factory.hpp:77",
                                    "Creating layer %s_logistic_conf" % param.name))
        else:
            self.fail("Unknown confidence loss type.", src + ":139")
        self._check_shapes(self.bottom_shapes)
        self.last_num_matches = None
        self.last_num_negs = None

    def extra_log_lines(self):
        return list(self._log_lines)

    def _check_shapes(self, shapes):
        loc, conf, prior, gt = (tuple(s) for s in shapes)
        if loc[0] != conf[0]:
            self.fail("Check failed: bottom[0]->shape(0) == bottom[1]->shape(0) (%d vs. %d) The "
                      "data and label should have the same first dimension."
                      % (loc[0], conf[0]), "loss_layer.cpp:19")
        dl = _legacy_dims(loc, self)
        dc = _legacy_dims(conf, self)
        dp = _legacy_dims(prior, self)
        _legacy_dims(gt, self)
        num_priors = dp[2] // 4
        if num_priors * self.loc_classes * 4 != dl[1]:
            self.fail("Check failed: num_priors_ * loc_classes_ * 4 == bottom[0]->channels() "
                      "(%d vs. %d) Number of priors must match number of location predictions."
                      % (num_priors * self.loc_classes * 4, dl[1]),
                      "multibox_loss_layer.cpp:150")
        if num_priors * self.num_classes != dc[1]:
            self.fail("Check failed: num_priors_ * num_classes_ == bottom[1]->channels() "
                      "(%d vs. %d) Number of priors must match number of confidence predictions."
                      % (num_priors * self.num_classes, dc[1]), "multibox_loss_layer.cpp:152")

    def top_shapes(self):
        return [()]

    # ------------------------------------------------------------------ ground truth
    def _ground_truth(self, gt, device, dtype):
        """GetGroundTruth: {item: (boxes (G,4) tensor, labels list, labels tensor)}."""
        num_gt = _legacy_dims(tuple(gt.shape), self)[2]
        host = getattr(gt, "host_copy", None)      # the data layer's host batch (no GPU wait)
        src = host if host is not None and host.shape == gt.shape else gt.detach()
        rows = src.reshape(-1)[:num_gt * 8].to("cpu", torch.float32).numpy()
        rows = rows.reshape(num_gt, 8)
        per_item = {}
        for r in rows:
            item = int(r[0])
            if item == -1:
                continue
            label = int(r[1])
            if label == self.background_label_id:
                raise CaffeError("Check failed: background_label_id != label (%d vs. %d) Found "
                                 "background label in the dataset. (layer %s)"
                                 % (self.background_label_id, label, self.name),
                                 where="bbox_util.cpp:795")
            difficult = bool(r[7])
            if not self.use_difficult_gt and difficult:
                continue
            per_item.setdefault(item, []).append((label, r[3:7].copy()))
        self._bad_labels = {}
        if not self.map_object_to_agnostic or self.do_neg_mining:
            for item, entries in per_item.items():
                bad = [g for g, e in enumerate(entries) if not 0 <= e[0] < self.num_classes]
                if bad:
                    self._bad_labels[item] = (bad, [entries[g][0] for g in bad])
        out = {}
        for item, entries in per_item.items():
            labels = [e[0] for e in entries]
            boxes = torch.from_numpy(np.stack([e[1] for e in entries])).to(dtype)
            out[item] = (to_device_async(boxes, device), labels,
                         to_device_async(torch.tensor(labels, dtype=torch.long), device))
        return out

    # ------------------------------------------------------------------ matching
    def _find_matches(self, num, gts, priors, variances, loc_preds):
        """FindMatches: per image, {label: (indices (P,), overlaps (P,))} (empty without gt)."""
        all_matches = []
        for i in range(num):
            matches = {}
            if i not in gts:
                all_matches.append(matches)
                continue
            boxes, labels, labels_t = gts[i]
            if not self.use_prior_for_matching:
                for c in range(self.loc_classes):
                    label = -1 if self.share_location else c
                    if not self.share_location and label == self.background_label_id:
                        continue
                    decoded = bu.decode_bboxes(priors, variances, self.code_type,
                                               self.encode_variance_in_target,
                                               loc_preds[i, :, c], clip=False)
                    if label == -1:          # every ground truth: indices map to themselves
                        sub_t, sub_boxes = None, boxes
                    else:
                        subset = [g for g, lab in enumerate(labels) if lab == label]
                        sub_t = to_device_async(torch.tensor(subset, dtype=torch.long),
                                                priors.device)
                        sub_boxes = boxes[sub_t]
                    idx, ov = bu.match_bboxes(sub_boxes, decoded, self.match_type,
                                              self.overlap_threshold,
                                              self.ignore_cross_boundary_bbox)
                    if sub_t is not None and len(sub_t):
                        idx = torch.where(idx > -1, sub_t[idx.clamp(min=0)], idx)
                    matches[label] = (idx, ov)
            else:
                idx, ov = bu.match_bboxes(boxes, priors, self.match_type, self.overlap_threshold,
                                          self.ignore_cross_boundary_bbox)
                if self.share_location:
                    matches[-1] = (idx, ov)
                else:
                    gl = labels_t[idx.clamp(min=0)]
                    for c in range(self.loc_classes):
                        if c == self.background_label_id:
                            continue
                        m = torch.where((idx > -1) & (gl == c), idx, torch.full_like(idx, -1))
                        matches[c] = (m, ov)
            all_matches.append(matches)
        return all_matches

    def _check_matched_labels(self, matches):
        """A matched ground-truth label must be a class index (SSD-Caffe's ComputeConfLoss
        CHECK; without mining Caffe would read past the scores). Syncs only when such a label
        exists in the batch."""
        for item, (bad, labels) in self._bad_labels.items():
            if item >= len(matches):
                continue
            for m, _ in matches[item].values():
                hit = torch.isin(m, torch.tensor(bad, device=m.device))
                if bool(hit.any()):
                    raise CaffeError("Check failed: label < num_classes (%d vs. %d): ground truth "
                                     "label outside [0, num_classes) matched a prior (layer %s)"
                                     % (max(labels), self.num_classes, self.name),
                                     where="bbox_util.cpp:1024")

    # ------------------------------------------------------------------ per-prior losses
    def _conf_loss_per_prior(self, conf, labels):
        """ComputeConfLoss: per prior loss for ``labels`` (N, P), SSD-Caffe's formulas."""
        if self.conf_loss_type == SOFTMAX:
            mx = conf.max(dim=2, keepdim=True).values
            e = torch.exp(conf - mx)
            s = e.sum(dim=2)
            prob = torch.gather(e, 2, labels[..., None])[..., 0] / s
            return -torch.log(prob.clamp_min(bu.FLT_MIN))
        classes = torch.arange(conf.shape[2], device=conf.device)
        target = (classes == labels[..., None]).to(conf.dtype)
        pos = (conf >= 0).to(conf.dtype)
        return -(conf * (target - pos) - torch.log1p(torch.exp(conf - 2 * conf * pos))).sum(2)

    def _matched_loc(self, i, label, m, priors, variances, boxes, loc, loc_detached):
        """EncodeLocPrediction for image ``i``/``label``: (pred (P,4), target (P,4), pos (P,))."""
        pos = m > -1
        col = 0 if self.share_location else label
        gtb = boxes[m.clamp(min=0)]
        enc = bu.encode_bboxes(priors, variances, self.code_type, self.encode_variance_in_target,
                               gtb)
        enc = torch.where(pos[:, None], enc, torch.zeros_like(enc))
        pred = loc[i, :, col]
        if self.bp_inside:
            if self.use_prior_for_matching:
                mb = priors
            else:
                mb = bu.decode_bboxes(priors, variances, self.code_type,
                                      self.encode_variance_in_target, loc_detached[i, :, col],
                                      clip=False)
            outside = (mb < 0) | (mb > 1)
            pred = torch.where(outside, enc, pred)
        if self.encode_variance_in_target:
            # Caffe divides the stored prediction by the variance and copies the diff of that
            # quotient back unchanged: value pred/var, gradient as if it were pred.
            pred = pred + (pred / variances - pred).detach()
            enc = enc / variances
        return pred, enc, pos

    def _loc_elementwise(self, d):
        if self.loc_loss_type == SMOOTH_L1:
            ad = d.abs()
            return torch.where(ad < 1, 0.5 * d * d, ad - 0.5)
        return 0.5 * d * d

    # ------------------------------------------------------------------ mining
    def _mine(self, num, matches, gts, conf_d, priors, variances, loc_d):
        """MineHardExamples: returns (neg masks per image, updated matches)."""
        device = conf_d.device
        num_priors = priors.shape[0]
        labels = torch.full((num, num_priors), self.background_label_id, dtype=torch.long,
                            device=device)
        for i in range(num):
            if not matches[i]:
                continue
            lab = labels[i]
            done = torch.zeros(num_priors, dtype=torch.bool, device=device)
            for label in sorted(matches[i]):
                m = matches[i][label][0]
                sel = (m > -1) & ~done
                lab = torch.where(sel, gts[i][2][m.clamp(min=0)], lab)
                done = done | sel
            labels[i] = lab
        loss = self._conf_loss_per_prior(conf_d, labels)
        if self.mining_type == HARD_EXAMPLE:
            loc_loss = torch.zeros_like(loss)
            for i in range(num):
                for label in sorted(matches[i]):
                    m = matches[i][label][0]
                    pred, enc, pos = self._matched_loc(i, label, m, priors, variances,
                                                       gts[i][0], loc_d, loc_d)
                    per = self._loc_elementwise(pred - enc).sum(1)
                    loc_loss[i] = torch.where(pos, per, loc_loss[i])
            loss = loss + loc_loss
        negs = []
        new_matches = []
        for i in range(num):
            neg = torch.zeros(num_priors, dtype=torch.bool, device=device)
            updated = {}
            for label in sorted(matches[i]):
                m, ov = matches[i][label]
                if self.mining_type == MAX_NEGATIVE:
                    eligible = (m == -1) & (ov < self.neg_overlap)
                    num_pos = (m > -1).sum().to(torch.float32)
                    limit = torch.floor(num_pos * self.neg_pos_ratio).to(torch.long)
                else:
                    eligible = torch.ones_like(m, dtype=torch.bool)
                    if self.sample_size <= 0:
                        self.fail("Check failed: sample_size > 0 (%d vs. 0)" % self.sample_size,
                                  "bbox_util.cpp:720")
                    limit = torch.full((), self.sample_size, dtype=torch.long, device=device)
                num_sel = torch.minimum(limit, eligible.sum())
                if self.has_nms_param and self.nms_threshold > 0:
                    sel = self._select_with_nms(i, label, loss[i], eligible, num_sel, priors,
                                                variances, loc_d)
                else:
                    key = torch.where(eligible, loss[i], torch.full_like(loss[i], -1.0))
                    order = torch.sort(key, descending=True, stable=True).indices
                    rank = torch.empty_like(order)
                    rank[order] = torch.arange(num_priors, device=device)
                    sel = eligible & (rank < num_sel)
                if self.mining_type == HARD_EXAMPLE:
                    m = torch.where((m > -1) & ~sel, torch.full_like(m, -1), m)
                neg = neg | ((m == -1) & sel)
                updated[label] = (m, ov)
            negs.append(neg)
            new_matches.append(updated)
        return negs, new_matches

    def _select_with_nms(self, i, label, loss, eligible, num_sel, priors, variances, loc_d):
        elig = torch.nonzero(eligible).reshape(-1)
        if self.use_prior_for_nms:
            boxes = priors[elig]
        else:
            col = 0 if self.share_location else label
            boxes = bu.decode_bboxes(priors, variances, self.code_type,
                                     self.encode_variance_in_target, loc_d[i, :, col],
                                     clip=False)[elig]
        keep = bu.apply_nms(boxes.cpu().numpy(), loss[elig].cpu().numpy(), self.nms_threshold,
                            self.nms_top_k)
        n = int(num_sel)
        if len(keep) < n:
            glog.info("not enough sample after nms: %d" % len(keep), where="bbox_util.cpp:765")
        chosen = elig[torch.tensor(keep[:min(len(keep), n)], dtype=torch.long,
                                   device=elig.device)]
        sel = torch.zeros_like(eligible)
        sel[chosen] = True
        return sel

    # ------------------------------------------------------------------ forward
    def forward(self, loc, conf, prior, gt):
        num = loc.shape[0]
        num_priors = _legacy_dims(tuple(prior.shape), self)[2] // 4
        C = self.num_classes
        device, dtype = loc.device, loc.dtype
        loc_v = loc.reshape(num, num_priors, self.loc_classes, 4)
        conf_v = conf.reshape(num, num_priors, C)
        with torch.no_grad():
            flat = prior.detach().reshape(-1)
            priors = flat[:num_priors * 4].reshape(num_priors, 4).to(dtype)
            variances = flat[num_priors * 4:num_priors * 8].reshape(num_priors, 4).to(dtype)
            gts = self._ground_truth(gt, device, dtype)
            loc_d = loc_v.detach()
            conf_d = conf_v.detach()
            matches = self._find_matches(num, gts, priors, variances, loc_d)
            self._check_matched_labels(matches)
            if self.do_neg_mining:
                negs, matches = self._mine(num, matches, gts, conf_d, priors, variances, loc_d)
            else:
                negs = None
            num_matches = torch.zeros((), dtype=torch.long, device=device)
            for i in range(num):
                for label in matches[i]:
                    num_matches = num_matches + (matches[i][label][0] > -1).sum()
        self.last_num_matches = num_matches
        self.last_num_negs = (sum(n.sum() for n in negs) if negs is not None else None)

        # Localization loss over the matched priors.
        loc_loss = loc.new_zeros(())
        for i in range(num):
            for label in sorted(matches[i]):
                m = matches[i][label][0]
                pred, enc, pos = self._matched_loc(i, label, m, priors, variances, gts[i][0],
                                                   loc_v, loc_d)
                err = self._loc_elementwise(pred - enc)
                loc_loss = loc_loss + torch.where(pos[:, None], err, torch.zeros_like(err)).sum()

        # Confidence loss.
        conf_loss = self._conf_loss(num, num_priors, conf_v, matches, negs, gts)

        normalizer = self._normalizer(num, num_priors, num_matches, dtype)
        # Empty sums keep the loss connected to both bottoms (zero diffs when nothing matched,
        # as Caffe writes them).
        total = loc.reshape(-1)[:0].sum() + conf.reshape(-1)[:0].sum()
        if self.propagate[0]:
            total = total + self.loc_weight * loc_loss / normalizer
        if len(self.propagate) > 1 and self.propagate[1]:
            total = total + conf_loss / normalizer
        return total

    def _normalizer(self, num, num_priors, num_matches, dtype):
        if self.normalization == VALID:
            return num_matches.to(dtype).clamp_min(1.0)
        if self.normalization == FULL:
            return float(max(1, num * num_priors))
        if self.normalization == BATCH_SIZE:
            return float(max(1, num))
        return 1.0

    def _gt_label(self, i, m, gts):
        if self.map_object_to_agnostic:
            return torch.full_like(m, self.background_label_id + 1)
        return gts[i][2][m.clamp(min=0)]

    def _conf_loss(self, num, num_priors, conf_v, matches, negs, gts):
        C = self.num_classes
        bg = self.background_label_id
        device = conf_v.device
        with torch.no_grad():
            if self.do_neg_mining:
                pos_any = torch.zeros((num, num_priors), dtype=torch.bool, device=device)
                target = torch.full((num, num_priors), bg, dtype=torch.long, device=device)
                for i in range(num):
                    if i not in gts:
                        continue
                    for label in sorted(matches[i]):
                        m = matches[i][label][0]
                        pos = m > -1
                        target[i] = torch.where(pos, self._gt_label(i, m, gts), target[i])
                        pos_any[i] |= pos
                neg_all = torch.stack(negs) if negs else pos_any
                has_gt = to_device_async(torch.tensor([i in gts for i in range(num)]),
                                         device)
                neg_all = neg_all & has_gt[:, None] & ~pos_any
                selected = pos_any | neg_all
            else:
                selected = None
                target = torch.full((num, num_priors), bg, dtype=torch.long, device=device)
                for i in range(num):
                    if i not in gts:
                        continue
                    for label in sorted(matches[i]):
                        m = matches[i][label][0]
                        target[i] = torch.where(m > -1, self._gt_label(i, m, gts), target[i])
        if self.conf_loss_type == SOFTMAX:
            lsm = torch.log_softmax(conf_v, dim=2)
            picked = torch.gather(lsm, 2, target[..., None])[..., 0]
            # SoftmaxWithLoss: -log(max(prob, FLT_MIN)); its gradient is prob - onehot even
            # where the clamp bites, hence the detached correction.
            value = picked.detach().clamp_min(math.log(bu.FLT_MIN))
            term = -(picked + (value - picked.detach()))
            if selected is not None:
                term = torch.where(selected, term, torch.zeros_like(term))
            return term.sum()
        # LOGISTIC (SigmoidCrossEntropyLoss over (1, num_conf, C): divided by num = 1).
        with torch.no_grad():
            if self.do_neg_mining:
                # Filled with the background id (SSD-Caffe's caffe_set), then 1 at the matched
                # label of positives and at the background entry of negatives (when it is a
                # class index).
                classes = torch.arange(C, device=device)
                t = torch.full((num, num_priors, C), float(bg), dtype=conf_v.dtype, device=device)
                hot = (classes == target[..., None]) & selected[..., None]
                t_rows = torch.where(hot, torch.ones_like(t), t)
            else:
                # SSD-Caffe advances its target pointer by P (not P*C) per image.
                flat_t = torch.full((num * num_priors * C,), float(bg), dtype=conf_v.dtype,
                                    device=device)
                for i in range(num):
                    if i not in gts:
                        continue
                    for label in sorted(matches[i]):
                        m = matches[i][label][0]
                        pos = torch.nonzero(m > -1).reshape(-1)
                        g = self._gt_label(i, m, gts)[pos]
                        flat_t[i * num_priors + pos * C + g] = 1.0
                t_rows = flat_t.reshape(num, num_priors, C)
        x = conf_v
        bce = torch.nn.functional.binary_cross_entropy_with_logits(x, t_rows, reduction="none")
        if selected is not None:
            bce = torch.where(selected[..., None], bce, torch.zeros_like(bce))
        return bce.sum()


# ============================================================================ DetectionOutput
@register("DetectionOutput")
class DetectionOutput(Layer):
    """SSD's DetectionOutput: decode, per-class NMS, keep_top_k; rows
    ``[image_id, label, score, xmin, ymin, xmax, ymax]`` in a ``(1, 1, K, 7)`` top.

    Reproduced from detection_output_layer.cpp (CPU path):

    * Decoding with ``code_type`` / ``variance_encoded_in_target``, not clipped;
      ``share_location`` false reads one box per class and prior.
    * Per image and class (background skipped): ApplyNMSFast with ``confidence_threshold``
      (strictly above; default: no threshold), ``nms_param.top_k`` (default all),
      ``nms_threshold`` (default 0.3) and ``eta``.
    * ``keep_top_k`` > -1: the highest-scoring ``keep_top_k`` detections of the image survive.
    * Rows by image, then label ascending, then score order. No detection at all gives one row
      ``[i, -1, -1, -1, -1, -1, -1]`` per image (and Caffe's "Couldn't find any detections").
    * The top's set-up shape is (1, 1, 1, 7), as Caffe's Reshape. No backward.
    * ``save_output_param`` (writing result files) and ``visualize`` are not supported: a
      warning names them and the rows are still produced.
    """

    min_bottoms = 3
    max_bottoms = 4
    exact_tops = 1
    never_backward = True

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        src = "detection_output_layer.cpp"
        p = param.detection_output_param
        if not p.HasField("num_classes"):
            self.fail("Must specify num_classes", src + ":18")
        self.num_classes = int(p.num_classes)
        self.share_location = p.share_location
        self.num_loc_classes = 1 if self.share_location else self.num_classes
        self.background_label_id = int(p.background_label_id)
        self.code_type = p.code_type
        if self.code_type not in (bu.CORNER, bu.CENTER_SIZE, bu.CORNER_SIZE):
            self.fail("Unknown code type %d" % self.code_type, src + ":24")
        self.variance_encoded_in_target = p.variance_encoded_in_target
        self.keep_top_k = int(p.keep_top_k)
        self.confidence_threshold = (bu.f32(p.confidence_threshold)
                                     if p.HasField("confidence_threshold") else -bu.FLT_MAX)
        self.nms_threshold = bu.f32(p.nms_param.nms_threshold)
        if self.nms_threshold < 0:
            self.fail("Check failed: nms_threshold_ >= 0. nms_threshold must be non negative.",
                      src + ":33")
        self.eta = bu.f32(p.nms_param.eta)
        if not 0 < self.eta <= 1:
            self.fail("Check failed: eta_ > 0. and eta_ <= 1. (eta %s)"
                      % glog.format_number(self.eta), src + ":35")
        self.top_k = int(p.nms_param.top_k) if p.nms_param.HasField("top_k") else -1
        so = p.save_output_param
        if so.output_directory:
            glog.warning("DetectionOutput %s: save_output_param (output_directory %s) is not "
                         "supported; detections are not written to files" % (
                             self.name, so.output_directory))
        if p.visualize:
            glog.warning("DetectionOutput %s: visualize is not supported; ignored" % self.name)
        shapes = self.bottom_shapes
        dl = _legacy_dims(shapes[0], self)
        dc = _legacy_dims(shapes[1], self)
        dp = _legacy_dims(shapes[2], self)
        if dl[0] != dc[0]:
            self.fail("Check failed: bottom[0]->num() == bottom[1]->num() (%d vs. %d)"
                      % (dl[0], dc[0]), src + ":166")
        num_priors = dp[2] // 4
        if num_priors * self.num_loc_classes * 4 != dl[1]:
            self.fail("Check failed: num_priors_ * num_loc_classes_ * 4 == bottom[0]->channels() "
                      "(%d vs. %d) Number of priors must match number of location predictions."
                      % (num_priors * self.num_loc_classes * 4, dl[1]), src + ":183")
        if num_priors * self.num_classes != dc[1]:
            self.fail("Check failed: num_priors_ * num_classes_ == bottom[1]->channels() "
                      "(%d vs. %d) Number of priors must match number of confidence predictions."
                      % (num_priors * self.num_classes, dc[1]), src + ":185")

    def top_shapes(self):
        return [(1, 1, 1, 7)]

    def detect(self, loc, conf, prior):
        """The rows as a float32 numpy array (K, 7)."""
        num = loc.shape[0]
        num_priors = _legacy_dims(tuple(prior.shape), self)[2] // 4
        C = self.num_classes
        L = self.num_loc_classes
        loc = loc.detach().to("cpu", torch.float32).reshape(num, num_priors, L, 4)
        conf = conf.detach().to("cpu", torch.float32).reshape(num, num_priors, C).numpy()
        flat = prior.detach().to("cpu", torch.float32).reshape(-1)
        priors = flat[:num_priors * 4].reshape(num_priors, 4)
        variances = flat[num_priors * 4:num_priors * 8].reshape(num_priors, 4)
        decoded = bu.decode_bboxes(priors[:, None, :], variances[:, None, :], self.code_type,
                                   self.variance_encoded_in_target, loc).numpy()
        rows = []
        for i in range(num):
            indices = {}
            num_det = 0
            for c in range(C):
                if c == self.background_label_id:
                    continue
                boxes = decoded[i, :, 0 if self.share_location else c]
                keep = bu.apply_nms_fast(boxes, conf[i, :, c], self.confidence_threshold,
                                         self.nms_threshold, self.eta, self.top_k)
                indices[c] = keep
                num_det += len(keep)
            if self.keep_top_k > -1 and num_det > self.keep_top_k:
                pairs = [(conf[i, idx, label], label, idx)
                         for label in sorted(indices) for idx in indices[label]]
                order = np.argsort(-np.asarray([p[0] for p in pairs], np.float64),
                                   kind="stable")[:self.keep_top_k]
                new = {}
                for k in order:
                    new.setdefault(pairs[k][1], []).append(pairs[k][2])
                indices = new
            for label in sorted(indices):
                col = 0 if self.share_location else label
                for idx in indices[label]:
                    b = decoded[i, idx, col]
                    rows.append([i, label, conf[i, idx, label], b[0], b[1], b[2], b[3]])
        if not rows:
            if not self.shape_inference:
                glog.info("Couldn't find any detections", where="detection_output_layer.cpp:313")
            out = np.full((num, 7), -1, np.float32)
            out[:, 0] = np.arange(num)
            return out
        return np.asarray(rows, np.float32).reshape(-1, 7)

    def forward(self, loc, conf, prior, *unused):
        rows = self.detect(loc, conf, prior)
        return torch.from_numpy(rows).reshape(1, 1, -1, 7).to(loc.device)


# ============================================================================ DetectionEvaluate
@register("DetectionEvaluate")
class DetectionEvaluate(Layer):
    """SSD's DetectionEvaluate: per-detection true/false positive rows for the solver's mAP.

    Bottoms: detections ``(1, 1, D, 7)`` (DetectionOutput) and ground truth ``(1, 1, G, 8)``.
    Top ``(1, 1, num_pos_classes + num_valid_det, 5)``: first, per non-background class,
    ``[-1, label, num_gt, -1, -1]`` (difficult boxes counted only with
    ``evaluate_difficult_gt``); then per image (ascending) and label (ascending) the detections
    sorted by score, ``[image, label, score, tp, fp]``: greedy matching to the highest-overlap
    ground truth of that label with overlap >= ``overlap_threshold``, a second match of the same
    box is a false positive, a match to a difficult box without ``evaluate_difficult_gt`` gives
    ``tp = fp = 0``. With ``name_size_file`` boxes are compared in pixels of each image's size
    (Caffe's OutputBBox, ``resize_param``). Use :func:`layers.bbox_util.detection_map` on the
    rows for the mAP the SSD solver logs.
    """

    exact_bottoms = 2
    exact_tops = 1
    never_backward = True

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        src = "detection_evaluate_layer.cpp"
        p = param.detection_evaluate_param
        if not p.HasField("num_classes"):
            self.fail("Must provide num_classes.", src + ":17")
        self.num_classes = int(p.num_classes)
        self.background_label_id = int(p.background_label_id)
        self.overlap_threshold = bu.f32(p.overlap_threshold)
        if not self.overlap_threshold > 0:
            self.fail("Check failed: overlap_threshold_ > 0. overlap_threshold must be non "
                      "negative.", src + ":22")
        self.evaluate_difficult_gt = p.evaluate_difficult_gt
        self.sizes = []
        if p.HasField("name_size_file"):
            path = p.name_size_file
            try:
                with open(path) as f:
                    tokens = f.read().split()
            except OSError:
                self.fail("Failed to open name size file: %s" % path, src + ":27")
            for k in range(0, len(tokens) - 2, 3):
                try:
                    self.sizes.append((int(tokens[k + 1]), int(tokens[k + 2])))
                except ValueError:
                    break
        self.count = 0
        self.use_normalized_bbox = len(self.sizes) == 0
        self.resize_param = p.resize_param if p.HasField("resize_param") else None
        for k, (s, w) in enumerate(zip(self.bottom_shapes, (7, 8))):
            d = _legacy_dims(s, self)
            if d[0] != 1 or d[1] != 1 or d[3] != w:
                self.fail("Check failed: bottom[%d] must be 1 x 1 x N x %d (got %s)"
                          % (k, w, " ".join(map(str, s))), src + ":55")
        self.num_pos_classes = (self.num_classes if self.background_label_id == -1
                                else self.num_classes - 1)

    def top_shapes(self):
        # Caffe's Reshape counts rows whose label is not -1; at set-up the detection blob holds
        # zeros, so every row counts.
        d = _legacy_dims(self.bottom_shapes[0], self)
        return [(1, 1, self.num_pos_classes + d[2], 5)]

    def _scaled(self, box, size):
        if self.use_normalized_bbox:
            return box, size
        if self.count >= len(self.sizes):
            self.fail("Check failed: count_ < sizes_.size() (%d vs. %d)"
                      % (self.count, len(self.sizes)), "detection_evaluate_layer.cpp:170")
        return bu.output_bbox(box, self.sizes[self.count], self.resize_param)

    def _overlap(self, a, sa, b, sb):
        """Caffe's JaccardOverlap with the boxes' stored sizes, in float32."""
        f = np.float32
        if b[0] > a[2] or b[2] < a[0] or b[1] > a[3] or b[3] < a[1]:
            inter = [f(0), f(0), f(0), f(0)]
        else:
            inter = [max(f(a[0]), f(b[0])), max(f(a[1]), f(b[1])),
                     min(f(a[2]), f(b[2])), min(f(a[3]), f(b[3]))]
        iw = f(inter[2] - inter[0])
        ih = f(inter[3] - inter[1])
        if not self.use_normalized_bbox:
            iw = f(iw + 1)
            ih = f(ih + 1)
        if iw > 0 and ih > 0:
            isz = f(iw * ih)
            return f(isz / f(f(f(sa) + f(sb)) - isz))
        return f(0)

    def evaluate(self, det, gt):
        det = det.detach().to("cpu", torch.float32).reshape(-1).numpy()
        gt = gt.detach().to("cpu", torch.float32).reshape(-1).numpy()
        n_det = det.size // 7
        n_gt = gt.size // 8
        det = det[:n_det * 7].reshape(n_det, 7)
        gt = gt[:n_gt * 8].reshape(n_gt, 8)
        bg = self.background_label_id
        detections = {}
        for r in det:
            item = int(r[0])
            if item == -1:
                continue
            label = int(r[1])
            if label == bg:
                raise CaffeError("Check failed: background_label_id != label (%d vs. %d) Found "
                                 "background label in the detection results. (layer %s)"
                                 % (bg, label, self.name), where="bbox_util.cpp:1307")
            box = [float(v) for v in r[3:7]]
            detections.setdefault(item, {}).setdefault(label, []).append(
                (float(r[2]), box, float(bu._size_of(box))))
        gts = {}
        for r in gt:
            item = int(r[0])
            if item == -1:
                break
            label = int(r[1])
            if label == bg:
                raise CaffeError("Check failed: background_label_id != label (%d vs. %d) Found "
                                 "background label in the dataset. (layer %s)"
                                 % (bg, label, self.name), where="bbox_util.cpp:833")
            box = [float(v) for v in r[3:7]]
            gts.setdefault(item, {}).setdefault(label, []).append(
                (box, float(bu._size_of(box)), bool(r[7])))
        num_valid = int(sum(1 for r in det if r[1] != -1))
        out = np.zeros((self.num_pos_classes + num_valid, 5), np.float32)
        num_pos = {}
        for item in gts.values():
            for label, boxes in item.items():
                n = len(boxes) if self.evaluate_difficult_gt else sum(1 for b in boxes
                                                                       if not b[2])
                num_pos[label] = num_pos.get(label, 0) + n
        k = 0
        for c in range(self.num_classes):
            if c == bg:
                continue
            out[k] = [-1, c, num_pos.get(c, 0), -1, -1]
            k += 1
        for image in sorted(detections):
            for label in sorted(detections[image]):
                if label == -1:
                    continue
                dets = detections[image][label]
                label_gts = gts.get(image, {}).get(label)
                if label_gts is None:
                    for score, _, _ in dets:
                        out[k] = [image, label, score, 0, 1]
                        k += 1
                    continue
                scaled_gts = [self._scaled(b, s) + (d,) for b, s, d in label_gts]
                visited = [False] * len(scaled_gts)
                order = np.argsort(-np.asarray([d[0] for d in dets], np.float64), kind="stable")
                for o in order:
                    score, box, size = dets[o]
                    out[k, 0:3] = [image, label, score]
                    box, size = self._scaled(box, size)
                    best, jmax = np.float32(-1), -1
                    for j, (gb, gs, _) in enumerate(scaled_gts):
                        ov = self._overlap(box, size, gb, gs)
                        if ov > best:
                            best, jmax = ov, j
                    if best >= np.float32(self.overlap_threshold):
                        if self.evaluate_difficult_gt or not scaled_gts[jmax][2]:
                            if not visited[jmax]:
                                out[k, 3:5] = [1, 0]
                                visited[jmax] = True
                            else:
                                out[k, 3:5] = [0, 1]
                    else:
                        out[k, 3:5] = [0, 1]
                    k += 1
            if self.sizes and not self.shape_inference:
                self.count += 1
                if self.count == len(self.sizes):
                    self.count = 0
        return out

    def forward(self, det, gt):
        rows = self.evaluate(det, gt)
        return torch.from_numpy(rows).reshape(1, 1, -1, 5).to(det.device)
