"""OpenCV's 8-bit image operations that SSD-Caffe's data pipeline uses, in numpy (no torch).

Images here are ``H x W x C`` uint8 arrays in **BGR** order (OpenCV's ``cv::Mat`` layout, C 1 or
3). SSD-Caffe (``im_transforms.cpp``, ``data_transformer.cpp``) calls ``cv::resize``,
``cv::cvtColor`` (BGR<->HSV, gray, YCrCb), ``Mat::convertTo``, ``cv::copyMakeBorder``,
``cv::imencode``/``imdecode`` and a few filters; they are reproduced here as follows.

``resize`` (``cv::resize`` of OpenCV 4.x on 8-bit images, SSE2 baseline build)
    * same size: a copy (OpenCV's shortcut).
    * ``INTER_LINEAR``: OpenCV's fixed-point path, bit-exact: horizontal taps at half-pixel
      centres ``(dx + 0.5) * scale - 0.5`` clamped to the image, 11-bit integer weights
      (``saturate_cast<short>(w * 2048)``, round half to even); the vertical weights are *not*
      clamped (the rows are: row ``-1`` reads row 0), and the vertical pass is the SIMD kernel
      ``((((r0 >> 4) * b0) >> 16) + (((r1 >> 4) * b1) >> 16) + 2) >> 2`` for the first
      ``8 * floor(W * C / 8)`` values of a row, the scalar ``(r0 * b0 + r1 * b1 + 2^21) >> 22``
      for the rest. An exact 2x downscale in both directions is ``INTER_AREA`` (OpenCV
      switches). This reproduces SSD-Caffe's outputs of refs/ssd/annotated_data bit for bit.
    * ``INTER_NEAREST``: ``sx = floor(dx * (1 / inv_scale))`` (top-left rule, not pixel
      centres; pillow's NEAREST differs), exact.
    * ``INTER_AREA``: downscaling: integer factors average the cell (``(s + 2) >> 2`` for 2x2,
      ``cvRound(s / area)`` otherwise), other factors use OpenCV's area table with float32
      accumulation in OpenCV's order; upscaling: OpenCV's bilinear emulation (area
      coordinates, then the fixed-point linear kernel). pillow's BOX filter is *not* used (it
      differs from OpenCV's INTER_AREA at fractional factors).
    * ``INTER_CUBIC`` (a = -0.75) and ``INTER_LANCZOS4``: OpenCV's coefficient formulas and
      11-bit fixed point, replicated borders; cubic's vertical pass follows OpenCV's float
      SIMD kernel (float32 multiply-add order, round half to even), Lanczos4's the integer
      kernel. Faithful to the formulas; not compared against an OpenCV build here (an IPP build
      of OpenCV may route cubic/Lanczos/area elsewhere).

Colour conversions follow OpenCV's 8-bit formulas (BGR->HSV with its 12-bit division tables,
HSV->BGR through float32 with H in [0, 180); gray and YCrCb with 14-bit fixed point);
``convertTo`` is ``saturate_cast<uchar>(v * alpha + beta)`` in float32, round half to even.
JPEG encoding (``cv::imencode(".jpg")``, quality 95) uses pillow's libjpeg(-turbo) with the
same defaults (4:2:0, baseline, islow DCT). Gaussian blur (7x7, sigma 1.5) is a float
approximation of OpenCV's bit-exact kernel (may differ by 1).
"""
import io
import math

import numpy as np

from converters.errors import CaffeError

# OpenCV's interpolation codes.
INTER_NEAREST, INTER_LINEAR, INTER_CUBIC, INTER_AREA, INTER_LANCZOS4 = 0, 1, 2, 3, 4
INTER_NAMES = {INTER_NEAREST: "NEAREST", INTER_LINEAR: "LINEAR", INTER_CUBIC: "CUBIC",
               INTER_AREA: "AREA", INTER_LANCZOS4: "LANCZOS4"}

# OpenCV's border codes used by SSD's resize_param.pad_mode.
BORDER_CONSTANT, BORDER_REPLICATE, BORDER_REFLECT101 = 0, 1, 4

_F32 = np.float32
_COEF_BITS = 11
_COEF_SCALE = 1 << _COEF_BITS


def _hwc(img):
    img = np.asarray(img)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.dtype != np.uint8:
        raise ValueError("expected an HxWxC uint8 image, got %s %s" % (img.dtype, img.shape))
    return img


# ----------------------------------------------------------------------------- codecs
# ``rgb=True`` variants keep 3-channel images in pillow's RGB order: the AnnotatedData pipeline
# works in RGB internally (no channel flips of large images between its JPEG round trips) and
# flips once at the end. Functions whose result depends on the channel order take ``rgb``.

def _pil_array(pil, channels):
    h, w = pil.size[1], pil.size[0]
    return np.frombuffer(pil.tobytes(), dtype=np.uint8).reshape(h, w, channels)


def decode(data, color=None, key=None, rgb=False):
    """``cv::imdecode`` of encoded bytes: HxWxC uint8, BGR (``rgb=True``: RGB). ``color``
    None: as stored (gray stays 1 channel, ``CV_LOAD_IMAGE_ANYCOLOR``), True: 3 channels,
    False: 1 channel (the rules of converters.datum.decode_image)."""
    from PIL import Image
    pil = None
    try:
        pil = Image.open(io.BytesIO(bytes(data)))
        if color is False and pil.format == "JPEG" and pil.mode != "L":
            pil.draft("L", pil.size)  # libjpeg's own luma, as OpenCV's decoder gives
        pil.load()
    except Exception:
        pil = None
    if pil is not None and pil.mode in ("RGB", "L"):
        if pil.mode == "L":
            arr = _pil_array(pil, 1)
            return np.repeat(arr, 3, axis=2) if color is True else arr
        arr = _pil_array(pil, 3)
        if color is False:
            return bgr2gray(arr, rgb=True)
        return arr if rgb else np.ascontiguousarray(arr[:, :, ::-1])
    # Other modes (palette, 16-bit, alpha, ...) and errors: converters.datum's decoder.
    from converters.datum import decode_image
    chw = decode_image(data, color=color, key=key)
    if rgb and chw.shape[0] == 3:
        chw = chw[::-1]
    return np.ascontiguousarray(chw.transpose(1, 2, 0))


def encode(img, fmt="jpg", quality=95, rgb=False):
    """``cv::imencode("." + fmt)`` of an HxWxC image (BGR; ``rgb=True``: RGB). JPEG quality
    95 is OpenCV's default."""
    from PIL import Image
    img = _hwc(img)
    if img.shape[2] == 1:
        arr = np.ascontiguousarray(img[:, :, 0])
        pil = Image.frombuffer("L", (img.shape[1], img.shape[0]), arr, "raw", "L", 0, 1)
    elif img.shape[2] == 3:
        arr = img if rgb else img[:, :, ::-1]
        arr = np.ascontiguousarray(arr)
        pil = Image.frombuffer("RGB", (img.shape[1], img.shape[0]), arr, "raw", "RGB", 0, 1)
    else:
        raise CaffeError("cannot encode an image with %d channels" % img.shape[2])
    buf = io.BytesIO()
    fmt = fmt.lower().lstrip(".")
    if fmt in ("jpg", "jpeg"):
        pil.save(buf, format="JPEG", quality=int(quality))
    elif fmt == "png":
        pil.save(buf, format="PNG")
    elif fmt == "bmp":
        pil.save(buf, format="BMP")
    else:
        raise CaffeError("Unsupported image encoding: %s (use jpg or png)" % fmt)
    return buf.getvalue()


def jpeg_roundtrip(img, color=None, rgb=False):
    """What SSD-Caffe does between its augmentation steps on encoded data: ``EncodeCVMatToDatum(
    img, "jpg")`` and decode again (``color`` as the transformer's force_color/force_gray)."""
    return decode(encode(img, "jpg", rgb=rgb), color=color, rgb=rgb)


# ----------------------------------------------------------------------------- rounding helpers
def _sat_u8_int(v):
    return np.clip(v, 0, 255).astype(np.uint8)


def _round_f32_to_u8(v):
    """``saturate_cast<uchar>(float)``: round half to even, then clamp."""
    return np.clip(np.rint(v), 0, 255).astype(np.uint8)


def _fixed_coeffs(c):
    """``saturate_cast<short>(coef * INTER_RESIZE_COEF_SCALE)`` for float32 coefficients."""
    return np.clip(np.rint(c.astype(_F32) * _F32(_COEF_SCALE)), -32768, 32767).astype(np.int64)


# ----------------------------------------------------------------------------- resize
def _cubic_coeffs(x):
    """OpenCV's interpolateCubic (A = -0.75), float32, for an array of fractions ``x``."""
    a = _F32(-0.75)
    x = x.astype(_F32)
    one = _F32(1)
    c0 = ((a * (x + one) - _F32(5) * a) * (x + one) + _F32(8) * a) * (x + one) - _F32(4) * a
    c1 = ((a + _F32(2)) * x - (a + _F32(3))) * x * x + one
    c2 = ((a + _F32(2)) * (one - x) - (a + _F32(3))) * (one - x) * (one - x) + one
    c3 = one - c0 - c1 - c2
    return np.stack([c0, c1, c2, c3], axis=-1).astype(_F32)


def _lanczos4_coeffs(x):
    """OpenCV's interpolateLanczos4 for an array of fractions ``x`` (float32 results)."""
    s45 = 0.70710678118654752440084436210485
    cs = ((1, 0), (-s45, -s45), (0, 1), (s45, -s45), (-1, 0), (s45, s45), (0, -1), (-s45, s45))
    x = x.astype(_F32)
    y0 = -(x + _F32(3)).astype(np.float64) * math.pi * 0.25
    s0, c0 = np.sin(y0), np.cos(y0)
    coeffs = np.empty(x.shape + (8,), dtype=_F32)
    total = np.zeros(x.shape, dtype=_F32)
    for i in range(8):
        yi = (x + _F32(3)) - _F32(i)
        y = -yi.astype(np.float64) * math.pi * 0.25
        with np.errstate(divide="ignore", invalid="ignore"):
            val = ((cs[i][0] * s0 + cs[i][1] * c0) / (y * y)).astype(_F32)
        val = np.where(np.abs(yi) >= _F32(1e-6), val, _F32(1e30))
        coeffs[..., i] = val
        total = (total + val).astype(_F32)
    inv = (_F32(1) / total).astype(_F32)
    return (coeffs * inv[..., None]).astype(_F32)


def _positions(dsize, scale, inv_scale, area_mode):
    """Source index and fraction of each destination index (OpenCV's resize tables)."""
    d = np.arange(dsize, dtype=np.float64)
    if area_mode:
        s = np.floor(d * scale).astype(np.int64)
        f = ((d + 1) - (s + 1) * inv_scale).astype(_F32)
        f = np.where(f <= 0, _F32(0), (f - np.floor(f)).astype(_F32)).astype(_F32)
    else:
        f = ((d + 0.5) * scale - 0.5).astype(_F32)
        s = np.floor(f).astype(np.int64)
        f = (f - s.astype(_F32)).astype(_F32)
    return s, f


def _generic(img, dw, dh, interp, scale_x, scale_y, inv_x, inv_y):
    """OpenCV's resizeGeneric_ for 8-bit images (linear / area-upscale / cubic / Lanczos4)."""
    sh, sw, cn = img.shape
    area_mode = interp == INTER_AREA
    if interp == INTER_CUBIC:
        ksize = 4
    elif interp == INTER_LANCZOS4:
        ksize = 8
    else:
        ksize = 2
    half = ksize // 2
    sx, fx = _positions(dw, scale_x, inv_x, area_mode)
    sy, fy = _positions(dh, scale_y, inv_y, area_mode)
    if ksize == 2:
        # x: clamp the position (OpenCV does for linear/area); y is left alone.
        low = sx < 0
        fx = np.where(low, _F32(0), fx)
        sx = np.where(low, 0, sx)
        high = sx >= sw - 1
        fx = np.where(high, _F32(0), fx)
        sx = np.where(high, sw - 1, sx)
        cx = np.stack([_F32(1) - fx, fx], axis=-1)
        cy = np.stack([_F32(1) - fy, fy], axis=-1)
    elif ksize == 4:
        cx, cy = _cubic_coeffs(fx), _cubic_coeffs(fy)
    else:
        cx, cy = _lanczos4_coeffs(fx), _lanczos4_coeffs(fy)
    ax = _fixed_coeffs(cx).astype(np.int32)          # (dw, ksize)
    by = _fixed_coeffs(cy)                           # (dh, ksize)
    # Horizontal pass (integer, exact in any order) of the source rows the output needs:
    # taps at sx - half + 1 + k, replicated at the borders.
    taps_x = np.clip(sx[:, None] - half + 1 + np.arange(ksize)[None, :], 0, sw - 1)
    rows_y = np.clip(sy[:, None] - half + 1 + np.arange(ksize)[None, :], 0, sh - 1)
    needed = np.unique(rows_y)
    where = np.searchsorted(needed, rows_y)
    part = img[needed].reshape(len(needed), sw * cn)
    chan = np.arange(cn)
    width = dw * cn
    hrow = np.zeros((len(needed), width), dtype=np.int32)
    for k in range(ksize):
        cols = (taps_x[:, k, None] * cn + chan).reshape(-1)
        hrow += np.take(part, cols, axis=1) * np.repeat(ax[:, k], cn)
    rows = [hrow[where[:, k]] for k in range(ksize)]            # each (dh, width) int32
    b = [by[:, k][:, None] for k in range(ksize)]
    vec = (width // 8) * 8          # values an SSE2 build computes with its SIMD kernel
    out = np.empty((dh, width), dtype=np.int64)
    if vec < width:                 # the rest of each row: OpenCV's scalar fixed-point cast
        total = sum(r[:, vec:].astype(np.int64) * bb for r, bb in zip(rows, b))
        out[:, vec:] = (total + (1 << 21)) >> 22
    if ksize == 2:
        b32 = [bb.astype(np.int32) for bb in b]
        r0, r1 = rows[0][:, :vec], rows[1][:, :vec]
        out[:, :vec] = ((((r0 >> 4) * b32[0]) >> 16) + (((r1 >> 4) * b32[1]) >> 16) + 2) >> 2
    elif ksize == 4:
        scale = _F32(1.0 / (_COEF_SCALE * _COEF_SCALE))
        bf = [(by[:, k].astype(_F32) * scale)[:, None] for k in range(4)]
        rf = [r[:, :vec].astype(_F32) for r in rows]
        t = rf[3] * bf[3]
        for k in (2, 1, 0):
            t = rf[k] * bf[k] + t          # float32 multiply, then add (no FMA), as SSE2
        out[:, :vec] = np.clip(np.rint(t), -32768, 32767)
    else:
        total = sum(r[:, :vec].astype(np.int64) * bb for r, bb in zip(rows, b))
        out[:, :vec] = (total + (1 << 21)) >> 22
    return _sat_u8_int(out).reshape(dh, dw, cn)


def _area_taps(ssize, dsize, scale):
    """OpenCV's computeResizeAreaTab as padded (dsize, ntap) tables of source index and alpha,
    each destination's taps in table order (padding: alpha 0, which leaves a float32 sum as is).
    """
    dx = np.arange(dsize, dtype=np.float64)
    fsx1 = dx * scale
    fsx2 = fsx1 + scale
    cell = np.minimum(scale, ssize - fsx1)
    sx1 = np.ceil(fsx1).astype(np.int64)
    sx2 = np.minimum(np.floor(fsx2).astype(np.int64), ssize - 1)
    sx1 = np.minimum(sx1, sx2)
    left = (sx1 - fsx1) > 1e-3
    right = (fsx2 - sx2) > 1e-3
    full = sx2 - sx1
    count = left.astype(np.int64) + full + right
    ntap = max(1, int(count.max()))
    j = np.arange(ntap)[None, :]
    lf = left.astype(np.int64)[:, None]
    inner = j - lf                                   # index within the full-pixel run
    src = np.where(j < lf, (sx1 - 1)[:, None],
                   np.where(inner < full[:, None], sx1[:, None] + inner, sx2[:, None]))
    alpha_left = ((sx1 - fsx1) / cell).astype(_F32)
    alpha_full = (1.0 / cell).astype(_F32)
    alpha_right = (np.minimum(np.minimum(fsx2 - sx2, 1.0), cell) / cell).astype(_F32)
    alpha = np.where(j < lf, alpha_left[:, None],
                     np.where(inner < full[:, None], alpha_full[:, None],
                              alpha_right[:, None])).astype(_F32)
    alpha[j >= count[:, None]] = 0
    src = np.clip(np.where(j >= count[:, None], 0, src), 0, ssize - 1)
    return src, alpha


def _area_generic(img, dw, dh, scale_x, scale_y):
    """OpenCV's resizeArea_<uchar, float> (non-integer downscale), float32 in OpenCV's order."""
    sh, sw, cn = img.shape
    xsrc, xalpha = _area_taps(sw, dw, scale_x)
    ysrc, ybeta = _area_taps(sh, dh, scale_y)
    # x pass of the source rows that are used (taps added in table order).
    needed = np.unique(ysrc)
    where = np.searchsorted(needed, ysrc)
    part = img[needed].reshape(len(needed), sw * cn)
    chan = np.arange(cn)
    buf = np.zeros((len(needed), dw * cn), dtype=_F32)
    for t in range(xsrc.shape[1]):
        cols = (xsrc[:, t, None] * cn + chan).reshape(-1)
        buf += np.take(part, cols, axis=1) * np.repeat(xalpha[:, t], cn)
    # y pass: per destination row, its (row, beta) taps in table order.
    acc = ybeta[:, 0, None] * buf[where[:, 0]]
    for t in range(1, ysrc.shape[1]):
        acc += ybeta[:, t, None] * buf[where[:, t]]
    return _round_f32_to_u8(acc).reshape(dh, dw, cn)


def _area_fast(img, dw, dh, ix, iy):
    """OpenCV's resizeAreaFast_ (integer downscale factors)."""
    sh, sw, cn = img.shape
    block = img[:dh * iy, :dw * ix].astype(np.int64).reshape(dh, iy, dw, ix, cn)
    total = block.sum(axis=(1, 3))
    if ix == 2 and iy == 2:
        return _sat_u8_int((total + 2) >> 2)
    scale = _F32(1.0) / _F32(ix * iy)
    return _round_f32_to_u8(total.astype(_F32) * scale)


def _nearest(img, dw, dh, inv_x, inv_y):
    sh, sw, _ = img.shape
    ifx, ify = 1.0 / inv_x, 1.0 / inv_y
    sx = np.minimum(np.floor(np.arange(dw) * ifx).astype(np.int64), sw - 1)
    sy = np.minimum(np.floor(np.arange(dh) * ify).astype(np.int64), sh - 1)
    return np.ascontiguousarray(img[sy][:, sx])


def resize(img, width, height, interp=INTER_LINEAR, fx=0.0, fy=0.0):
    """``cv::resize(img, out, cv::Size(width, height), fx, fy, interp)`` for 8-bit images.

    ``width``/``height`` 0 with ``fx``/``fy`` given: the size is ``round(src * f)`` and the
    scale is ``f`` itself (OpenCV's rule)."""
    img = _hwc(img)
    sh, sw, cn = img.shape
    if width > 0 and height > 0:
        dw, dh = int(width), int(height)
        inv_x, inv_y = dw / sw, dh / sh
    else:
        if fx <= 0 or fy <= 0:
            raise CaffeError("resize: give a size or positive scale factors")
        dw, dh = int(round(sw * fx)), int(round(sh * fy))
        inv_x, inv_y = float(fx), float(fy)
    if dw <= 0 or dh <= 0 or sw <= 0 or sh <= 0:
        raise CaffeError("resize: empty image (%dx%d -> %dx%d)" % (sw, sh, dw, dh))
    if (dw, dh) == (sw, sh):
        return img.copy()
    if interp not in INTER_NAMES:
        raise CaffeError("Unknown interpolation method %r" % (interp,))
    if interp == INTER_NEAREST:
        return _nearest(img, dw, dh, inv_x, inv_y)
    scale_x, scale_y = 1.0 / inv_x, 1.0 / inv_y
    ix, iy = int(round(scale_x)), int(round(scale_y))
    area_fast = abs(scale_x - ix) < 2.220446049250313e-16 and \
        abs(scale_y - iy) < 2.220446049250313e-16
    if interp == INTER_LINEAR and area_fast and ix == 2 and iy == 2:
        interp = INTER_AREA
    if interp == INTER_AREA and scale_x >= 1 and scale_y >= 1:
        if area_fast:
            return _area_fast(img, dw, dh, ix, iy)
        return _area_generic(img, dw, dh, scale_x, scale_y)
    return _generic(img, dw, dh, interp, scale_x, scale_y, inv_x, inv_y)


def copy_make_border(img, top, bottom, left, right, mode=BORDER_CONSTANT, value=(0, 0, 0)):
    """``cv::copyMakeBorder`` for CONSTANT (``value`` per channel), REPLICATE, REFLECT_101."""
    img = _hwc(img)
    pad = ((int(top), int(bottom)), (int(left), int(right)), (0, 0))
    if mode == BORDER_CONSTANT:
        out = np.empty((img.shape[0] + top + bottom, img.shape[1] + left + right, img.shape[2]),
                       dtype=np.uint8)
        vals = [int(np.clip(np.rint(v), 0, 255)) for v in value]
        for c in range(img.shape[2]):
            out[:, :, c] = vals[c] if c < len(vals) else 0
        out[top:top + img.shape[0], left:left + img.shape[1]] = img
        return out
    if mode == BORDER_REPLICATE:
        return np.pad(img, pad, mode="edge")
    if mode == BORDER_REFLECT101:
        return np.pad(img, pad, mode="reflect")     # numpy's "reflect" is OpenCV's 101
    raise CaffeError("Unknown pad mode %r" % (mode,))


# ----------------------------------------------------------------------------- colour
def convert_scale(img, alpha=1.0, beta=0.0):
    """``Mat::convertTo(out, -1, alpha, beta)`` on uint8: float32 ``v * alpha + beta``, rounded
    half to even and saturated."""
    v = img.astype(_F32) * _F32(alpha) + _F32(beta)
    return _round_f32_to_u8(v)


def _hsv_tables():
    i = np.arange(256, dtype=np.float64)
    with np.errstate(divide="ignore"):
        sdiv = np.where(i > 0, np.rint((255 << 12) / np.maximum(i, 1)), 0).astype(np.int64)
        hdiv = np.where(i > 0, np.rint((180 << 12) / (6.0 * np.maximum(i, 1))), 0).astype(np.int64)
    return sdiv, hdiv


_SDIV, _HDIV180 = (t.astype(np.int32) for t in _hsv_tables())


def _bgr_planes(img, rgb, dtype=np.int32):
    b, g, r = (img[:, :, 2], img[:, :, 1], img[:, :, 0]) if rgb else \
        (img[:, :, 0], img[:, :, 1], img[:, :, 2])
    return b.astype(dtype), g.astype(dtype), r.astype(dtype)


def _from_bgr_planes(b, g, r, rgb):
    return np.stack([r, g, b] if rgb else [b, g, r], axis=-1)


def bgr2hsv(img, rgb=False):
    """``cv::cvtColor(img, CV_BGR2HSV)`` on 8 bits (H in [0, 180), S and V in [0, 255])."""
    img = _hwc(img)
    if img.shape[2] != 3:
        raise CaffeError("BGR2HSV needs a 3-channel image (got %d channels)" % img.shape[2])
    b, g, r = _bgr_planes(img, rgb)
    v = np.maximum(np.maximum(b, g), r)
    vmin = np.minimum(np.minimum(b, g), r)
    diff = v - vmin
    vr = v == r
    vg = v == g
    s = (diff * _SDIV[v] + (1 << 11)) >> 12
    h = np.where(vr, g - b, np.where(vg, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HDIV180[diff] + (1 << 11)) >> 12
    h = np.where(h < 0, h + 180, h)
    return np.stack([h, s, v], axis=-1).astype(np.uint8)


_SECTOR = np.array([[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]])
_SECTOR_SHIFT = [np.ascontiguousarray(_SECTOR[:, c].astype("<u4") * 8) for c in range(3)]


def hsv2bgr(img, rgb=False):
    """``cv::cvtColor(img, CV_HSV2BGR)`` on 8 bits (through float32, H scaled by 6/180; H values
    of 180..255 wrap as OpenCV's fmod does)."""
    img = _hwc(img)
    one = _F32(1)
    inv255 = one / _F32(255)
    h = img[:, :, 0].astype(_F32)
    h *= _F32(6) / _F32(180)
    np.fmod(h, _F32(6.0), out=h)
    sector = h.astype(np.int8)                 # floor: h >= 0
    h -= sector
    s = img[:, :, 1] * inv255                  # float32
    v = img[:, :, 2] * inv255
    scale = _F32(255.0)
    # The four values a pixel's channels pick from (all equal to v when s == 0), packed as the
    # bytes of one little-endian uint32 per pixel; a channel is a per-pixel shift.
    packed = np.empty(img.shape[:2] + (4,), dtype=np.uint8)
    for i, val in enumerate((v, v * (one - s), v * (one - s * h), v * (one - s * (one - h)))):
        val = val * scale
        np.rint(val, out=val)                  # in [0, 255]: no saturation needed
        packed[:, :, i] = val
    word = packed.view("<u4")[:, :, 0]
    out = np.empty(img.shape, dtype=np.uint8)
    for c in range(3):
        out[:, :, 2 - c if rgb else c] = word >> _SECTOR_SHIFT[c][sector]
    return out


def bgr2gray(img, rgb=False):
    """``CV_BGR2GRAY`` (14-bit fixed point: 0.114 B + 0.587 G + 0.299 R)."""
    img = _hwc(img)
    if img.shape[2] == 1:
        return img.copy()
    b, g, r = _bgr_planes(img, rgb)
    y = (b * 1868 + g * 9617 + r * 4899 + (1 << 13)) >> 14
    return y.astype(np.uint8)[:, :, None]


def gray2bgr(img):
    img = _hwc(img)
    return np.repeat(img[:, :, :1], 3, axis=2)


def bgr2ycrcb(img, rgb=False):
    """``CV_BGR2YCrCb`` on 8 bits (the result is Y, Cr, Cb whatever ``rgb``)."""
    b, g, r = _bgr_planes(img, rgb)
    y = (b * 1868 + g * 9617 + r * 4899 + (1 << 13)) >> 14
    cr = ((r - y) * 11682 + (128 << 14) + (1 << 13)) >> 14
    cb = ((b - y) * 9241 + (128 << 14) + (1 << 13)) >> 14
    return np.stack([_sat_u8_int(y), _sat_u8_int(cr), _sat_u8_int(cb)], axis=-1)


def ycrcb2bgr(img, rgb=False):
    y, cr, cb = (img[:, :, c].astype(np.int32) for c in range(3))
    cr = cr - 128
    cb = cb - 128
    r = y + ((cr * 22987 + (1 << 13)) >> 14)
    g = y + ((cr * -11698 + cb * -5636 + (1 << 13)) >> 14)
    b = y + ((cb * 29049 + (1 << 13)) >> 14)
    return _from_bgr_planes(_sat_u8_int(b), _sat_u8_int(g), _sat_u8_int(r), rgb)


def equalize_hist(plane):
    """``cv::equalizeHist`` of a 2-D uint8 plane."""
    hist = np.bincount(plane.ravel(), minlength=256)
    i = int(np.flatnonzero(hist)[0])
    total = plane.size
    if hist[i] == total:
        return np.full_like(plane, i)
    scale = _F32(255.0) / _F32(total - hist[i])
    lut = np.zeros(256, dtype=np.uint8)
    csum = np.cumsum(hist[i + 1:])
    lut[i + 1:] = _round_f32_to_u8(csum.astype(_F32) * scale)
    return lut[plane]


# ----------------------------------------------------------------------------- SSD distortions
def adjust_brightness(img, delta):
    return convert_scale(img, 1.0, delta) if abs(delta) > 0 else img


def adjust_contrast(img, delta):
    return convert_scale(img, delta, 0.0) if abs(delta - 1.0) > 1e-3 else img


def adjust_saturation(img, delta, rgb=False):
    # SSD-Caffe's test is `fabs(delta - 1.f) != 1e-3`: always true in practice.
    hsv = bgr2hsv(img, rgb)
    hsv[:, :, 1] = convert_scale(hsv[:, :, 1:2], delta, 0.0)[:, :, 0]
    return hsv2bgr(hsv, rgb)


def adjust_hue(img, delta, rgb=False):
    if not abs(delta) > 0:
        return img
    hsv = bgr2hsv(img, rgb)
    hsv[:, :, 0] = convert_scale(hsv[:, :, 0:1], 1.0, delta)[:, :, 0]
    return hsv2bgr(hsv, rgb)


# ----------------------------------------------------------------------------- SSD noise
def gaussian_blur7(img, sigma=1.5):
    """``cv::GaussianBlur(img, out, Size(7, 7), 1.5)`` (float approximation, reflect-101)."""
    k = np.exp(-((np.arange(7) - 3.0) ** 2) / (2 * sigma * sigma))
    k = (k / k.sum()).astype(np.float64)
    x = np.pad(img.astype(np.float64), ((3, 3), (3, 3), (0, 0)), mode="reflect")
    h = sum(k[i] * x[:, i:i + img.shape[1]] for i in range(7))
    v = sum(k[i] * h[i:i + img.shape[0]] for i in range(7))
    return _sat_u8_int(np.rint(v).astype(np.int64))


def erode_cross3(img):
    """``cv::erode`` with the 3x3 ellipse (a cross), border pixels ignored (OpenCV's default)."""
    big = np.full((img.shape[0] + 2, img.shape[1] + 2, img.shape[2]), 255, dtype=np.uint8)
    big[1:-1, 1:-1] = img
    h, w = img.shape[:2]
    out = img.copy()
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        np.minimum(out, big[dy:dy + h, dx:dx + w], out=out)
    return out


def posterize(img, div=64):
    """SSD's colorReduce: ``v / div * div + div / 2``."""
    lut = (np.arange(256) // div * div + div // 2).astype(np.uint8)
    return lut[img]
