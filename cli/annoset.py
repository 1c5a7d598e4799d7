"""``trainer create_annoset``: SSD-Caffe's ``convert_annoset`` / ``create_annoset.py``.

Builds an LMDB of ``AnnotatedDatum`` records (what SSD's AnnotatedData layer reads) from images
and their annotations::

    trainer create_annoset [options] ROOT LISTFILE DB

Each line of LISTFILE names an image relative to ROOT (Caffe concatenates ROOT and the path) and
its annotation:

* ``image_path annotation_path`` (``--anno-type detection``, the default): a VOC-style XML
  file (``annotation/size/{width,height}``; per ``object``: ``name`` mapped through
  ``--labelmap-file``, ``difficult``, ``bndbox/{xmin,ymin,xmax,ymax}`` in pixels) or, with
  ``--label-type txt`` or a ``.txt`` file, SSD's text format: one ``label xmin ymin xmax ymax``
  line per box (label an integer, pixels). A missing annotation file gives an image without
  boxes (as Caffe).
* ``image_path [label xmin ymin xmax ymax]...`` (inline boxes, our addition): the boxes on the
  line itself, ``label`` an integer or a labelmap name, coordinates in pixels of the image
  (a line with only the image path is an image without boxes).
* ``image_path label`` with ``--anno-type classification``: a Datum label, no boxes.

As Caffe: boxes are normalized by the image size (``xmin / width`` ..., no -1), grouped by
label in order of first appearance with ``instance_id`` counted within each group; the datum
label is -1; keys are ``%08d_<image_path>`` with the line number; images are stored encoded
(``--encode-type`` jpg/png; empty: the file's own bytes when no resize applies) or raw
(``--no-encoded``); ``--resize-width/--resize-height`` (0 = keep) or ``--min-dim/--max-dim``
resize with OpenCV's INTER_LINEAR (bit-exact port); ``--gray`` stores one channel. Progress is
logged as Caffe does ("A total of N images.", "Processed N files." every 1000 and at the end).
"""
import os
import random

import click
import numpy as np

from cli.main import main, report_errors
from converters import glog
from converters.errors import CaffeError

_F32 = np.float32


def _opt(*names, **kwargs):
    """An option under several spellings (--label-map-file, --label_map_file, ...)."""
    return click.option(*names, **kwargs)


class _Warn:
    def __init__(self):
        self.seen = set()

    def once(self, key, text):
        if key not in self.seen:
            self.seen.add(key)
            glog.warning(text)


# ----------------------------------------------------------------------------- annotations
class _Groups:
    """AnnotationGroups built in SSD's order (groups by first appearance of a label)."""

    def __init__(self):
        self.groups = []          # [(label, [annotation dicts])]

    def add(self, label, box, difficult=False):
        for g_label, annos in self.groups:
            if g_label == label:
                iid = annos[-1]["instance_id"] + 1 if annos else 0
                annos.append(dict(box, instance_id=iid, difficult=difficult))
                return
        self.groups.append((label, [dict(box, instance_id=0, difficult=difficult)]))

    def as_list(self):
        return [{"group_label": g, "annotations": a} for g, a in self.groups]


def _normalized(x0, y0, x1, y1, width, height):
    w, h = _F32(width), _F32(height)
    return {"xmin": float(_F32(x0) / w), "ymin": float(_F32(y0) / h),
            "xmax": float(_F32(x1) / w), "ymax": float(_F32(y1) / h)}


def _check_box(path, x0, y0, x1, y1, width, height):
    for v, lim in ((x0, width), (y0, height), (x1, width), (y1, height)):
        if v > lim:
            glog.warning("%s bounding box exceeds image boundary." % path)
        if v < 0:
            glog.warning("%s bounding box exceeds image boundary." % path)
    if x0 > x1 or y0 > y1:
        glog.warning("%s bounding box irregular." % path)


def _coord(text, path, warn):
    text = (text or "0").strip()
    try:
        return int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise CaffeError("%s: bounding box coordinate %r is not a number" % (path, text))
        warn.once(("float", path), "%s: non-integer box coordinate %s used as is (SSD-Caffe's "
                  "convert_annoset reads integers only and would store 0)" % (path, text))
        return value


def read_xml(path, img_w, img_h, name_to_label, warn):
    """SSD's ReadXMLToAnnotatedDatum: the groups of a VOC-style XML file."""
    import xml.etree.ElementTree as ET
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise CaffeError("Failed to parse %s: %s" % (path, exc))
    if root.tag != "annotation":
        node = root.find("annotation")
        root = node if node is not None else root
    width = height = 0
    size = root.find("size")
    try:
        height = int(size.find("height").text)
        width = int(size.find("width").text)
    except (AttributeError, TypeError, ValueError):
        glog.warning("When parsing %s: no annotation.size.width/height; using the image size"
                     % path)
        width, height = img_w, img_h
    if height != img_h:
        glog.warning("%s inconsistent image height." % path)
    if width != img_w:
        glog.warning("%s inconsistent image width." % path)
    if width == 0 or height == 0:
        raise CaffeError("%s no valid image width/height." % path)
    groups = _Groups()
    for obj in root.findall("object"):
        label = None
        difficult = False
        for child in obj:
            if child.tag == "name":
                name = (child.text or "").strip()
                if name not in name_to_label:
                    raise CaffeError("Unknown name: %s (in %s; not in the label map)"
                                     % (name, path))
                label = name_to_label[name]
            elif child.tag == "difficult":
                difficult = (child.text or "").strip() == "1"
            elif child.tag == "bndbox":
                if label is None:
                    raise CaffeError("%s: an object's bndbox comes before its name" % path)
                vals = [_coord(child.findtext(k), path, warn)
                        for k in ("xmin", "ymin", "xmax", "ymax")]
                _check_box(path, *vals, width, height)
                groups.add(label, _normalized(*vals, width, height), difficult)
    return groups


def _label_value(token, name_to_label, where):
    try:
        return int(token)
    except ValueError:
        if name_to_label is None:
            raise CaffeError("%s: label %r is not an integer and no --labelmap-file was given"
                             % (where, token))
        if token not in name_to_label:
            raise CaffeError("Unknown name: %s (%s; not in the label map)" % (token, where))
        return name_to_label[token]


def read_txt(path, img_w, img_h, name_to_label):
    """SSD's ReadTxtToAnnotatedDatum: ``label xmin ymin xmax ymax`` per line, in pixels."""
    groups = _Groups()
    with open(path) as f:
        tokens = f.read().split()
    for i in range(0, len(tokens) - len(tokens) % 5, 5):
        label = _label_value(tokens[i], name_to_label, path)
        try:
            x0, y0, x1, y1 = (float(t) for t in tokens[i + 1:i + 5])
        except ValueError:
            raise CaffeError("%s: bad box %s" % (path, " ".join(tokens[i:i + 5])))
        _check_box(path, x0, y0, x1, y1, img_w, img_h)
        groups.add(label, _normalized(x0, y0, x1, y1, img_w, img_h))
    return groups


def read_inline(tokens, img_w, img_h, name_to_label, where):
    groups = _Groups()
    for i in range(0, len(tokens), 5):
        label = _label_value(tokens[i], name_to_label, where)
        try:
            x0, y0, x1, y1 = (float(t) for t in tokens[i + 1:i + 5])
        except ValueError:
            raise CaffeError("%s: bad box %s" % (where, " ".join(tokens[i:i + 5])))
        _check_box(where, x0, y0, x1, y1, img_w, img_h)
        groups.add(label, _normalized(x0, y0, x1, y1, img_w, img_h))
    return groups


# ----------------------------------------------------------------------------- images
def read_image(path, color, resize_h, resize_w, min_dim, max_dim):
    """SSD's ReadImageToCVMat: (original bytes, original HxWxC BGR image, stored image)."""
    from layers import image_ops
    with open(path, "rb") as f:
        data = f.read()
    orig = image_ops.decode(data, color=color, key=path)
    img = orig
    h, w = orig.shape[:2]
    if min_dim > 0 or max_dim > 0:
        factor = _F32(1)
        small, large = min(h, w), max(h, w)
        if min_dim > 0 and small < min_dim:
            factor = _F32(min_dim) / _F32(small)
        if max_dim > 0 and int(factor * _F32(large)) > max_dim:
            factor = _F32(max_dim) / _F32(large)
        if factor != 1:
            img = image_ops.resize(orig, 0, 0, image_ops.INTER_LINEAR, float(factor),
                                   float(factor))
    elif resize_h > 0 and resize_w > 0:
        img = image_ops.resize(orig, resize_w, resize_h, image_ops.INTER_LINEAR)
    return data, orig, img


def _ext(path):
    return os.path.splitext(path)[1].lower().lstrip(".")


def _match_ext(path, enc):
    ext = _ext(path)
    return ext == enc or (enc == "jpg" and ext == "jpeg")


def make_datum(path, data, img, resized, color, encoded, encode_type, label):
    """ReadImageToDatum: an encoded (file bytes or re-encoded) or raw Datum."""
    from converters import caffe_pb2
    from layers import image_ops
    datum = caffe_pb2.Datum()
    h, w, c = img.shape
    datum.channels, datum.height, datum.width = c, h, w
    datum.label = int(label)
    if encoded:
        enc = encode_type or _ext(path)
        if enc == "jpeg":
            enc = "jpg"
        keep = not resized and _match_ext(path, enc) and \
            (color is None or (c == 3) == bool(color))
        if keep:
            datum.data = data
        else:
            if enc not in ("jpg", "png", "bmp"):
                raise CaffeError("Cannot encode %s as %r (use --encode-type jpg or png)"
                                 % (path, enc))
            datum.data = image_ops.encode(img, enc)
        datum.encoded = True
    else:
        datum.data = np.ascontiguousarray(img.transpose(2, 0, 1)).tobytes()
    return datum


# ----------------------------------------------------------------------------- the command
def parse_list(listfile, anno_type):
    try:
        with open(listfile) as f:
            text = f.read()
    except OSError as exc:
        raise CaffeError("Cannot read the list file %s: %s" % (listfile, exc.strerror or exc))
    except UnicodeDecodeError as exc:
        line = text_line_of(listfile, exc.start)
        raise CaffeError("%s:%d: the list file is not UTF-8 (byte 0x%02x); save it as UTF-8"
                         % (listfile, line, exc.object[exc.start]))
    lines = []
    for n, raw in enumerate(text.splitlines(), 1):
        tokens = raw.split()
        if not tokens:
            continue
        if anno_type == "classification":
            if len(tokens) != 2:
                raise CaffeError("%s:%d: expected 'image_path label'" % (listfile, n))
            lines.append((tokens[0], tokens[1:], n))
        else:
            if len(tokens) != 2 and (len(tokens) - 1) % 5:
                raise CaffeError("%s:%d: expected 'image_path annotation_path' or 'image_path "
                                 "label xmin ymin xmax ymax ...' (got %d fields)"
                                 % (listfile, n, len(tokens)))
            lines.append((tokens[0], tokens[1:], n))
    return lines


def text_line_of(path, offset):
    """1-based line number of byte ``offset`` in ``path``."""
    with open(path, "rb") as f:
        return f.read(offset).count(b"\n") + 1


class _Writer:
    """LMDB writer that grows the map when it fills up (Caffe maps 1 TB at once)."""

    def __init__(self, path):
        import lmdb
        self.lmdb = lmdb
        self.path = path
        self.map_size = 1 << 30
        try:
            self.env = lmdb.open(path, map_size=self.map_size, subdir=True, lock=True)
        except lmdb.Error as exc:
            raise CaffeError("Check failed: mdb_status == 0 cannot create lmdb %s: %s"
                             % (path, exc), where="db_lmdb.hpp:15")
        self.pending = []

    def put(self, key, value):
        self.pending.append((key, value))

    def commit(self):
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    for k, v in self.pending:
                        txn.put(k, v)
                break
            except self.lmdb.MapFullError:
                self.map_size *= 2
                self.env.set_mapsize(self.map_size)
        self.pending = []

    def close(self):
        self.env.close()


@main.command("create_annoset")
@click.argument("root")
@click.argument("listfile")
@click.argument("db_name")
@_opt("--anno-type", "--anno_type", "anno_type", default="detection",
      type=click.Choice(["detection", "classification"]),
      help="detection (boxes, AnnotatedDatum type BBOX) or classification (a label per image).")
@_opt("--label-type", "--label_type", "label_type", default="auto",
      type=click.Choice(["auto", "xml", "txt"]),
      help="Annotation file format (auto: by the file's extension, .txt = txt, else xml).")
@_opt("--labelmap-file", "--label-map-file", "--label_map_file", "labelmap_file", default="",
      help="LabelMap prototxt mapping class names to labels (needed for names).")
@_opt("--check-label", "--check_label", "check_label", is_flag=True,
      help="Refuse a label map with duplicate names.")
@_opt("--encode-type", "--encode_type", "encode_type", default="",
      type=click.Choice(["", "jpg", "png"]),
      help="Store images encoded as jpg or png (empty: the source file's own format/bytes).")
@_opt("--encoded/--no-encoded", "encoded", default=True,
      help="Store encoded images (default) or raw BGR pixels.")
@_opt("--resize-width", "--resize_width", "resize_width", default=0, type=int,
      help="Width images are resized to (0 = keep).")
@_opt("--resize-height", "--resize_height", "resize_height", default=0, type=int,
      help="Height images are resized to (0 = keep).")
@_opt("--min-dim", "--min_dim", "min_dim", default=0, type=int,
      help="Minimum dimension images are resized to (keeping the aspect ratio).")
@_opt("--max-dim", "--max_dim", "max_dim", default=0, type=int,
      help="Maximum dimension images are resized to (keeping the aspect ratio).")
@_opt("--gray", is_flag=True, help="Store images as grayscale.")
@_opt("--shuffle", is_flag=True, help="Randomly shuffle the order of the images.")
@_opt("--seed", default=None, type=int, help="Seed of --shuffle (default: random).")
@_opt("--check-size", "--check_size", "check_size", is_flag=True,
      help="Check that all raw datums have the same size.")
@_opt("--backend", default="lmdb", type=click.Choice(["lmdb", "leveldb"]),
      help="Database backend (only lmdb is supported).")
@_opt("--redo", is_flag=True, help="Replace DB_NAME if it exists.")
@click.option("--debug", is_flag=True, help="Show Python tracebacks on errors.")
@report_errors
def create_annoset(root, listfile, db_name, anno_type, label_type, labelmap_file, check_label,
                   encode_type, encoded, resize_width, resize_height, min_dim, max_dim, gray,
                   shuffle, seed, check_size, backend, redo, debug):
    """Build an LMDB of AnnotatedDatum from images and annotations (SSD's convert_annoset).

    Each LISTFILE line names an image under ROOT and its annotation:

    \b
      image.jpg anno.xml              VOC XML (names mapped by --labelmap-file)
      image.jpg anno.txt              SSD txt: "label xmin ymin xmax ymax" per line
      image.jpg cat 48 240 195 371 ...  inline boxes: label (int or name), pixels
      image.jpg                       an image without boxes
      image.jpg 3                     --anno-type classification: a label

    Boxes are stored normalized by the image size, grouped by label; keys are
    "%08d_<image path>". Progress is logged as Caffe's convert_annoset.
    """
    import shutil
    from converters.datum import make_annotated_datum
    from layers.annotated_data import map_name_to_label, read_label_map
    if backend != "lmdb":
        raise CaffeError("The LEVELDB backend is not supported; use --backend lmdb",
                         where="db.cpp:25")
    if os.path.exists(db_name):
        if not redo:
            raise CaffeError("Check failed: mkdir(%s) failed: the database exists (use --redo "
                             "to replace it)" % db_name)
        if not os.path.isdir(db_name):
            raise CaffeError("%s exists and is not a database directory; not replacing a file "
                             "(give another DB_NAME or remove it)" % db_name)
        shutil.rmtree(db_name)
    parent = os.path.dirname(os.path.abspath(db_name))
    if not os.path.isdir(parent):
        raise CaffeError("Check failed: mkdir(%s) failed: the directory %s does not exist"
                         % (db_name, parent))
    name_to_label = None
    if labelmap_file:
        name_to_label = map_name_to_label(read_label_map(labelmap_file), strict=check_label)
    elif anno_type == "detection" and label_type == "xml":
        raise CaffeError("Failed to read label map file: --labelmap-file is required for XML "
                         "annotations", where="convert_annoset.cpp")
    lines = parse_list(listfile, anno_type)
    if shuffle:
        glog.info("Shuffling data")
        random.Random(seed).shuffle(lines)
    glog.info("A total of %d images." % len(lines))
    if encode_type and not encoded:
        glog.info("encode_type specified, assuming encoded=true.")
        encoded = True
    color = False if gray else True
    resize_width, resize_height = max(0, resize_width), max(0, resize_height)
    min_dim, max_dim = max(0, min_dim), max(0, max_dim)
    writer = _Writer(db_name)
    warn = _Warn()
    count = 0
    data_size = None
    try:
        for line_id, (rel, rest, lineno) in enumerate(lines):
            path = os.path.join(root, rel) if root else rel
            try:
                data, orig, img = read_image(path, color, resize_height, resize_width,
                                             min_dim, max_dim)
            except (OSError, CaffeError) as exc:
                glog.error("Could not open or find file %s (%s)" % (path, exc))
                glog.warning("Failed to read %s" % rel)
                continue
            resized = img is not orig
            label = -1
            groups = None
            if anno_type == "classification":
                label = _label_value(rest[0], name_to_label, "%s:%d" % (listfile, lineno))
            else:
                oh, ow = orig.shape[:2]
                where = "%s:%d" % (listfile, lineno)
                if len(rest) == 1:
                    apath = os.path.join(root, rest[0]) if root else rest[0]
                    kind = label_type if label_type != "auto" else \
                        ("txt" if _ext(apath) == "txt" else "xml")
                    if not os.path.exists(apath):
                        groups = _Groups()
                    elif kind == "xml":
                        if name_to_label is None:
                            raise CaffeError("%s: XML annotations need --labelmap-file" % where)
                        groups = read_xml(apath, ow, oh, name_to_label, warn)
                    else:
                        groups = read_txt(apath, ow, oh, name_to_label)
                else:
                    groups = read_inline(rest, ow, oh, name_to_label, where)
            datum = make_datum(rel, data, img, resized, color, encoded, encode_type, label)
            if check_size:
                size = datum.channels * datum.height * datum.width
                if data_size is None:
                    data_size = size
                elif not datum.encoded and len(datum.data) != data_size:
                    raise CaffeError("Check failed: data.size() == data_size (%d vs. %d) "
                                     "Incorrect data field size %d"
                                     % (len(datum.data), data_size, len(datum.data)),
                                     where="convert_annoset.cpp")
            if groups is not None:
                record = make_annotated_datum(datum, groups.as_list())
            else:
                from converters import caffe_pb2
                record = caffe_pb2.AnnotatedDatum()
                record.datum.CopyFrom(datum)
            key = ("%08d_%s" % (line_id, rel)).encode("utf-8")
            writer.put(key, record.SerializeToString())
            count += 1
            if count % 1000 == 0:
                writer.commit()
                glog.info("Processed %d files." % count)
        if count % 1000 != 0:
            writer.commit()
            glog.info("Processed %d files." % count)
    finally:
        writer.close()
