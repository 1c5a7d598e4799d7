"""Caffe's ``DataTransformer`` (``TransformationParameter``), vectorised over a batch.

What ``data_transformer.cpp`` (BVLC 1.0) does to each item, reproduced here:

* ``mean_file`` (a ``.binaryproto`` of the full, uncropped image size) or ``mean_value`` (one
  value for all channels, or one per channel); both given is Caffe's CHECK failure
  ("Cannot specify mean_file and mean_value at the same time").
* crop ``crop_size`` (or SSD's ``crop_h``/``crop_w``): a random offset ``Rand(H - crop + 1)`` in
  TRAIN, the centre ``(H - crop) / 2`` in TEST; the mean is cropped at the same offsets (the
  mean index is the *source* pixel's index).
* ``mirror``: a random horizontal flip with probability 1/2 (Caffe draws it in every phase, TEST
  included, whenever ``mirror: true``).
* value = ``(pixel - mean) * scale`` in float32 (mean subtracted before scaling), placed at the
  mirrored position; without a mean, ``pixel * scale``.
* ``force_color`` / ``force_gray`` only act on encoded images (decoded in colour / in gray);
  for raw data Caffe logs "force_color and force_gray only for encoded datum".

Random draws come from a numpy generator seeded, like Caffe's ``InitRand``, from the global
(torch) generator when the transformer is created, and only if it needs randomness (mirror, or
crop in TRAIN). The draws are deterministic for a given seed but are not Caffe's boost numbers.
"""
import numpy as np
import torch

from converters import glog
from converters.errors import CaffeError

PHASES = {0: "TRAIN", 1: "TEST"}


def seed_from_torch():
    """A 63-bit seed drawn from torch's global generator (Caffe's ``caffe_rng_rand()``)."""
    return int(torch.randint(0, 2 ** 62, (1,)).item())


# ----------------------------------------------------------------------------- mean files
def legacy_dims(shape):
    """Caffe's Blob::LegacyShape for num, channels, height, width (missing axes are 1)."""
    shape = tuple(int(d) for d in shape)
    n = len(shape)

    def dim(i):
        return shape[i] if i < n else 1
    return dim(0), dim(1), dim(2), dim(3)


def read_mean_file(path):
    """The mean blob of a ``.binaryproto`` as a float32 array in its own shape."""
    from converters.caffemodel import read_binaryproto
    return np.asarray(read_binaryproto(path), dtype=np.float32)


# ----------------------------------------------------------------------------- the transformer
class DataTransformer:
    """Caffe's DataTransformer for one layer.

    ``param``: a ``TransformationParameter``; ``phase``: "TRAIN"/"TEST" (or 0/1);
    ``seed``: the generator's seed (default: drawn from torch when randomness is needed).
    ``log_lines`` holds the (where, text) lines Caffe prints while constructing it.
    """

    def __init__(self, param, phase="TRAIN", seed=None, layer_name=None):
        self.param = param
        self.phase = PHASES.get(phase, phase)
        self.layer_name = layer_name
        self.scale = np.float32(param.scale)
        self.mirror = bool(param.mirror)
        crop_h, crop_w = int(param.crop_h), int(param.crop_w)
        if param.crop_size:
            crop_h = crop_w = int(param.crop_size)
        if crop_h < 0 or crop_w < 0 or (bool(crop_h) != bool(crop_w)):
            self._fail("crop_h and crop_w must both be set and positive (got %d, %d)"
                       % (crop_h, crop_w), "data_transformer.cpp:460")
        self.crop_h, self.crop_w = crop_h, crop_w
        if param.force_color and param.force_gray:
            self._fail("cannot set both force_color and force_gray", "data_transformer.cpp:264")
        self.force_color = bool(param.force_color)
        self.force_gray = bool(param.force_gray)
        self.log_lines = []
        self._warned_force = False
        self.mean = None            # float32 (C, H, W) mean image
        self.mean_file = param.mean_file if param.HasField("mean_file") else None
        self.mean_values = None     # float32 (K,) with K 1 or C
        if param.HasField("mean_file"):
            if len(param.mean_value):
                self._fail("Check failed: param_.mean_value_size() == 0 (%d vs. 0) Cannot specify "
                           "mean_file and mean_value at the same time" % len(param.mean_value),
                           "data_transformer.cpp:21")
            self.log_lines.append(("data_transformer.cpp:25",
                                   "Loading mean file from: %s" % param.mean_file))
            mean = read_mean_file(param.mean_file)
            if mean.ndim == 3:      # (C, H, W): Caffe's legacy accessors would misread it
                mean = mean[None]
            _, c, h, w = legacy_dims(mean.shape)
            flat = mean.reshape(-1)
            if flat.size < c * h * w:
                self._fail("mean file %s has %d values, fewer than %dx%dx%d"
                           % (param.mean_file, flat.size, c, h, w))
            self.mean = np.ascontiguousarray(flat[:c * h * w].reshape(c, h, w), dtype=np.float32)
        elif len(param.mean_value):
            self.mean_values = np.asarray(list(param.mean_value), dtype=np.float32)
        self.needs_rand = self.mirror or (self.phase == "TRAIN" and bool(self.crop_h))
        self.seed = None
        self.rng = None
        if self.needs_rand:
            self.seed = seed_from_torch() if seed is None else int(seed)
            self.rng = np.random.Generator(np.random.PCG64(self.seed))

    def _fail(self, message, where=None):
        if self.layer_name:
            message = "%s (layer %s)" % (message, self.layer_name)
        raise CaffeError(message, where=where)

    # ------------------------------------------------------------------ RNG state (resume)
    def get_rng_state(self):
        return None if self.rng is None else self.rng.bit_generator.state

    def set_rng_state(self, state):
        if self.rng is not None and state is not None:
            self.rng.bit_generator.state = state

    # ------------------------------------------------------------------ shapes
    def decode_mode(self):
        """How to decode encoded images: "color", "gray" or None (as stored)."""
        return "color" if self.force_color else ("gray" if self.force_gray else None)

    def warn_force_for_raw(self):
        """Caffe's complaint when force_color/force_gray is set for raw (non-encoded) data."""
        if (self.force_color or self.force_gray) and not self._warned_force:
            self._warned_force = True
            glog.error("force_color and force_gray only for encoded datum",
                       where="data_transformer.cpp:254")

    def infer_shape(self, channels, height, width):
        """Shape (C, H', W') of one transformed item (Caffe's InferBlobShape)."""
        if channels <= 0:
            self._fail("Check failed: datum_channels > 0 (%d vs. 0)" % channels,
                       "data_transformer.cpp:497")
        if height < self.crop_h:
            self._fail("Check failed: datum_height >= crop_size (%d vs. %d)"
                       % (height, self.crop_h), "data_transformer.cpp:498")
        if width < self.crop_w:
            self._fail("Check failed: datum_width >= crop_size (%d vs. %d)"
                       % (width, self.crop_w), "data_transformer.cpp:499")
        if self.crop_h:
            return (channels, self.crop_h, self.crop_w)
        return (channels, height, width)

    def _check_mean(self, c, h, w):
        if self.mean is not None:
            mc, mh, mw = self.mean.shape
            for name, a, b, line in (("channels", c, mc, 70), ("height", h, mh, 71),
                                     ("width", w, mw, 72)):
                if a != b:
                    self._fail("Check failed: datum_%s == data_mean_.%s() (%d vs. %d) the "
                               "mean_file %s is %dx%dx%d, the images are %dx%dx%d"
                               % (name, name, a, b, self.mean_file, mc, mh, mw, c, h, w),
                               "data_transformer.cpp:%d" % line)
        if self.mean_values is not None and len(self.mean_values) not in (1, c):
            self._fail("Check failed: mean_values_.size() == 1 || mean_values_.size() == "
                       "datum_channels Specify either 1 mean_value or as many as channels: %d"
                       % c, "data_transformer.cpp:75")

    # ------------------------------------------------------------------ random draws
    def draw(self, n, height, width):
        """(mirror flags, h offsets, w offsets) for ``n`` items of size height x width."""
        if self.mirror:
            mirror = self.rng.integers(0, 2, size=n).astype(bool)
        else:
            mirror = np.zeros(n, dtype=bool)
        if self.crop_h:
            if self.phase == "TRAIN":
                h_off = self.rng.integers(0, height - self.crop_h + 1, size=n)
                w_off = self.rng.integers(0, width - self.crop_w + 1, size=n)
            else:
                h_off = np.full(n, (height - self.crop_h) // 2, dtype=np.int64)
                w_off = np.full(n, (width - self.crop_w) // 2, dtype=np.int64)
        else:
            h_off = np.zeros(n, dtype=np.int64)
            w_off = np.zeros(n, dtype=np.int64)
        return mirror, h_off, w_off

    # ------------------------------------------------------------------ the transform
    def apply(self, x, mirror=None, h_off=None, w_off=None, out=None):
        """Transform a batch ``x`` (N, C, H, W) of uint8 or float values with given draws.

        Returns float32 (N, C, H', W'). ``mirror``/``h_off``/``w_off`` default to no flip and
        the phase's deterministic offsets (TEST centre crop; TRAIN offset 0).
        """
        x = np.asarray(x)
        if x.ndim != 4:
            raise ValueError("apply expects an (N, C, H, W) array, got shape %s" % (x.shape,))
        n, c, h, w = x.shape
        self._check_mean(c, h, w)
        ch, cw = self.infer_shape(c, h, w)[1:]
        if mirror is None:
            mirror = np.zeros(n, dtype=bool)
        if h_off is None or w_off is None:
            if self.crop_h and self.phase != "TRAIN":
                h_off = np.full(n, (h - ch) // 2, dtype=np.int64)
                w_off = np.full(n, (w - cw) // 2, dtype=np.int64)
            else:
                h_off = np.zeros(n, dtype=np.int64)
                w_off = np.zeros(n, dtype=np.int64)
        mean = self.mean
        cropped = (ch, cw) != (h, w)
        if cropped:
            h_off = np.asarray(h_off, dtype=np.int64)
            w_off = np.asarray(w_off, dtype=np.int64)
            if n and (h_off.min() == h_off.max()) and (w_off.min() == w_off.max()):
                ho, wo = int(h_off[0]), int(w_off[0])
                src = x[:, :, ho:ho + ch, wo:wo + cw]
                if mean is not None:
                    mean = mean[None, :, ho:ho + ch, wo:wo + cw]
            else:
                view = np.lib.stride_tricks.sliding_window_view(x, (ch, cw), axis=(2, 3))
                src = view[np.arange(n), :, h_off, w_off]           # (N, C, ch, cw)
                if mean is not None:
                    mview = np.lib.stride_tricks.sliding_window_view(self.mean, (ch, cw),
                                                                     axis=(1, 2))
                    mean = mview[:, h_off, w_off].transpose(1, 0, 2, 3)   # (N, C, ch, cw)
        else:
            src = x
            if mean is not None:
                mean = mean[None]
        if out is None:
            out = np.empty((n, c, ch, cw), dtype=np.float32)
        # float32 arithmetic in Caffe's order: (pixel - mean) * scale.
        np.copyto(out, src, casting="unsafe")
        if mean is not None:
            np.subtract(out, mean, out=out)
        elif self.mean_values is not None:
            mv = self.mean_values
            if len(mv) == 1:
                np.subtract(out, mv[0], out=out)
            else:
                np.subtract(out, mv[None, :, None, None], out=out)
        if self.scale != np.float32(1):
            np.multiply(out, self.scale, out=out)
        mirror = np.asarray(mirror, dtype=bool)
        if mirror.any():
            if mirror.all():
                out = np.ascontiguousarray(out[..., ::-1])
            else:
                out[mirror] = out[mirror][..., ::-1]
        return out

    def __call__(self, x):
        """Draw this batch's random crops/flips and transform ``x`` (N, C, H, W)."""
        x = np.asarray(x)
        n, _, h, w = x.shape
        mirror, h_off, w_off = self.draw(n, h, w) if self.needs_rand else (None, None, None)
        return self.apply(x, mirror, h_off, w_off)

    def transform_list(self, items, names=None):
        """Transform a list of (C, H, W) arrays that may differ in size (crop makes them equal).

        Returns float32 (N, C, H', W'); the output size is that of the first item (Caffe
        reshapes the batch from its first datum) and every item must transform to it.
        ``names`` (record keys, image paths) name the items in the error of a size mismatch.
        """
        if not items:
            raise CaffeError("There is no datum to add", where="data_transformer.cpp:182")
        first = items[0].shape
        if all(it.shape == first for it in items):
            return self(np.stack(items))
        shape = self.infer_shape(*first)
        out = np.empty((len(items),) + shape, dtype=np.float32)
        for i, it in enumerate(items):
            c, h, w = it.shape
            which = ""
            if names is not None:
                which = ": %s is %dx%dx%d, the batch's first item %s is %dx%dx%d" % (
                    names[i], c, h, w, names[0], first[0], first[1], first[2])
            if c != shape[0]:
                self._fail("Check failed: channels == datum_channels (%d vs. %d)%s"
                           % (shape[0], c, which), "data_transformer.cpp:122")
            if not self.crop_h and (h, w) != shape[1:]:
                self._fail("Check failed: datum_height == height (%d vs. %d): items of a batch "
                           "differ in size%s (set crop_size, or resize them)"
                           % (h, shape[1], which), "data_transformer.cpp:133")
            if self.needs_rand:
                m, ho, wo = self.draw(1, h, w)
                out[i] = self.apply(it[None], m, ho, wo)[0]
            else:
                out[i] = self.apply(it[None])[0]
        return out


# ----------------------------------------------------------------------------- images
def resize_linear_cv(img, new_h, new_w):
    """``cv::resize(..., INTER_LINEAR)`` of a uint8 (C, H, W) image, OpenCV's fixed-point
    formula (11-bit coefficients, rounding shift of 22): half-pixel centres, edges clamped."""
    img = np.asarray(img)
    c, h, w = img.shape
    if (h, w) == (new_h, new_w):
        return img.copy()

    def coeffs(src, dst):
        scale = src / dst
        f = ((np.arange(dst, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
        s = np.floor(f).astype(np.int64)
        f = (f - s).astype(np.float32)
        low = s < 0
        f[low] = 0
        s[low] = 0
        high = s >= src - 1
        f[high] = 0
        s[high] = src - 1
        a1 = np.rint(f * 2048).astype(np.int64)
        a0 = np.rint((np.float32(1) - f) * 2048).astype(np.int64)
        s1 = np.minimum(s + 1, src - 1)
        return s, s1, a0, a1

    xs0, xs1, xa0, xa1 = coeffs(w, new_w)
    ys0, ys1, yb0, yb1 = coeffs(h, new_h)
    src = img.astype(np.int64)
    rows = src[:, :, xs0] * xa0 + src[:, :, xs1] * xa1          # (C, H, new_w), scaled 2^11
    out = rows[:, ys0, :] * yb0[:, None] + rows[:, ys1, :] * yb1[:, None]
    out = (out + (1 << 21)) >> 22
    return np.clip(out, 0, 255).astype(np.uint8)
