"""Box arithmetic of SSD-Caffe (``src/caffe/util/bbox_util.cpp``), vectorised.

Everything here reproduces SSD-Caffe's float32 arithmetic in the same order of operations, so
that overlaps, encodings and decodings agree with Caffe to the last bit or so; the decisions that
depend on them (matching thresholds, NMS, mining order) then agree too. Boxes are ``(..., 4)``
tensors ``[xmin, ymin, xmax, ymax]``.

The functions that run inside training (overlaps, matching, encoding, decoding) are torch ops on
whatever device the inputs live on and never synchronise with it. NMS and the detection
evaluation are inherently sequential and small; they run on the CPU with numpy, as SSD-Caffe's
CPU path does.

Facts reproduced (from SSD-Caffe's sources):

* ``BBoxSize``: 0 for an invalid box (``xmax < xmin`` or ``ymax < ymin``), else ``w * h``
  (``(w + 1) * (h + 1)`` for unnormalised pixel boxes).
* ``JaccardOverlap``: 0 unless the intersection has positive width and height, else
  ``inter / (size1 + size2 - inter)``; unnormalised boxes add 1 to the intersection sides.
* ``MatchBBox``: only overlaps > 1e-6 count; a greedy bipartite pass (the globally largest
  overlap first, ties to the lowest prediction then the lowest ground-truth index) gives every
  ground truth one prediction; PER_PREDICTION then gives every remaining prediction its best
  ground truth with overlap >= ``overlap_threshold``. Predictions crossing the image boundary
  get -2 when ``ignore_cross_boundary_bbox`` is set.
* Encode / decode for CORNER, CENTER_SIZE and CORNER_SIZE, with the variance either divided into
  the target (``encode_variance_in_target`` false) or left to the caller.
* ``ApplyNMSFast`` (DetectionOutput: strict score threshold, stable sort, ``top_k`` before NMS,
  a box is kept when its overlap with every kept box is <= the (adaptive, ``eta``) threshold) and
  the older ``ApplyNMS`` (hard-example mining: boxes smaller than 1e-5 dropped, stops at
  ``top_k`` kept boxes).
* ``ComputeAP`` with ``11point``, ``MaxIntegral`` and ``Integral``, and the solver's mAP over
  DetectionEvaluate rows (``Solver::TestDetection``).
"""

import numpy as np
import torch

from converters.errors import CaffeError

# PriorBoxParameter.CodeType
CORNER, CENTER_SIZE, CORNER_SIZE = 1, 2, 3
# MultiBoxLossParameter.MatchType
BIPARTITE, PER_PREDICTION = 0, 1

FLT_MIN = float(np.finfo(np.float32).tiny)
FLT_MAX = float(np.finfo(np.float32).max)


def f32(x):
    """A Python float rounded to float32 (a proto ``float`` field is already one)."""
    return float(np.float32(x))


# ----------------------------------------------------------------------------- sizes, overlaps
def bbox_size(boxes, normalized=True):
    """Caffe's BBoxSize for every box of a ``(..., 4)`` tensor."""
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    if normalized:
        size = w * h
    else:
        size = (w + 1) * (h + 1)
    invalid = (boxes[..., 2] < boxes[..., 0]) | (boxes[..., 3] < boxes[..., 1])
    return torch.where(invalid, torch.zeros_like(size), size)


def jaccard_overlap(a, b, normalized=True):
    """Pairwise Caffe JaccardOverlap: ``a`` (A, 4), ``b`` (B, 4) -> (A, B).

    For normalised boxes Caffe's separate "disjoint -> empty intersection" case needs no test:
    disjoint boxes give a non-positive intersection side, hence overlap 0, either way. For pixel
    boxes (``normalized=False``) it matters: Caffe's empty intersection then has sides 0 + 1.
    """
    ax0, ay0, ax1, ay1 = (a[:, k:k + 1] for k in range(4))
    bx0, by0, bx1, by1 = (b[None, :, k] for k in range(4))
    iw = torch.minimum(ax1, bx1)
    iw -= torch.maximum(ax0, bx0)
    ih = torch.minimum(ay1, by1)
    ih -= torch.maximum(ay0, by0)
    if not normalized:
        disjoint = (bx0 > ax1) | (bx1 < ax0) | (by0 > ay1) | (by1 < ay0)
        iw = torch.where(disjoint, torch.zeros_like(iw), iw) + 1
        ih = torch.where(disjoint, torch.zeros_like(ih), ih) + 1
    inter = iw * ih
    # BBoxSize here is the default (normalized) one, as in Caffe's JaccardOverlap.
    sa = bbox_size(a)[:, None]
    sb = bbox_size(b)[None, :]
    union = sa + sb
    union -= inter
    ov = inter / union
    return ov.masked_fill_(~((iw > 0) & (ih > 0)), 0.0)


def np_overlap_matrix(a, b):
    """Pairwise JaccardOverlap of normalised boxes in float32 numpy (Caffe's arithmetic)."""
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = iw * ih
    union = (_np_size(a)[:, None] + _np_size(b)[None, :]) - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        ov = inter / union
    ov[~((iw > 0) & (ih > 0))] = 0
    return ov


def is_cross_boundary(boxes):
    """Caffe's IsCrossBoundaryBBox: any coordinate outside [0, 1]."""
    return ((boxes < 0) | (boxes > 1)).any(dim=-1)


def clip_bboxes(boxes):
    return boxes.clamp(0.0, 1.0)


# ----------------------------------------------------------------------------- encode / decode
def _check_code_type(code_type):
    if code_type not in (CORNER, CENTER_SIZE, CORNER_SIZE):
        raise CaffeError("Unknown LocLossType.", where="bbox_util.cpp:403")


def encode_bboxes(priors, variances, code_type, encode_variance_in_target, gts):
    """Caffe's EncodeBBox, elementwise over broadcastable ``(..., 4)`` tensors."""
    _check_code_type(code_type)
    px0, py0, px1, py1 = priors.unbind(-1)
    gx0, gy0, gx1, gy1 = gts.unbind(-1)
    if code_type == CORNER:
        out = torch.stack([gx0 - px0, gy0 - py0, gx1 - px1, gy1 - py1], -1)
        if not encode_variance_in_target:
            out = out / variances
        return out
    pw = px1 - px0
    ph = py1 - py0
    if code_type == CENTER_SIZE:
        pcx = (px0 + px1) / 2
        pcy = (py0 + py1) / 2
        gw = gx1 - gx0
        gh = gy1 - gy0
        gcx = (gx0 + gx1) / 2
        gcy = (gy0 + gy1) / 2
        if encode_variance_in_target:
            return torch.stack([(gcx - pcx) / pw, (gcy - pcy) / ph,
                                torch.log(gw / pw), torch.log(gh / ph)], -1)
        v0, v1, v2, v3 = variances.unbind(-1)
        return torch.stack([(gcx - pcx) / pw / v0, (gcy - pcy) / ph / v1,
                            torch.log(gw / pw) / v2, torch.log(gh / ph) / v3], -1)
    # CORNER_SIZE
    if encode_variance_in_target:
        return torch.stack([(gx0 - px0) / pw, (gy0 - py0) / ph,
                            (gx1 - px1) / pw, (gy1 - py1) / ph], -1)
    v0, v1, v2, v3 = variances.unbind(-1)
    return torch.stack([(gx0 - px0) / pw / v0, (gy0 - py0) / ph / v1,
                        (gx1 - px1) / pw / v2, (gy1 - py1) / ph / v3], -1)


def decode_bboxes(priors, variances, code_type, variance_encoded_in_target, locs, clip=False):
    """Caffe's DecodeBBox, elementwise over broadcastable ``(..., 4)`` tensors."""
    _check_code_type(code_type)
    px0, py0, px1, py1 = priors.unbind(-1)
    l0, l1, l2, l3 = locs.unbind(-1)
    if variance_encoded_in_target:
        v0 = v1 = v2 = v3 = None
    else:
        v0, v1, v2, v3 = variances.unbind(-1)
    if code_type == CORNER:
        if variance_encoded_in_target:
            out = torch.stack([px0 + l0, py0 + l1, px1 + l2, py1 + l3], -1)
        else:
            out = torch.stack([px0 + v0 * l0, py0 + v1 * l1, px1 + v2 * l2, py1 + v3 * l3], -1)
    elif code_type == CENTER_SIZE:
        pw = px1 - px0
        ph = py1 - py0
        pcx = (px0 + px1) / 2
        pcy = (py0 + py1) / 2
        if variance_encoded_in_target:
            cx = l0 * pw + pcx
            cy = l1 * ph + pcy
            w = torch.exp(l2) * pw
            h = torch.exp(l3) * ph
        else:
            cx = v0 * l0 * pw + pcx
            cy = v1 * l1 * ph + pcy
            w = torch.exp(v2 * l2) * pw
            h = torch.exp(v3 * l3) * ph
        out = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
    else:  # CORNER_SIZE
        pw = px1 - px0
        ph = py1 - py0
        if variance_encoded_in_target:
            out = torch.stack([px0 + l0 * pw, py0 + l1 * ph, px1 + l2 * pw, py1 + l3 * ph], -1)
        else:
            out = torch.stack([px0 + v0 * l0 * pw, py0 + v1 * l1 * ph,
                               px1 + v2 * l2 * pw, py1 + v3 * l3 * ph], -1)
    if clip:
        out = clip_bboxes(out)
    return out


# ----------------------------------------------------------------------------- matching
def match_bboxes(gts, preds, match_type, overlap_threshold, ignore_cross_boundary=False):
    """Caffe's MatchBBox of predictions (P, 4) against ground truth (G, 4).

    Returns ``(indices, overlaps)``: ``indices`` (P,) int64 with the matched ground-truth row,
    -1 (unmatched) or -2 (ignored cross-boundary prediction); ``overlaps`` (P,) the best
    overlap > 1e-6 of every prediction (the matched one for bipartite matches), else 0.
    Runs on the inputs' device without synchronising.
    """
    num_pred = preds.shape[0]
    num_gt = gts.shape[0]
    device = preds.device
    indices = torch.full((num_pred,), -1, dtype=torch.long, device=device)
    overlaps = torch.zeros((num_pred,), dtype=preds.dtype, device=device)
    if num_gt == 0 or num_pred == 0:
        return indices, overlaps
    ov = jaccard_overlap(preds, gts)
    stored = ov > 1e-6
    if ignore_cross_boundary:
        cross = is_cross_boundary(preds)
        indices = torch.where(cross, torch.full_like(indices, -2), indices)
        stored = stored & ~cross[:, None]
    neg_one = torch.full_like(ov, -1.0)
    overlaps = torch.where(stored, ov, torch.zeros_like(ov)).max(dim=1).values
    cand = torch.where(stored, ov, neg_one)

    # Greedy bipartite matching: each round takes the largest remaining (prediction, gt) pair;
    # argmax over the row-major flattening gives Caffe's tie order (lowest prediction, then
    # lowest gt). Rounds after the candidates run out change nothing.
    gt_free = torch.ones((num_gt,), dtype=torch.bool, device=device)
    rows = torch.arange(num_pred, device=device)
    for _ in range(num_gt):
        avail = (indices == -1)[:, None] & gt_free[None, :]
        masked = torch.where(avail, cand, neg_one).reshape(-1)
        best = torch.argmax(masked)
        val = masked[best]
        pi = best // num_gt
        gi = best % num_gt
        ok = val > -1
        hit = (rows == pi) & ok
        indices = torch.where(hit, gi, indices)
        overlaps = torch.where(hit, val, overlaps)
        gt_free = gt_free & ~((torch.arange(num_gt, device=device) == gi) & ok)

    if match_type == PER_PREDICTION:
        thr = float(np.float32(overlap_threshold))    # a scalar: no host-to-GPU copy
        good = torch.where(stored & (ov >= thr), ov, neg_one)
        best_val, best_gt = good.max(dim=1)
        # torch.max(dim) returns the first maximal index, as Caffe's strict '>' scan does.
        take = (indices == -1) & (best_val > -1)
        indices = torch.where(take, best_gt, indices)
        overlaps = torch.where(take, best_val, overlaps)
    elif match_type != BIPARTITE:
        raise CaffeError("Unknown matching type.", where="bbox_util.cpp:640")
    return indices, overlaps


# ----------------------------------------------------------------------------- NMS (CPU, numpy)
def _np_size(b):
    w = b[:, 2] - b[:, 0]
    h = b[:, 3] - b[:, 1]
    s = (w * h).astype(np.float32)
    s[(b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])] = 0
    return s


def np_jaccard(a, b):
    """Pairwise JaccardOverlap in float32 numpy (same arithmetic as :func:`jaccard_overlap`)."""
    return np_overlap_matrix(a, b)


def _sort_desc(scores, indices):
    """Stable descending sort of (score, index) pairs (std::stable_sort, SortScorePairDescend)."""
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    return [indices[k] for k in order]


def apply_nms_fast(boxes, scores, score_threshold, nms_threshold, eta, top_k):
    """Caffe's ApplyNMSFast on numpy ``boxes`` (K, 4) and ``scores`` (K,); returns kept indices.

    Candidates: scores strictly above ``score_threshold``, stably sorted descending, the first
    ``top_k`` (when ``top_k > -1``). A candidate is kept when its overlap with every kept box is
    at most the adaptive threshold, which is multiplied by ``eta`` after each kept box while it
    is above 0.5 (``eta < 1``).
    """
    scores = np.asarray(scores, np.float32)
    cand = np.nonzero(scores > np.float32(score_threshold))[0]
    cand = cand[np.argsort(-scores[cand].astype(np.float64), kind="stable")]
    if top_k > -1 and top_k < len(cand):
        cand = cand[:top_k]
    if len(cand) == 0:
        return []
    boxes = np.asarray(boxes, np.float32)[cand]
    ov = np_overlap_matrix(boxes, boxes)
    adaptive = np.float32(nms_threshold)
    if eta >= 1:
        # Same decisions as Caffe's loop: a candidate survives iff no kept box overlaps it by
        # more than the threshold.
        suppress = ov > adaptive
        alive = np.ones(len(cand), bool)
        kept = []
        for k in range(len(cand)):
            if alive[k]:
                kept.append(k)
                alive[k + 1:] &= ~suppress[k, k + 1:]
        return [int(cand[k]) for k in kept]
    kept = []
    for k in range(len(cand)):
        if not kept or bool(np.all(ov[k, kept] <= adaptive)):
            kept.append(k)
            if adaptive > 0.5:
                adaptive = np.float32(adaptive * np.float32(eta))
    return [int(cand[k]) for k in kept]


def apply_nms(boxes, scores, threshold, top_k):
    """Caffe's (older) ApplyNMS, used by hard-example mining; returns indices into ``boxes``.

    Stable descending sort, the first ``top_k`` (when ``top_k > -1``; note that 0 keeps none,
    as in Caffe), boxes with BBoxSize < 1e-5 dropped, overlaps strictly above ``threshold``
    suppressed, stops once ``top_k`` boxes are kept.
    """
    boxes = np.asarray(boxes, np.float32)
    scores = np.asarray(scores, np.float32)
    order = list(np.argsort(-scores.astype(np.float64), kind="stable"))
    if top_k > -1 and top_k < len(order):
        order = order[:top_k]
    if not order:
        return []
    sizes = _np_size(boxes)
    ov = np_jaccard(boxes, boxes)
    out = []
    while order:
        best = order.pop(0)
        if sizes[best] < 1e-5:
            continue
        out.append(int(best))
        if top_k > -1 and len(out) >= top_k:
            break
        order = [k for k in order if not (sizes[k] < 1e-5 or ov[best, k] > np.float32(threshold))]
    return out


# ----------------------------------------------------------------------------- evaluation
def output_bbox(box, img_size, resize_param=None):
    """Caffe's OutputBBox: a normalised box to pixels of an image of ``img_size`` (h, w).

    Returns ``(box, size)`` where size follows ScaleBBox's BBoxSize rule. ``resize_param`` is a
    ResizeParameter when the evaluation was given one.
    """
    height, width = img_size

    def clip(b):
        return [min(max(v, 0.0), 1.0) for v in b]

    def scale(b, h, w):
        out = [f32(b[0] * w), f32(b[1] * h), f32(b[2] * w), f32(b[3] * h)]
        normalized = not (w > 1 or h > 1)
        return out, _size_of(out, normalized)

    def clip_hw(b, h, w):
        return [max(min(b[0], w), 0.0), max(min(b[1], h), 0.0),
                max(min(b[2], w), 0.0), max(min(b[3], h), 0.0)]

    b = [f32(v) for v in box]
    mode = resize_param.resize_mode if resize_param is not None else 0
    if resize_param is None or not mode:
        return scale(clip(b), height, width)
    rh, rw = float(resize_param.height), float(resize_param.width)
    if rh <= 0 or rw <= 0:
        raise CaffeError("Check failed: resize_height > 0 and resize_width > 0",
                         where="bbox_util.cpp:161")
    if mode == 1:  # WARP
        return scale(clip(b), height, width)
    if mode == 3:  # FIT_LARGE_SIZE_AND_PAD
        resize_aspect = f32(rw / rh)
        aspect = f32(float(width) / height)
        if aspect > resize_aspect:
            padding = f32((rh - rw / aspect) / 2)
            src = [0.0, f32(padding / rh), 1.0, f32(1.0 - padding / rh)]
        else:
            padding = f32((rw - rh * aspect) / 2)
            src = [f32(padding / rw), 0.0, f32(1.0 - padding / rw), 1.0]
        projected = _project_bbox(src, b)
        if projected is not None:
            b = projected
        return scale(clip(b), height, width)
    if mode == 2:  # FIT_SMALL_SIZE
        hs, ws = resize_param.height_scale, resize_param.width_scale
        if hs == 0 or ws == 0:
            return scale(clip(b), height, width)
        out, _ = scale(b, hs, ws)
        out = clip_hw(out, float(height), float(width))
        return out, _size_of(out, True)
    raise CaffeError("Unknown resize mode.", where="bbox_util.cpp:199")


def _size_of(b, normalized=True):
    w, h = b[2] - b[0], b[3] - b[1]
    if b[2] < b[0] or b[3] < b[1]:
        return 0.0
    return f32(w * h) if normalized else f32((w + 1) * (h + 1))


def _project_bbox(src, b):
    if b[0] >= src[2] or b[2] <= src[0] or b[1] >= src[3] or b[3] <= src[1]:
        return None
    sw, sh = src[2] - src[0], src[3] - src[1]
    out = [(b[0] - src[0]) / sw, (b[1] - src[1]) / sh, (b[2] - src[0]) / sw, (b[3] - src[1]) / sh]
    return [min(max(f32(v), 0.0), 1.0) for v in out]


def _cumsum(pairs):
    """Caffe's CumSum: stable descending sort by score, running sum of the flags."""
    if not pairs:
        return []
    order = np.argsort(-np.asarray([p[0] for p in pairs], np.float64), kind="stable")
    return list(np.cumsum([pairs[k][1] for k in order]))


def compute_ap(tp, num_pos, fp, ap_version="Integral"):
    """Caffe's ComputeAP: ``tp``/``fp`` lists of (score, flag); returns (prec, rec, ap).

    ``ap_version``: ``"11point"`` (VOC2007), ``"MaxIntegral"`` (VOC2012 / ILSVRC) or
    ``"Integral"`` (natural integral). Arithmetic in float32 as in Caffe.
    """
    eps = np.float32(1e-6)
    if len(tp) != len(fp):
        raise CaffeError("tp must have same size as fp.", where="bbox_util.cpp:1580")
    for (ts, tf), (fs, ff) in zip(tp, fp):
        if abs(np.float32(ts) - np.float32(fs)) > eps or tf != 1 - ff:
            raise CaffeError("Check failed: tp and fp must hold complementary entries",
                             where="bbox_util.cpp:1585")
    if ap_version not in ("11point", "MaxIntegral", "Integral"):
        raise CaffeError("Unknown ap_version: %s" % ap_version, where="bbox_util.cpp:1650")
    prec, rec = [], []
    ap = np.float32(0)
    num = len(tp)
    if num == 0 or num_pos == 0:
        return prec, rec, float(ap)
    tp_cum = _cumsum(tp)
    fp_cum = _cumsum(fp)
    for i in range(num):
        prec.append(np.float32(np.float32(tp_cum[i]) / np.float32(tp_cum[i] + fp_cum[i])))
    for i in range(num):
        if tp_cum[i] > num_pos:
            raise CaffeError("Check failed: tp_cumsum[i] <= num_pos (%d vs. %d)"
                             % (tp_cum[i], num_pos), where="bbox_util.cpp:1608")
        rec.append(np.float32(np.float32(tp_cum[i]) / np.float32(num_pos)))
    if ap_version == "11point":
        max_precs = [np.float32(0)] * 11
        start = num - 1
        for j in range(10, -1, -1):
            for i in range(start, -1, -1):
                if rec[i] < j / 10.0:
                    start = i
                    if j > 0:
                        max_precs[j - 1] = max_precs[j]
                    break
                if max_precs[j] < prec[i]:
                    max_precs[j] = prec[i]
        for j in range(10, -1, -1):
            ap = np.float32(ap + np.float32(max_precs[j] / np.float32(11)))
    elif ap_version == "MaxIntegral":
        cur_rec = rec[-1]
        cur_prec = prec[-1]
        for i in range(num - 2, -1, -1):
            cur_prec = max(prec[i], cur_prec)
            if abs(cur_rec - rec[i]) > eps:
                ap = np.float32(ap + np.float32(cur_prec * abs(cur_rec - rec[i])))
            cur_rec = rec[i]
        ap = np.float32(ap + np.float32(cur_rec * cur_prec))
    else:  # Integral
        prev_rec = np.float32(0)
        for i in range(num):
            if abs(rec[i] - prev_rec) > eps:
                ap = np.float32(ap + np.float32(prec[i] * abs(rec[i] - prev_rec)))
            prev_rec = rec[i]
    return [float(p) for p in prec], [float(r) for r in rec], float(ap)


class DetectionEvalAccumulator:
    """The solver's mAP over DetectionEvaluate rows (SSD-Caffe ``Solver::TestDetection``).

    Feed every test iteration's rows of one output blob with :meth:`add`; :meth:`compute`
    returns ``(mAP, {label: AP}, warnings)``. Rows ``[-1, label, num_pos, -1, -1]`` count ground
    truth, other rows ``[image, label, score, tp, fp]`` are detections (rows with tp == fp == 0,
    detections matched to an ignored difficult box, are skipped). The mean is over every label
    that has a ground-truth count row (including labels with 0 boxes); a label without any
    detection contributes no AP but still counts, with a warning "Missing true_pos for label: N"
    as Caffe logs (solver.cpp).
    """

    def __init__(self):
        self.true_pos = {}
        self.false_pos = {}
        self.num_pos = {}

    def add(self, rows):
        rows = np.asarray(rows, np.float32).reshape(-1, 5)
        for r in rows:
            item, label = int(r[0]), int(r[1])
            if item == -1:
                self.num_pos[label] = self.num_pos.get(label, 0) + int(r[2])
                continue
            tp, fp = int(r[3]), int(r[4])
            if tp == 0 and fp == 0:
                continue
            self.true_pos.setdefault(label, []).append((float(r[2]), tp))
            self.false_pos.setdefault(label, []).append((float(r[2]), fp))

    def compute(self, ap_version="Integral"):
        aps, warnings = {}, []
        total = np.float32(0)
        for label in sorted(self.num_pos):
            if label not in self.true_pos:
                warnings.append("Missing true_pos for label: %d" % label)
                continue
            _, _, ap = compute_ap(self.true_pos[label], self.num_pos[label],
                                  self.false_pos[label], ap_version)
            aps[label] = ap
            total = np.float32(total + np.float32(ap))
        if not self.num_pos:
            return float("nan"), aps, warnings
        return float(np.float32(total / np.float32(len(self.num_pos)))), aps, warnings


def detection_map(row_batches, ap_version="Integral"):
    """mAP of a list of DetectionEvaluate outputs (one per test iteration) for one blob."""
    acc = DetectionEvalAccumulator()
    for rows in row_batches:
        acc.add(rows)
    return acc.compute(ap_version)

