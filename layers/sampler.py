"""SSD-Caffe's box sampling and the per-image AnnotatedData pipeline, in numpy (no torch).

This module holds what ``sampler.cpp``, the normalized-box part of ``bbox_util.cpp`` and the
annotated half of SSD's ``data_transformer.cpp`` do to one AnnotatedDatum, so that worker
processes can run it without importing torch:

1. decode the image (BGR; ``force_color``/``force_gray`` as the transformer);
2. ``distort_param``: brightness / contrast / saturation / hue / channel order, in one of SSD's
   two orders (coin flip), each with its own probability (``ApplyDistort``);
3. ``expand_param``: with probability ``prob``, place the image at a random spot of a canvas
   ``ratio`` times larger (``ratio`` uniform in [1, max_expand_ratio]) filled with the
   ``mean_value`` (``ExpandImage``);
4. ``batch_sampler``: for each sampler, ``max_trials`` random boxes (scale, aspect ratio), kept
   while they meet ``sample_constraint``, at most ``max_sample`` of them; one of all kept boxes
   is picked uniformly and the image cropped to it (``GenerateBatchSamples``, ``CropImage``);
5. the transform: ``resize_param`` (mode and a random ``interp_mode``), ``noise_param``,
   ``crop_size``/``crop_h``/``crop_w``, mirror (probability 1/2 when ``mirror``); the boxes
   follow each step (``TransformAnnotation``: resize policy, ``emit_constraint``, projection
   into the crop window, clipping to [0, 1], mirror) and boxes that leave the window are dropped.

Box arithmetic is float32 in Caffe's operation order, so a box that goes through the same steps
gives the same floats as Caffe. Facts of SSD-Caffe reproduced on purpose:

* After distortion, expansion and cropping of an *encoded* datum, Caffe stores the image as a
  JPEG (``EncodeCVMatToDatum(img, "jpg")``, quality 95) and decodes it again for the next step;
  the same happens here (``jpeg_roundtrip=True``, the default; set
  ``TRAINER_SSD_JPEG_ROUNDTRIP=0`` to skip the re-encoding, which is faster and not Caffe).
  Raw (non-encoded) datums are not distorted (Caffe logs "Only support encoded datum now") and
  are expanded onto a canvas of byte 32 (Caffe fills the raw buffer with ' '), not the mean.
* ``SatisfySampleConstraint`` only looks at the first constraint family that is set (jaccard,
  else sample coverage, else object coverage): in Caffe's loop ``found`` becomes true as soon as
  an object passes the first family and is never reset.
* ``SampleBBox`` can give a width or height of 1 + 1 ulp (scale near 1, aspect ratio clamped to
  1/scale^2); stock SSD-Caffe then aborts in ``caffe_rng_uniform`` ("Check failed: a <= b (0 vs.
  -1.19209e-07)", refs/ssd/annotated_data/stock_random_ssd_abort_glog.txt). Here the width and
  height are clamped to 1 (what the reference build does) and a warning is reported once.

Random numbers come from a numpy generator seeded per item (the layer's seed and the item's
running number), not from Caffe's boost generator: outputs are deterministic for a seed and
independent of worker scheduling, but not Caffe's numbers.
"""
import math
import os

import numpy as np

from converters.errors import CaffeError
from layers import image_ops

F32 = np.float32
FLT_MAX = float(np.finfo(np.float32).max)

# ResizeParameter enums (caffe.proto, SSD).
WARP, FIT_SMALL_SIZE, FIT_LARGE_SIZE_AND_PAD = 1, 2, 3
PAD_CONSTANT, PAD_MIRRORED, PAD_REPEAT_NEAREST = 1, 2, 3
_INTERP = {1: image_ops.INTER_LINEAR, 2: image_ops.INTER_AREA, 3: image_ops.INTER_NEAREST,
           4: image_ops.INTER_CUBIC, 5: image_ops.INTER_LANCZOS4}
_PAD = {PAD_CONSTANT: image_ops.BORDER_CONSTANT, PAD_MIRRORED: image_ops.BORDER_REFLECT101,
        PAD_REPEAT_NEAREST: image_ops.BORDER_REPLICATE}
EMIT_CENTER, EMIT_MIN_OVERLAP = 0, 1


def jpeg_roundtrip_default():
    return os.environ.get("TRAINER_SSD_JPEG_ROUNDTRIP", "1").lower() not in ("0", "false", "no")


# ----------------------------------------------------------------------------- annotations
class Annotations:
    """Boxes of one image in Caffe's order (groups, then annotations), flattened.

    ``meta``: int64 (K, 3) ``[group_label, instance_id, difficult]``; ``boxes``: float32 (K, 4)
    ``[xmin, ymin, xmax, ymax]`` (normalized)."""

    __slots__ = ("meta", "boxes")

    def __init__(self, meta, boxes):
        self.meta = np.asarray(meta, dtype=np.int64).reshape(-1, 3)
        self.boxes = np.asarray(boxes, dtype=F32).reshape(-1, 4)

    @classmethod
    def from_datum(cls, anno_datum):
        meta, boxes = [], []
        for g in anno_datum.annotation_group:
            for a in g.annotation:
                b = a.bbox
                meta.append((g.group_label, a.instance_id, int(bool(b.difficult))))
                boxes.append((b.xmin, b.ymin, b.xmax, b.ymax))
        return cls(meta, boxes)

    def __len__(self):
        return self.boxes.shape[0]

    def select(self, mask, boxes=None):
        boxes = self.boxes if boxes is None else boxes
        return Annotations(self.meta[mask], boxes[mask])

    def rows(self, item_id):
        """The label rows ``[item_id, group_label, instance_id, xmin, ymin, xmax, ymax,
        difficult]`` (float32, K x 8)."""
        k = len(self)
        out = np.empty((k, 8), dtype=F32)
        out[:, 0] = item_id
        out[:, 1:3] = self.meta[:, :2]
        out[:, 3:7] = self.boxes
        out[:, 7] = self.meta[:, 2]
        return out


# ----------------------------------------------------------------------------- box math
def _split(b):
    b = np.asarray(b, dtype=F32)
    return b[..., 0], b[..., 1], b[..., 2], b[..., 3]


def bbox_size(b):
    """BBoxSize (normalized): 0 for an inverted box, else width * height (float32)."""
    x0, y0, x1, y1 = _split(b)
    size = ((x1 - x0) * (y1 - y0)).astype(F32)
    return np.where((x1 < x0) | (y1 < y0), F32(0), size).astype(F32)


def intersect_bbox(b1, b2):
    """IntersectBBox (broadcasting): [0, 0, 0, 0] where the boxes do not touch."""
    a0, a1, a2, a3 = _split(b1)
    c0, c1, c2, c3 = _split(b2)
    apart = (c0 > a2) | (c2 < a0) | (c1 > a3) | (c3 < a1)
    out = np.stack(np.broadcast_arrays(np.maximum(a0, c0), np.maximum(a1, c1),
                                       np.minimum(a2, c2), np.minimum(a3, c3)), axis=-1)
    return np.where(apart[..., None], F32(0), out).astype(F32)


def jaccard_overlap(b1, b2):
    """JaccardOverlap (normalized), float32 in Caffe's order."""
    inter = intersect_bbox(b1, b2)
    iw = (inter[..., 2] - inter[..., 0]).astype(F32)
    ih = (inter[..., 3] - inter[..., 1]).astype(F32)
    isize = (iw * ih).astype(F32)
    s1, s2 = bbox_size(b1), bbox_size(b2)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (isize / ((s1 + s2).astype(F32) - isize)).astype(F32)
    return np.where((iw > 0) & (ih > 0), ratio, F32(0)).astype(F32)


def bbox_coverage(b1, b2):
    """BBoxCoverage: the part of ``b1`` covered by ``b2``."""
    isize = bbox_size(intersect_bbox(b1, b2))
    s1 = bbox_size(b1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (isize / s1).astype(F32)
    return np.where(isize > 0, ratio, F32(0)).astype(F32)


def clip_bbox(b):
    return np.clip(np.asarray(b, dtype=F32), F32(0), F32(1)).astype(F32)


def project_bbox(src, b):
    """ProjectBBox of boxes ``b`` (K, 4) into the window ``src`` (4,): (projected, valid)."""
    s0, s1, s2, s3 = (F32(v) for v in src)
    x0, y0, x1, y1 = _split(b)
    outside = (x0 >= s2) | (x1 <= s0) | (y0 >= s3) | (y1 <= s1)
    sw, sh = F32(s2 - s0), F32(s3 - s1)
    proj = np.stack([(x0 - s0) / sw, (y0 - s1) / sh, (x1 - s0) / sw, (y1 - s1) / sh],
                    axis=-1).astype(F32)
    proj = clip_bbox(proj)
    valid = ~outside & (bbox_size(proj) > 0)
    return proj, valid


def meet_emit_constraint(src, b, emit_type, emit_overlap):
    """MeetEmitConstraint of boxes ``b`` with the window ``src``."""
    x0, y0, x1, y1 = _split(b)
    if emit_type == EMIT_CENTER:
        xc = ((x0 + x1).astype(F32) / F32(2)).astype(F32)
        yc = ((y0 + y1).astype(F32) / F32(2)).astype(F32)
        s0, s1, s2, s3 = (F32(v) for v in src)
        return (xc >= s0) & (xc <= s2) & (yc >= s1) & (yc <= s3)
    if emit_type == EMIT_MIN_OVERLAP:
        return bbox_coverage(b, np.asarray(src, dtype=F32)) > F32(emit_overlap)
    raise CaffeError("Unknown emit type.", where="bbox_util.cpp")


class ResizeConfig:
    """resize_param values used by the image and box transforms."""

    def __init__(self, rp):
        self.mode = int(rp.resize_mode)
        self.height = int(rp.height)
        self.width = int(rp.width)
        self.height_scale = int(rp.height_scale)
        self.width_scale = int(rp.width_scale)
        self.pad_mode = int(rp.pad_mode)
        self.pad_value = [float(v) for v in rp.pad_value]
        self.interp = [int(m) for m in rp.interp_mode]

    def new_size(self, old_w, old_h):
        """InferNewSize: (width, height) an image of old_w x old_h is resized to."""
        width, height = self.width, self.height
        if self.mode == FIT_SMALL_SIZE:
            orig_aspect = F32(old_w) / F32(old_h)
            aspect = F32(width) / F32(height)
            if orig_aspect < aspect:
                height = int(F32(width) / orig_aspect)
            else:
                width = int(orig_aspect * F32(height))
        return width, height


def update_bbox_by_resize_policy(rc, old_w, old_h, boxes):
    """UpdateBBoxByResizePolicy (float32, Caffe's operation order)."""
    new_h, new_w = F32(rc.height), F32(rc.width)
    ow, oh = F32(old_w), F32(old_h)
    orig_aspect = F32(ow / oh)
    new_aspect = F32(new_w / new_h)
    x0, y0, x1, y1 = (v.astype(F32) for v in _split(boxes))
    x_min, y_min = (x0 * ow).astype(F32), (y0 * oh).astype(F32)
    x_max, y_max = (x1 * ow).astype(F32), (y1 * oh).astype(F32)
    zero = F32(0)

    def warp_x(xa, xb, nw):
        return (np.maximum(zero, ((xa * nw).astype(F32) / ow).astype(F32)),
                np.minimum(nw, ((xb * nw).astype(F32) / ow).astype(F32)))

    def warp_y(ya, yb, nh):
        return (np.maximum(zero, ((ya * nh).astype(F32) / oh).astype(F32)),
                np.minimum(nh, ((yb * nh).astype(F32) / oh).astype(F32)))

    if rc.mode == WARP:
        x_min, x_max = warp_x(x_min, x_max, new_w)
        y_min, y_max = warp_y(y_min, y_max, new_h)
    elif rc.mode == FIT_LARGE_SIZE_AND_PAD:
        if orig_aspect > new_aspect:
            padding = F32((new_h - F32(new_w / orig_aspect)) / F32(2))
            x_min, x_max = warp_x(x_min, x_max, new_w)
            span = F32(new_h - F32(2) * padding)
            y_min = ((y_min * span).astype(F32) / oh).astype(F32)
            y_min = (padding + np.maximum(zero, y_min)).astype(F32)
            y_max = ((y_max * span).astype(F32) / oh).astype(F32)
            y_max = (padding + np.minimum(new_h, y_max)).astype(F32)
        else:
            padding = F32((new_w - F32(orig_aspect * new_h)) / F32(2))
            span = F32(new_w - F32(2) * padding)
            x_min = ((x_min * span).astype(F32) / ow).astype(F32)
            x_min = (padding + np.maximum(zero, x_min)).astype(F32)
            x_max = ((x_max * span).astype(F32) / ow).astype(F32)
            x_max = (padding + np.minimum(new_w, x_max)).astype(F32)
            y_min, y_max = warp_y(y_min, y_max, new_h)
    elif rc.mode == FIT_SMALL_SIZE:
        if orig_aspect < new_aspect:
            new_h = F32(new_w / orig_aspect)
        else:
            new_w = F32(orig_aspect * new_h)
        x_min, x_max = warp_x(x_min, x_max, new_w)
        y_min, y_max = warp_y(y_min, y_max, new_h)
    else:
        raise CaffeError("Unknown resize mode.", where="im_transforms.cpp")
    return np.stack([x_min / new_w, y_min / new_h, x_max / new_w, y_max / new_h],
                    axis=-1).astype(F32)


def extrapolate_bbox(rc, height, width, crop_box, boxes):
    """ExtrapolateBBox (only FIT_SMALL_SIZE with height_scale and width_scale set)."""
    if not (rc.height_scale > 0 and rc.width_scale > 0 and rc.mode == FIT_SMALL_SIZE):
        return boxes
    orig_aspect = F32(width) / F32(height)
    rh, rw = F32(rc.height), F32(rc.width)
    if orig_aspect < F32(rw / rh):
        rh = F32(rw / orig_aspect)
    else:
        rw = F32(rh * orig_aspect)
    crop_h = F32(rh * F32(crop_box[3] - crop_box[1]))
    crop_w = F32(rw * F32(crop_box[2] - crop_box[0]))
    if crop_w < rc.width_scale or crop_h < rc.height_scale:
        raise CaffeError("Check failed: crop_width >= width_scale (%s vs. %d) or crop_height >= "
                         "height_scale (%s vs. %d)" % (crop_w, rc.width_scale, crop_h,
                                                       rc.height_scale), where="bbox_util.cpp")
    fx, fy = F32(crop_w / F32(rc.width_scale)), F32(crop_h / F32(rc.height_scale))
    out = boxes.copy()
    out[:, 0] = (boxes[:, 0] * fx).astype(F32)
    out[:, 2] = (boxes[:, 2] * fx).astype(F32)
    out[:, 1] = (boxes[:, 1] * fy).astype(F32)
    out[:, 3] = (boxes[:, 3] * fy).astype(F32)
    return out


def transform_annotation(anno, crop_box, mirror=False, resize=None, old_size=None,
                         emit=None):
    """TransformAnnotation: the boxes of ``anno`` seen through the window ``crop_box``.

    ``resize``: a ResizeConfig applied first (with ``old_size`` = (width, height) of the image
    before resizing); ``emit``: (emit_type, emit_overlap) or None."""
    if len(anno) == 0:
        return anno
    boxes = anno.boxes
    if resize is not None:
        boxes = update_bbox_by_resize_policy(resize, old_size[0], old_size[1], boxes)
    keep = np.ones(len(anno), dtype=bool)
    if emit is not None:
        keep &= meet_emit_constraint(crop_box, boxes, emit[0], emit[1])
    proj, valid = project_bbox(crop_box, boxes)
    keep &= valid
    if mirror:
        x0 = proj[:, 0].copy()
        proj[:, 0] = (F32(1) - proj[:, 2]).astype(F32)
        proj[:, 2] = (F32(1) - x0).astype(F32)
    if resize is not None:
        proj = extrapolate_bbox(resize, old_size[1], old_size[0], crop_box, proj)
    return anno.select(keep, proj)


# ----------------------------------------------------------------------------- samplers
def uniform(rng, a, b, n=None):
    """caffe_rng_uniform in float32 (``a + (b - a) * u``)."""
    a, b = F32(a), F32(b)
    u = rng.random(n, dtype=np.float32)
    return (a + (b - a) * u).astype(F32)


class SamplerConfig:
    """One BatchSampler with its checks (sampler.cpp's CHECKs, made at setup here)."""

    def __init__(self, bs, where="annotated_data_param.batch_sampler"):
        s = bs.sampler
        self.use_original_image = bool(bs.use_original_image)
        self.min_scale, self.max_scale = float(s.min_scale), float(s.max_scale)
        self.min_ar, self.max_ar = float(s.min_aspect_ratio), float(s.max_aspect_ratio)
        self.max_sample = int(bs.max_sample) if bs.HasField("max_sample") else None
        self.max_trials = int(bs.max_trials)
        c = bs.sample_constraint
        self.constraint = {f: float(getattr(c, f)) for f in (
            "min_jaccard_overlap", "max_jaccard_overlap", "min_sample_coverage",
            "max_sample_coverage", "min_object_coverage", "max_object_coverage")
            if c.HasField(f)}
        checks = ((self.max_scale >= self.min_scale, "sampler.max_scale() >= sampler.min_scale()",
                   self.max_scale, self.min_scale),
                  (self.min_scale > 0, "sampler.min_scale() > 0.", self.min_scale, 0),
                  (self.max_scale <= 1, "sampler.max_scale() <= 1.", self.max_scale, 1),
                  (self.max_ar >= self.min_ar,
                   "sampler.max_aspect_ratio() >= sampler.min_aspect_ratio()",
                   self.max_ar, self.min_ar),
                  (self.min_ar > 0, "sampler.min_aspect_ratio() > 0.", self.min_ar, 0),
                  (self.max_ar < FLT_MAX, "sampler.max_aspect_ratio() < FLT_MAX", self.max_ar,
                   FLT_MAX))
        for ok, text, a, b in checks:
            if not ok:
                raise CaffeError("Check failed: %s (%s vs. %s) in %s" % (text, _num(a), _num(b),
                                                                       where),
                                 where="sampler.cpp")


def _num(x):
    return ("%g" % x) if isinstance(x, float) else str(x)


def sample_bboxes(rng, sc, n, notes=None):
    """``n`` SampleBBox draws of sampler ``sc`` as float32 (n, 4) boxes in [0, 1]."""
    scale = uniform(rng, sc.min_scale, sc.max_scale, n)
    ar = uniform(rng, sc.min_ar, sc.max_ar, n)
    s2 = scale.astype(np.float64) ** 2
    ar = np.maximum(ar, s2.astype(F32))
    ar = np.minimum(ar, (1.0 / s2).astype(F32))
    root = np.sqrt(ar).astype(F32)
    w = (scale * root).astype(F32)
    h = (scale / root).astype(F32)
    over = (w > 1) | (h > 1)
    if over.any():
        if notes is not None:
            worst = float(max(w.max(), h.max()))
            notes.append(("W", "sampler.py", "SampleBBox: a sampled box of width or height %.9g "
                          "> 1 was clamped to 1 (stock SSD-Caffe aborts here: math_functions."
                          "cpp:250] Check failed: a <= b (0 vs. %.6g))" % (worst, 1 - worst),
                          "clamp"))
        w = np.minimum(w, F32(1))
        h = np.minimum(h, F32(1))
    # caffe_rng_uniform(0, 1 - width) and (0, 1 - height)
    w_off = ((F32(1) - w).astype(F32) * rng.random(n, dtype=np.float32)).astype(F32)
    h_off = ((F32(1) - h).astype(F32) * rng.random(n, dtype=np.float32)).astype(F32)
    return np.stack([w_off, h_off, (w_off + w).astype(F32), (h_off + h).astype(F32)],
                    axis=-1).astype(F32)


def satisfy_sample_constraint(samples, objects, constraint):
    """SatisfySampleConstraint for each sample (T, 4) against objects (K, 4) -> bool (T,)."""
    t = samples.shape[0]
    if not constraint:
        return np.ones(t, dtype=bool)
    if objects.shape[0] == 0:
        return np.zeros(t, dtype=bool)
    s = samples[:, None, :]
    o = objects[None, :, :]
    # Only the first family that is set decides (see the module docstring).
    for lo, hi, fn in (("min_jaccard_overlap", "max_jaccard_overlap",
                        lambda: jaccard_overlap(s, o)),
                       ("min_sample_coverage", "max_sample_coverage",
                        lambda: bbox_coverage(s, o)),
                       ("min_object_coverage", "max_object_coverage",
                        lambda: bbox_coverage(o, s))):
        if lo in constraint or hi in constraint:
            value = fn()
            ok = np.ones(value.shape, dtype=bool)
            if lo in constraint:
                ok &= ~(value < F32(constraint[lo]))
            if hi in constraint:
                ok &= ~(value > F32(constraint[hi]))
            return ok.any(axis=1)
    return np.ones(t, dtype=bool)


def generate_batch_samples(rng, objects, samplers, notes=None):
    """GenerateBatchSamples: the kept boxes of all samplers, in sampler then trial order."""
    kept = []
    for sc in samplers:
        if not sc.use_original_image:
            continue
        n = sc.max_trials
        if n <= 0 or (sc.max_sample is not None and sc.max_sample <= 0):
            continue
        cand = sample_bboxes(rng, sc, n, notes)
        ok = np.flatnonzero(satisfy_sample_constraint(cand, objects, sc.constraint))
        if sc.max_sample is not None:
            ok = ok[:sc.max_sample]
        if ok.size:
            kept.append(cand[ok])
    if not kept:
        return np.zeros((0, 4), dtype=F32)
    return np.concatenate(kept, axis=0)


# ----------------------------------------------------------------------------- image steps
def crop_image(img, box):
    """CropImage of an HxWxC image to the normalized ``box`` (clipped, then scaled to pixels;
    offsets and sizes truncated as Caffe's ``static_cast<int>``)."""
    h, w = img.shape[:2]
    x0, y0, x1, y1 = (F32(v) for v in clip_bbox(box))
    sx0, sy0, sx1, sy1 = F32(x0 * F32(w)), F32(y0 * F32(h)), F32(x1 * F32(w)), F32(y1 * F32(h))
    w_off, h_off = int(sx0), int(sy0)
    width, height = int(F32(sx1 - sx0)), int(F32(sy1 - sy0))
    width = max(1, min(width, w - w_off))
    height = max(1, min(height, h - h_off))
    w_off = min(w_off, w - 1)
    h_off = min(h_off, h - 1)
    return np.ascontiguousarray(img[h_off:h_off + height, w_off:w_off + width])


def expand_image(rng, img, ratio, fill):
    """ExpandImage: the image on a canvas ``ratio`` times larger; returns (canvas, expand_box)."""
    ih, iw, c = img.shape
    height = int(F32(F32(ih) * F32(ratio)))
    width = int(F32(F32(iw) * F32(ratio)))
    h_off = math.floor(float(uniform(rng, 0, F32(height - ih))))
    w_off = math.floor(float(uniform(rng, 0, F32(width - iw))))
    h_off, w_off = F32(h_off), F32(w_off)
    box = np.array([F32(-w_off) / F32(iw), F32(-h_off) / F32(ih),
                    F32(F32(width) - w_off) / F32(iw), F32(F32(height) - h_off) / F32(ih)],
                   dtype=F32)
    canvas = np.empty((height, width, c), dtype=np.uint8)
    canvas.reshape(height, width * c)[:] = np.tile(np.asarray(list(fill)[:c], dtype=np.uint8),
                                                   width)
    ho, wo = int(h_off), int(w_off)
    canvas[ho:ho + ih, wo:wo + iw] = img
    return canvas, box


class DistortConfig:
    def __init__(self, dp):
        self.brightness = (float(dp.brightness_prob), float(dp.brightness_delta))
        self.contrast = (float(dp.contrast_prob), float(dp.contrast_lower),
                         float(dp.contrast_upper))
        self.saturation = (float(dp.saturation_prob), float(dp.saturation_lower),
                           float(dp.saturation_upper))
        self.hue = (float(dp.hue_prob), float(dp.hue_delta))
        self.random_order_prob = float(dp.random_order_prob)
        where = "im_transforms.cpp"
        if self.brightness[0] > 0 and self.brightness[1] < 0:
            raise CaffeError("Check failed: brightness_delta >= 0 (%s vs. 0) brightness_delta "
                             "must be non-negative." % _num(self.brightness[1]), where=where)
        for name, (p, lo, hi) in (("contrast", self.contrast), ("saturation", self.saturation)):
            if p > 0 and hi < lo:
                raise CaffeError("Check failed: upper >= lower (%s vs. %s) %s upper must be >= "
                                 "lower." % (_num(hi), _num(lo), name), where=where)
            if p > 0 and lo < 0:
                raise CaffeError("Check failed: lower >= 0 (%s vs. 0) %s lower must be "
                                 "non-negative." % (_num(lo), name), where=where)
        if self.hue[0] > 0 and self.hue[1] < 0:
            raise CaffeError("Check failed: hue_delta >= 0 (%s vs. 0) hue_delta must be "
                             "non-negative." % _num(self.hue[1]), where=where)

    @property
    def needs_color(self):
        return self.saturation[0] > 0 or self.hue[0] > 0 or self.random_order_prob > 0


def apply_distort(rng, img, dc, rgb=False):
    """ApplyDistort: SSD's photometric distortions in one of its two orders (``rgb``: the
    image is in RGB order)."""
    def brightness(x):
        if rng.random() < dc.brightness[0]:
            return image_ops.adjust_brightness(x, float(uniform(rng, -dc.brightness[1],
                                                                dc.brightness[1])))
        return x

    def contrast(x):
        if rng.random() < dc.contrast[0]:
            return image_ops.adjust_contrast(x, float(uniform(rng, dc.contrast[1],
                                                              dc.contrast[2])))
        return x

    def saturation(x):
        if rng.random() < dc.saturation[0]:
            return image_ops.adjust_saturation(x, float(uniform(rng, dc.saturation[1],
                                                                dc.saturation[2])), rgb)
        return x

    def hue(x):
        if rng.random() < dc.hue[0]:
            return image_ops.adjust_hue(x, float(uniform(rng, -dc.hue[1], dc.hue[1])), rgb)
        return x

    def order(x):
        if rng.random() < dc.random_order_prob:
            return np.ascontiguousarray(x[:, :, rng.permutation(x.shape[2])])
        return x

    if img.shape[2] != 3 and dc.needs_color:
        raise CaffeError("distort_param's saturation / hue / random_order need a 3-channel "
                         "image, got %d channel(s) (OpenCV's cvtColor would abort); set "
                         "transform_param { force_color: true }" % img.shape[2],
                         where="im_transforms.cpp")
    steps = (brightness, contrast, saturation, hue, order) if rng.random() > 0.5 else \
        (brightness, saturation, hue, contrast, order)
    for step in steps:
        img = step(img)
    return img


class NoiseConfig:
    _FLAGS = ("decolorize", "gauss_blur", "hist_eq", "clahe", "erode", "posterize", "inverse",
              "saltpepper", "convert_to_hsv", "convert_to_lab")

    def __init__(self, npm):
        for f in self._FLAGS:
            setattr(self, f, bool(getattr(npm, f)))
        self.jpeg = float(npm.jpeg)
        self.fraction = float(npm.saltpepper_param.fraction)
        self.values = [float(v) for v in npm.saltpepper_param.value]
        if self.clahe:
            raise CaffeError("noise_param.clahe (OpenCV's CLAHE) is not implemented here; remove "
                             "it from transform_param.noise_param")
        if self.convert_to_lab:
            raise CaffeError("noise_param.convert_to_lab makes a float image that SSD-Caffe's "
                             "transformer cannot take (it requires 8-bit data); remove it")
        if self.saltpepper and not self.values:
            raise CaffeError("noise_param.saltpepper needs saltpepper_param.value (1 or one per "
                             "channel)")


def apply_noise(rng, img, nc, rgb=False):
    """ApplyNoise (SSD's order; every enabled effect is applied to every image). Returns
    (image, rgb): after ``convert_to_hsv`` the channels are H, S, V (rgb False)."""
    def need3(what):
        if img.shape[2] != 3:
            raise CaffeError("noise_param.%s needs a 3-channel image (got %d)"
                             % (what, img.shape[2]), where="im_transforms.cpp")
    if nc.decolorize:
        need3("decolorize")
        img = image_ops.gray2bgr(image_ops.bgr2gray(img, rgb))
    if nc.gauss_blur:
        img = image_ops.gaussian_blur7(img)
    if nc.hist_eq:
        if img.shape[2] > 1:
            ycc = image_ops.bgr2ycrcb(img, rgb)
            ycc[:, :, 0] = image_ops.equalize_hist(ycc[:, :, 0])
            img = image_ops.ycrcb2bgr(ycc, rgb)
        else:
            img = image_ops.equalize_hist(img[:, :, 0])[:, :, None]
    if nc.jpeg > 0:
        img = image_ops.decode(image_ops.encode(img, "jpg", int(nc.jpeg), rgb=rgb), color=True,
                               rgb=rgb)
    if nc.erode:
        img = image_ops.erode_cross3(img)
    if nc.posterize:
        img = image_ops.posterize(img)
    if nc.inverse:
        img = 255 - img
    if nc.saltpepper:
        c = img.shape[2]
        vals = nc.values
        if len(vals) not in (1, c):
            raise CaffeError("Specify either 1 pad_value or as many as channels: %d" % c,
                             where="im_transforms.cpp")
        vals = [int(np.clip(v, 0, 255)) for v in (vals * c if len(vals) == 1 else vals)]
        if rgb and c == 3:
            vals = vals[::-1]
        vals = np.asarray(vals, dtype=np.uint8)
        h, w = img.shape[:2]
        n = int(math.floor(F32(nc.fraction) * F32(w) * F32(h)))
        if n > 0:
            img = img.copy()
            xs = rng.integers(0, w, n)
            ys = rng.integers(0, h, n)
            img[ys, xs] = vals[:c]
    if nc.convert_to_hsv:
        need3("convert_to_hsv")
        img = image_ops.bgr2hsv(img, rgb)
        rgb = False
    return img, rgb


def apply_resize(rng, img, rc, rgb=False):
    """ApplyResize: WARP, FIT_SMALL_SIZE or FIT_LARGE_SIZE_AND_PAD with a random interp_mode
    (``rgb``: the image, and so the pad values' order, is RGB)."""
    interp = image_ops.INTER_LINEAR
    if rc.interp:
        interp = _INTERP[rc.interp[int(rng.integers(len(rc.interp)))]]
    h, w, c = img.shape
    nw, nh = rc.width, rc.height
    if rc.mode == WARP:
        return image_ops.resize(img, nw, nh, interp)
    orig_aspect = F32(F32(w) / F32(h))
    new_aspect = F32(F32(nw) / F32(nh))
    if rc.mode == FIT_SMALL_SIZE:
        if orig_aspect < new_aspect:
            return image_ops.resize(img, nw, max(1, int(math.floor(F32(nw) / orig_aspect))),
                                    interp)
        return image_ops.resize(img, max(1, int(math.floor(orig_aspect * F32(nh)))), nh, interp)
    if rc.mode != FIT_LARGE_SIZE_AND_PAD:
        raise CaffeError("Unknown resize mode.", where="im_transforms.cpp")
    pad_vals = rc.pad_value
    if pad_vals and len(pad_vals) not in (1, c):
        raise CaffeError("Check failed: param.pad_value_size() == 1 || param.pad_value_size() "
                         "== img_channels Specify either 1 pad_value or as many as channels: %d"
                         % c, where="im_transforms.cpp")
    if not pad_vals:
        pad_vals = [0.0] * c
    elif len(pad_vals) == 1:
        pad_vals = pad_vals * c
    if rgb and c == 3:
        pad_vals = pad_vals[::-1]
    mode = _PAD[rc.pad_mode]
    if orig_aspect > new_aspect:
        height = max(1, int(math.floor(F32(nw) / orig_aspect)))
        out = image_ops.resize(img, nw, height, interp)
        pad = int(math.floor((nh - height) / 2.0))
        return image_ops.copy_make_border(out, pad, nh - height - pad, 0, 0, mode, pad_vals)
    width = max(1, int(math.floor(orig_aspect * F32(nh))))
    out = image_ops.resize(img, width, nh, interp)
    pad = int(math.floor((nw - width) / 2.0))
    return image_ops.copy_make_border(out, 0, 0, pad, nw - width - pad, mode, pad_vals)


# ----------------------------------------------------------------------------- the pipeline
class ItemResult:
    """What the pipeline returns for one record."""

    __slots__ = ("image", "anno", "label", "crop", "mirror", "notes", "resized_hw", "batch_shape")

    def __init__(self, image, anno, label, crop, mirror, notes, resized_hw, batch_shape):
        self.image = image          # uint8 C x H x W, cropped and mirrored
        self.anno = anno            # Annotations (or None when labels are not annotations)
        self.label = label          # datum.label
        self.crop = crop            # (h_off, w_off) of the crop in the resized image
        self.mirror = mirror
        self.notes = notes          # [(severity, where, text, dedupe_key)]
        self.resized_hw = resized_hw
        self.batch_shape = batch_shape  # InferBlobShape of the record before augmentation


class AnnotatedItemTransformer:
    """SSD-Caffe's per-item work of AnnotatedDataLayer::load_batch (picklable, torch-free).

    Built from the layer's ``TransformationParameter`` and ``AnnotatedDataParameter``;
    :meth:`process` turns one serialized AnnotatedDatum into an :class:`ItemResult`.
    """

    def __init__(self, transform_param, anno_param, phase="TRAIN", use_annotations=True,
                 jpeg_roundtrip=None):
        tp = transform_param
        self.phase = phase
        self.use_annotations = bool(use_annotations)
        self.jpeg_roundtrip = jpeg_roundtrip_default() if jpeg_roundtrip is None \
            else bool(jpeg_roundtrip)
        if tp.force_color and tp.force_gray:
            raise CaffeError("cannot set both force_color and force_gray",
                             where="data_transformer.cpp")
        self.color = True if tp.force_color else (False if tp.force_gray else None)
        self.mirror = bool(tp.mirror)
        crop_h, crop_w = int(tp.crop_h), int(tp.crop_w)
        if tp.crop_size:
            crop_h = crop_w = int(tp.crop_size)
        self.crop_h, self.crop_w = crop_h, crop_w
        self.mean_values = [float(v) for v in tp.mean_value]
        self.resize = None
        if tp.HasField("resize_param"):
            rc = ResizeConfig(tp.resize_param)
            if rc.height <= 0 or rc.width <= 0:
                raise CaffeError("Check failed: resize_param.height() > 0 and width() > 0 "
                                 "(height %d, width %d)" % (rc.height, rc.width),
                                 where="data_transformer.cpp")
            if rc.mode not in (WARP, FIT_SMALL_SIZE, FIT_LARGE_SIZE_AND_PAD):
                raise CaffeError("Unknown resize mode %d." % rc.mode, where="im_transforms.cpp")
            for m in rc.interp:
                if m not in _INTERP:
                    raise CaffeError("Unknown interp mode %d." % m, where="im_transforms.cpp")
            if rc.pad_mode not in _PAD:
                raise CaffeError("Unknown pad mode %d." % rc.pad_mode, where="im_transforms.cpp")
            self.resize = rc
        self.noise = NoiseConfig(tp.noise_param) if tp.HasField("noise_param") else None
        self.distort = DistortConfig(tp.distort_param) if tp.HasField("distort_param") else None
        self.expand = None
        if tp.HasField("expand_param"):
            ep = tp.expand_param
            if ep.max_expand_ratio < 1:
                raise CaffeError("Check failed: a <= b (1 vs. %s) expand_param.max_expand_ratio "
                                 "must be >= 1" % _num(float(ep.max_expand_ratio)),
                                 where="math_functions.cpp:250")
            self.expand = (float(ep.prob), float(ep.max_expand_ratio))
        self.emit = None
        if tp.HasField("emit_constraint"):
            ec = tp.emit_constraint
            if ec.emit_type not in (EMIT_CENTER, EMIT_MIN_OVERLAP):
                raise CaffeError("Unknown emit type.", where="bbox_util.cpp")
            self.emit = (int(ec.emit_type), float(ec.emit_overlap))
        self.samplers = [SamplerConfig(bs, "annotated_data_param.batch_sampler[%d]" % i)
                         for i, bs in enumerate(anno_param.batch_sampler)]
        self.mean = None             # float32 C x H x W mean image (set by the layer)

    # -- helpers
    def _fill(self, channels):
        if self.mean_values:
            if len(self.mean_values) not in (1, channels):
                raise CaffeError("Specify either 1 mean_value or as many as channels: %d"
                                 % channels, where="data_transformer.cpp")
            vals = self.mean_values * channels if len(self.mean_values) == 1 \
                else self.mean_values
            vals = [int(np.clip(np.rint(v), 0, 255)) for v in vals]
            return vals[::-1] if channels == 3 else vals     # BGR means, RGB image
        return [0] * channels

    def _decode(self, datum, key, notes):
        """The image as H x W x C, 3-channel images in RGB order (see image_ops)."""
        if datum.encoded:
            return image_ops.decode(datum.data, color=self.color, key=key, rgb=True), True
        if self.color is not None:
            notes.append(("E", "data_transformer.cpp",
                          "force_color and force_gray only for encoded datum", "force"))
        c, h, w = datum.channels, datum.height, datum.width
        if len(datum.data) == 0:
            if len(datum.float_data):
                raise CaffeError("AnnotatedData: record %s holds float_data; only uint8 or "
                                 "encoded images are supported" % key)
            raise CaffeError("AnnotatedData: record %s holds no image data" % key)
        if c <= 0 or h <= 0 or w <= 0 or len(datum.data) != c * h * w:
            raise CaffeError("AnnotatedData: record %s holds %d bytes for %dx%dx%d"
                             % (key, len(datum.data), c, h, w))
        arr = np.frombuffer(datum.data, dtype=np.uint8).reshape(c, h, w)
        if c == 3:
            arr = arr[::-1]
        return np.ascontiguousarray(arr.transpose(1, 2, 0)), False

    def _roundtrip(self, img, encoded):
        if encoded and self.jpeg_roundtrip:
            return image_ops.jpeg_roundtrip(img, self.color, rgb=True)
        return img

    # -- the work
    def process(self, value, key, seed):
        """One serialized AnnotatedDatum -> :class:`ItemResult`; ``seed``: entropy words."""
        from converters import caffe_pb2
        from google.protobuf.message import DecodeError
        anno_datum = caffe_pb2.AnnotatedDatum()
        try:
            anno_datum.ParseFromString(value)
        except (DecodeError, RuntimeError, ValueError) as exc:
            raise CaffeError("Corrupt record: %s is not an AnnotatedDatum (%s)" % (key, exc))
        notes = []
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(seed))))
        img, encoded = self._decode(anno_datum.datum, key, notes)
        batch_shape = self.output_shape(img.shape[2], img.shape[0], img.shape[1])
        anno = Annotations.from_datum(anno_datum)
        if self.distort is not None:
            if encoded:
                img = self._roundtrip(apply_distort(rng, img, self.distort, rgb=True), encoded)
            else:
                notes.append(("E", "data_transformer.cpp", "Only support encoded datum now",
                              "distort"))
        if self.expand is not None:
            prob, max_ratio = self.expand
            if not rng.random() > prob and not abs(max_ratio - 1.0) < 1e-2:
                ratio = float(uniform(rng, 1.0, max_ratio))
                if self.mean is not None:
                    raise CaffeError("expand_param with mean_file needs a mean of the expanded "
                                     "size (Caffe checks data_mean_.height() == expanded "
                                     "height); use mean_value", where="data_transformer.cpp")
                fill = self._fill(img.shape[2]) if encoded else [32] * img.shape[2]
                img, ebox = expand_image(rng, img, ratio, fill)
                anno = transform_annotation(anno, ebox, emit=self.emit)
                img = self._roundtrip(img, encoded)
        if self.samplers:
            boxes = generate_batch_samples(rng, anno.boxes, self.samplers, notes)
            if boxes.shape[0]:
                box = boxes[int(rng.integers(boxes.shape[0]))]
                img = crop_image(img, box)
                anno = transform_annotation(anno, clip_bbox(box), emit=self.emit)
                img = self._roundtrip(img, encoded)
        old_h, old_w = img.shape[:2]
        rgb = True
        if self.resize is not None:
            img = apply_resize(rng, img, self.resize, rgb=True)
        if self.noise is not None:
            img, rgb = apply_noise(rng, img, self.noise, rgb=True)
        ih, iw = img.shape[:2]
        height, width = (self.crop_h, self.crop_w) if self.crop_h else (ih, iw)
        if ih < height or iw < width:
            raise CaffeError("Check failed: img_height >= crop_h (%d vs. %d) and img_width >= "
                             "crop_w (%d vs. %d) (record %s)" % (ih, height, iw, width, key),
                             where="data_transformer.cpp")
        h_off = w_off = 0
        if self.crop_h:
            if self.phase == "TRAIN":
                h_off = int(rng.integers(0, ih - height + 1))
                w_off = int(rng.integers(0, iw - width + 1))
            else:
                h_off, w_off = (ih - height) // 2, (iw - width) // 2
        mirror = bool(self.mirror and rng.integers(2))
        out = img[h_off:h_off + height, w_off:w_off + width]
        if mirror:
            out = out[:, ::-1]
        out = out.transpose(2, 0, 1)
        if rgb and out.shape[0] == 3:
            out = out[::-1]                  # back to Caffe's BGR
        out = np.ascontiguousarray(out)
        if self.use_annotations:
            crop_box = np.array([F32(w_off) / F32(iw), F32(h_off) / F32(ih),
                                 F32(w_off + width) / F32(iw), F32(h_off + height) / F32(ih)],
                                dtype=F32)
            anno = transform_annotation(anno, crop_box, mirror=mirror, resize=self.resize,
                                        old_size=(old_w, old_h), emit=self.emit)
        else:
            anno = None
        return ItemResult(out, anno, int(anno_datum.datum.label), (h_off, w_off), mirror, notes,
                          (ih, iw), batch_shape)

    def output_shape(self, channels, height, width):
        """InferBlobShape: (C, H, W) of the item made from a C x height x width image."""
        if self.resize is not None:
            width, height = self.resize.new_size(width, height)
        if height < self.crop_h or width < self.crop_w:
            raise CaffeError("Check failed: img_height >= crop_h (%d vs. %d)"
                             % (height, self.crop_h), where="data_transformer.cpp")
        if self.crop_h:
            return (channels, self.crop_h, self.crop_w)
        return (channels, height, width)
