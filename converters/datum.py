"""Decoding and encoding of LMDB records: ``Datum`` and SSD's ``AnnotatedDatum``.

Decoding reproduces what Caffe's data layers see:

* raw ``data`` (uint8, C x H x W as stored) or ``float_data`` (float32), with ``label``;
* ``encoded`` images decoded as OpenCV's ``cv::imdecode`` does (``DecodeDatumToCVMat*``):
  channels in **BGR** order, returned C x H x W uint8. ``color=None`` is
  ``CV_LOAD_IMAGE_ANYCOLOR`` (gray stays 1 channel, anything else becomes 3, alpha dropped,
  what ``DecodeDatumToCVMatNative`` gives), ``True`` forces 3 channels (``IMREAD_COLOR``,
  ``force_color`` / ``is_color``), ``False`` forces 1 (``IMREAD_GRAYSCALE``; JPEGs give
  libjpeg's own luma, as OpenCV's decoder does). Decoding uses pillow; for baseline JPEGs
  libjpeg(-turbo) gives the same pixels as OpenCV's decoder. EXIF orientation is not applied.

Annotations come back as plain Python structures (see :func:`decode_annotated_datum`).
"""
import io

import numpy as np
from google.protobuf.message import DecodeError

from . import caffe_pb2
from .errors import CaffeError

__all__ = ["parse_datum", "datum_to_array", "decode_datum", "decode_image",
           "decode_annotated_datum", "annotation_groups", "annotation_rows", "make_datum",
           "make_annotated_datum", "encode_image"]


def _where(key):
    if key is None:
        return ""
    if isinstance(key, (bytes, bytearray)):
        key = bytes(key).decode("utf-8", "backslashreplace")
    return " (key %s)" % key


def _parse(message, data, key, what):
    try:
        message.ParseFromString(bytes(data))
    except (DecodeError, RuntimeError, ValueError, TypeError) as exc:
        raise CaffeError("Corrupt %s record%s: %s" % (what, _where(key), exc)) from None
    return message


def parse_datum(data, key=None):
    """Parse serialized bytes into a ``caffe_pb2.Datum`` (CaffeError naming ``key`` if corrupt)."""
    return _parse(caffe_pb2.Datum(), data, key, "Datum")


def decode_image(encoded, color=None, key=None):
    """Decode JPEG/PNG/... bytes like ``cv::imdecode``: C x H x W uint8, BGR channel order."""
    from PIL import Image, UnidentifiedImageError
    try:
        img = Image.open(io.BytesIO(bytes(encoded)))
        if color is False and img.format == "JPEG" and img.mode != "L":
            img.draft("L", img.size)  # libjpeg outputs its luma, as OpenCV's decoder does
        img.load()
    except UnidentifiedImageError:
        raise CaffeError("Could not decode encoded image%s: not a known image format"
                         % _where(key)) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise CaffeError("Could not decode encoded image%s: %s" % (_where(key), exc)) from None
    mode = img.mode
    gray = None  # the 8-bit single-channel image when the source is gray
    if mode.startswith("I;16") or mode == "I":
        gray = (np.asarray(img).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8)
    elif mode in ("L", "1", "LA") or (mode == "P" and _palette_is_gray(img)):
        gray = np.asarray(img.convert("L"))
    if color is None:
        color = gray is None
    if color:
        rgb = np.asarray(img.convert("RGB")) if gray is None else \
            np.repeat(gray[..., None], 3, axis=2)
        out = rgb[..., ::-1].transpose(2, 0, 1)
    else:
        if gray is None:  # color PNG etc. forced to gray (approximates libpng's conversion)
            gray = _bgr2gray(np.asarray(img.convert("RGB")))
        out = gray[None, :, :]
    return np.ascontiguousarray(out, dtype=np.uint8)


def _palette_is_gray(img):
    pal = img.getpalette() or []
    return all(pal[i] == pal[i + 1] == pal[i + 2] for i in range(0, len(pal) - 2, 3))


def _bgr2gray(rgb):
    """OpenCV's fixed-point RGB->gray (coefficients 0.299/0.587/0.114 in 14-bit fixed point)."""
    r = rgb[..., 0].astype(np.int32)
    g = rgb[..., 1].astype(np.int32)
    b = rgb[..., 2].astype(np.int32)
    y = (r * 4899 + g * 9617 + b * 1868 + (1 << 13)) >> 14
    return y.astype(np.uint8)


def datum_to_array(datum, color=None, key=None):
    """The pixels of a ``Datum`` message: uint8 C x H x W (raw or decoded) or float32."""
    if datum.encoded:
        return decode_image(datum.data, color=color, key=key)
    shape = (datum.channels, datum.height, datum.width)
    count = shape[0] * shape[1] * shape[2]
    if len(datum.data) > 0:
        if len(datum.data) != count:
            raise CaffeError("Corrupt Datum record%s: %d bytes of data for %dx%dx%d"
                             % ((_where(key), len(datum.data)) + shape))
        return np.frombuffer(datum.data, dtype=np.uint8).reshape(shape).copy()
    if len(datum.float_data) != count:
        raise CaffeError("Corrupt Datum record%s: %d float_data values for %dx%dx%d"
                         % ((_where(key), len(datum.float_data)) + shape))
    return np.asarray(datum.float_data, dtype=np.float32).reshape(shape)


def decode_datum(data, key=None, color=None):
    """Serialized ``Datum`` bytes -> (array C x H x W, label)."""
    datum = parse_datum(data, key)
    return datum_to_array(datum, color=color, key=key), datum.label


def annotation_groups(anno_datum):
    """The annotation groups of an AnnotatedDatum as plain structures::

        [{"group_label": int,
          "annotations": [{"instance_id": int, "xmin": f, "ymin": f, "xmax": f, "ymax": f,
                           "difficult": bool, "label": int|None, "score": f|None,
                           "size": f|None}, ...]}, ...]
    """
    groups = []
    for g in anno_datum.annotation_group:
        annos = []
        for a in g.annotation:
            b = a.bbox
            annos.append({
                "instance_id": int(a.instance_id),
                "xmin": float(b.xmin), "ymin": float(b.ymin),
                "xmax": float(b.xmax), "ymax": float(b.ymax),
                "difficult": bool(b.difficult),
                "label": int(b.label) if b.HasField("label") else None,
                "score": float(b.score) if b.HasField("score") else None,
                "size": float(b.size) if b.HasField("size") else None,
            })
        groups.append({"group_label": int(g.group_label), "annotations": annos})
    return groups


def annotation_rows(groups, item_id=0):
    """AnnotatedData's 8-column label rows ``[item_id, group_label, instance_id, xmin, ymin,
    xmax, ymax, difficult]`` (float32, N x 8), in group then annotation order."""
    rows = [[item_id, g["group_label"], a["instance_id"], a["xmin"], a["ymin"], a["xmax"],
             a["ymax"], float(a["difficult"])] for g in groups for a in g["annotations"]]
    return np.asarray(rows, dtype=np.float32).reshape(-1, 8)


def decode_annotated_datum(data, key=None, color=None):
    """Serialized ``AnnotatedDatum`` -> (image C x H x W, BGR for encoded images, groups).

    ``groups`` is :func:`annotation_groups`'s list. Use :func:`parse_datum`-like access via
    ``caffe_pb2.AnnotatedDatum`` for the ``type`` field and ``datum.label``.
    """
    anno = _parse(caffe_pb2.AnnotatedDatum(), data, key, "AnnotatedDatum")
    if not anno.HasField("datum"):
        raise CaffeError("Corrupt AnnotatedDatum record%s: no datum" % _where(key))
    return datum_to_array(anno.datum, color=color, key=key), annotation_groups(anno)


# ---------------------------------------------------------------------------------------------
# Encoding (for tools that build LMDBs)

def encode_image(array, fmt="jpg", quality=95):
    """Encode a C x H x W uint8 BGR (or 1 x H x W gray) array as JPEG/PNG bytes
    (``cv::imencode``; JPEG quality 95 is OpenCV's default, as ``convert_imageset`` uses)."""
    from PIL import Image
    arr = np.asarray(array)
    if arr.ndim != 3 or arr.shape[0] not in (1, 3):
        raise CaffeError("encode_image needs a 1xHxW or 3xHxW array, got shape %s" % (arr.shape,))
    arr = arr.astype(np.uint8)
    if arr.shape[0] == 1:
        img = Image.fromarray(arr[0], mode="L")
    else:
        img = Image.fromarray(np.ascontiguousarray(arr[::-1].transpose(1, 2, 0)), mode="RGB")
    buf = io.BytesIO()
    fmt = fmt.lower().lstrip(".")
    if fmt in ("jpg", "jpeg"):
        img.save(buf, format="JPEG", quality=quality)
    elif fmt == "png":
        img.save(buf, format="PNG")
    else:
        raise CaffeError("Unsupported image encoding: %s (use jpg or png)" % fmt)
    return buf.getvalue()


def make_datum(array, label=0, encoded=None):
    """A ``Datum`` for ``array`` (C x H x W) and ``label``.

    ``encoded=None``: uint8 arrays go to ``data``, other dtypes to ``float_data``.
    ``encoded="jpg"``/``"png"``: the (BGR) array is encoded and ``encoded: true`` is set;
    ``encoded=<bytes>``: those bytes are stored as the encoded image (shape from ``array``).
    """
    arr = np.asarray(array)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise CaffeError("make_datum needs a CxHxW array, got shape %s" % (arr.shape,))
    datum = caffe_pb2.Datum(channels=arr.shape[0], height=arr.shape[1], width=arr.shape[2],
                            label=int(label))
    if encoded is None:
        if arr.dtype == np.uint8:
            datum.data = arr.tobytes()
        else:
            datum.float_data.extend(np.asarray(arr, dtype=np.float32).ravel().tolist())
    else:
        datum.data = bytes(encoded) if isinstance(encoded, (bytes, bytearray)) \
            else encode_image(arr, encoded)
        datum.encoded = True
    return datum


def make_annotated_datum(datum, groups):
    """An ``AnnotatedDatum`` (type BBOX) from a Datum and :func:`annotation_groups`-style groups."""
    anno = caffe_pb2.AnnotatedDatum(type=caffe_pb2.AnnotatedDatum.BBOX)
    anno.datum.CopyFrom(datum)
    for g in groups:
        group = anno.annotation_group.add(group_label=int(g["group_label"]))
        for a in g["annotations"]:
            item = group.annotation.add(instance_id=int(a.get("instance_id", 0)))
            b = item.bbox
            b.xmin, b.ymin, b.xmax, b.ymax = a["xmin"], a["ymin"], a["xmax"], a["ymax"]
            b.difficult = bool(a.get("difficult", False))
            for opt in ("label", "score", "size"):
                if a.get(opt) is not None:
                    setattr(b, opt, a[opt])
    return anno
