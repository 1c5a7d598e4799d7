#!/usr/bin/env python3
"""Write the synthetic number-plate data of the SSD examples (configs/number_plate_ssd/,
configs/resnet_ssd/).

Scenes: a smooth colour-noise background with a few muted blobs and bars as clutter, 0-2 blank
light rectangles (plate-like distractors without marks) and 1-3 number plates: light rectangles
with a dark border and 5-7 dark glyph-like marks (bars, hooks, boxes, crosses) drawn with pillow,
then fine Gaussian noise. Source images are small camera-like frames (320x240, 352x264, 288x288,
384x256) that the nets' ``resize_param`` (WARP) brings to their input size; plates are 7-15 % of
the width.

Outputs (beside the configs, replaced on every run):

* ``number_plate_ssd/plates_trainval_lmdb`` (96 scenes) and ``plates_test_lmdb`` (24 scenes),
  made the way an SSD user makes theirs (SSD-Caffe's ``create_data.sh``): the scenes are
  written as a VOC-style folder (``JPEGImages/plate_NNNNN.jpg``, JPEG quality 90;
  ``Annotations/plate_NNNNN.xml`` with one ``object`` named ``plate`` per plate, pixel boxes
  with ``xmax``/``ymax`` exclusive; ``trainval.txt`` / ``test.txt`` list files), then
  ``trainer create_annoset --anno-type detection --labelmap-file labelmap_plates.prototxt
  --encode-type jpg`` turns each list into an LMDB of ``AnnotatedDatum`` (the JPEG bytes as
  written, ``label: -1``, ``type: BBOX``, one group with ``group_label: 0``, the ``plate`` label;
  the net's background is label 1; keys ``"%08d_JPEGImages/plate_NNNNN.jpg"``). The VOC folder
  goes to a temporary directory unless ``--keep-sources DIR`` is given.
* ``resnet_ssd/plate_crops_train_lmdb`` (480) and ``plate_crops_test_lmdb`` (100): 64x64 crops
  of other scenes for the classifier pretraining, Caffe ``Datum``s with an encoded JPEG
  (quality 90), label 0 = a whole plate in the crop, 1 = no plate (background or a blank
  distractor), balanced, shuffled; keys ``"%08d"``.

Every draw comes from seeded numpy generators and the records are written in key order in one
transaction, so the images and the database files are the same bytes on every run:

    python configs/make_detection_lmdb.py                 # both examples' data
    python configs/make_detection_lmdb.py --only plates   # or --only crops
    python configs/make_detection_lmdb.py --only plates --keep-sources /tmp/plates_voc
"""
import argparse
import io
import os
import shutil
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SEED_PLATES = 20240711
SEED_CROPS = 20240712
SOURCE_SIZES = ((320, 240), (352, 264), (288, 288), (384, 256))   # (width, height)
JPEG_QUALITY = 90
PLATE_LABEL = 0      # labelmap_plates.prototxt: plate 0, background 1 (the net's background id)
CROP = 64


# ----------------------------------------------------------------------------- drawing
def _background(rng, w, h):
    """Smooth colour noise: a random base colour plus upsampled coarse noise, float32 HxWx3."""
    base = rng.uniform(50.0, 190.0, size=3)
    gw, gh = int(rng.integers(4, 9)), int(rng.integers(3, 7))
    coarse = rng.normal(0.0, 38.0, size=(gh, gw, 3)) + base
    coarse = np.clip(coarse, 0, 255).astype(np.uint8)
    img = Image.fromarray(coarse, "RGB").resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):           # muted clutter: blobs and bars
        x0, y0 = rng.uniform(-0.1, 1.0) * w, rng.uniform(-0.1, 1.0) * h
        bw, bh = rng.uniform(0.05, 0.35) * w, rng.uniform(0.03, 0.3) * h
        colour = tuple(int(v) for v in np.clip(base + rng.normal(0, 45, 3), 0, 200))
        box = (float(x0), float(y0), float(x0 + bw), float(y0 + bh))
        if rng.uniform() < 0.5:
            draw.ellipse(box, fill=colour)
        else:
            draw.rectangle(box, fill=colour)
    return img.filter(ImageFilter.GaussianBlur(radius=1.2))


def _glyph(draw, rng, x0, y0, gw, gh, pen, ink):
    """One dark glyph-like mark in the box (x0, y0, gw, gh)."""
    x1, y1 = x0 + gw, y0 + gh
    xm, ym = x0 + gw / 2.0, y0 + gh / 2.0
    kind = int(rng.integers(0, 6))
    if kind == 0:                                        # bar ("1", "I")
        draw.line([(xm, y0), (xm, y1)], fill=ink, width=pen)
    elif kind == 1:                                      # box ("0", "D")
        draw.rectangle((x0, y0, x1, y1), outline=ink, width=pen)
    elif kind == 2:                                      # hook ("7", "J")
        draw.line([(x0, y0), (x1, y0), (x0 + gw * 0.3, y1)], fill=ink, width=pen)
    elif kind == 3:                                      # "E"/"F" like
        draw.line([(x1, y0), (x0, y0), (x0, y1), (x1, y1)], fill=ink, width=pen)
        draw.line([(x0, ym), (x1 - gw * 0.2, ym)], fill=ink, width=pen)
    elif kind == 4:                                      # cross ("X", "4")
        draw.line([(x0, y0), (x1, y1)], fill=ink, width=pen)
        draw.line([(x1, y0), (x0, y1)], fill=ink, width=pen)
    else:                                                # "H"
        draw.line([(x0, y0), (x0, y1)], fill=ink, width=pen)
        draw.line([(x1, y0), (x1, y1)], fill=ink, width=pen)
        draw.line([(x0, ym), (x1, ym)], fill=ink, width=pen)


def _plate_colour(rng):
    if rng.uniform() < 0.7:                              # white / light grey
        v = rng.uniform(205, 250)
        return (int(v), int(v), int(v - rng.uniform(0, 10)))
    return (int(rng.uniform(225, 250)), int(rng.uniform(200, 230)), int(rng.uniform(40, 90)))


def _draw_plate(draw, rng, box, marks=True):
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=_plate_colour(rng))
    if not marks:
        return
    ink = tuple(int(v) for v in rng.uniform(10, 60, size=3))
    draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=ink, width=1)
    n = int(rng.integers(5, 8))
    margin = max(2.0, 0.08 * w)
    step = (w - 2 * margin) / n
    gw = max(1.5, step * rng.uniform(0.55, 0.75))
    gh = max(2.0, h * rng.uniform(0.5, 0.65))
    gy = y0 + (h - gh) / 2.0
    pen = max(1, int(round(h / 9.0)))
    for k in range(n):
        gx = x0 + margin + k * step + (step - gw) / 2.0
        _glyph(draw, rng, gx, gy, gw, gh, pen, ink)


def _place(rng, w, h, boxes, bw, bh, tries=50):
    """A box (x0, y0, x1, y1) of integer pixels inside the image, clear of ``boxes`` by 4 px."""
    for _ in range(tries):
        x0 = int(rng.integers(2, w - bw - 2))
        y0 = int(rng.integers(2, h - bh - 2))
        cand = (x0, y0, x0 + bw, y0 + bh)
        if all(cand[2] + 4 <= b[0] or b[2] + 4 <= cand[0] or cand[3] + 4 <= b[1] or
               b[3] + 4 <= cand[1] for b in boxes):
            return cand
    return None


def _plate_size(rng, w):
    pw = int(round(rng.uniform(0.07, 0.15) * w))
    ph = max(7, int(round(pw / rng.uniform(2.5, 4.5))))
    return pw, ph


def draw_scene(rng, size=None):
    """(image as uint8 HxWx3 RGB, plate boxes [(x0, y0, x1, y1)] in pixels, x1/y1 exclusive,
    distractor boxes)."""
    w, h = size or SOURCE_SIZES[int(rng.integers(0, len(SOURCE_SIZES)))]
    img = _background(rng, w, h)
    draw = ImageDraw.Draw(img)
    taken, plates, blanks = [], [], []
    for _ in range(int(rng.integers(0, 3))):             # blank plate-like distractors
        bw, bh = _plate_size(rng, w)
        box = _place(rng, w, h, taken, bw, bh)
        if box is not None:
            taken.append(box)
            blanks.append(box)
            _draw_plate(draw, rng, box, marks=False)
    for _ in range(int(rng.integers(1, 4))):
        pw, ph = _plate_size(rng, w)
        box = _place(rng, w, h, taken, pw, ph)
        if box is None:
            continue
        taken.append(box)
        plates.append(box)
        _draw_plate(draw, rng, box)
    if not plates:                                       # never: the first place always fits
        raise RuntimeError("no plate placed")
    arr = np.asarray(img, np.float64)
    arr = arr + rng.normal(0.0, rng.uniform(1.5, 4.0), size=arr.shape)
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8), plates, blanks


def jpeg(rgb, quality=JPEG_QUALITY):
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# ----------------------------------------------------------------------------- records
VOC_XML = """<annotation>
  <folder>plates</folder>
  <filename>%(name)s</filename>
  <size>
    <width>%(w)d</width>
    <height>%(h)d</height>
    <depth>3</depth>
  </size>
%(objects)s</annotation>
"""
VOC_OBJECT = """  <object>
    <name>plate</name>
    <difficult>0</difficult>
    <bndbox>
      <xmin>%d</xmin>
      <ymin>%d</ymin>
      <xmax>%d</xmax>
      <ymax>%d</ymax>
    </bndbox>
  </object>
"""


def voc_xml(name, rgb, plates):
    """The VOC-style annotation of one scene (pixel boxes, x1/y1 exclusive)."""
    h, w = rgb.shape[:2]
    objects = "".join(VOC_OBJECT % tuple(box) for box in plates)
    return VOC_XML % {"name": name, "w": w, "h": h, "objects": objects}


def crop_record(rgb, label):
    from converters.datum import make_datum
    return make_datum(np.zeros((3, CROP, CROP), np.uint8), label=label,
                      encoded=jpeg(rgb)).SerializeToString()


def _crop(rgb, box):
    x0, y0, x1, y1 = box
    img = Image.fromarray(rgb[y0:y1, x0:x1], "RGB")
    return np.asarray(img.resize((CROP, CROP), Image.BILINEAR))


def _plate_crop(rng, rgb, plate):
    h, w = rgb.shape[:2]
    x0, y0, x1, y1 = plate
    pw = x1 - x0
    for _ in range(20):
        s = int(round(pw / rng.uniform(0.4, 0.8)))
        if s > min(w, h):
            continue
        cx0 = int(rng.integers(max(0, x1 - s), min(x0, w - s) + 1))
        cy0 = int(rng.integers(max(0, y1 - s), min(y0, h - s) + 1))
        return _crop(rgb, (cx0, cy0, cx0 + s, cy0 + s))
    return None


def _background_crop(rng, rgb, plates):
    h, w = rgb.shape[:2]
    for _ in range(50):
        s = int(rng.integers(40, 121))
        cx0 = int(rng.integers(0, w - s + 1))
        cy0 = int(rng.integers(0, h - s + 1))
        box = (cx0, cy0, cx0 + s, cy0 + s)
        if all(box[2] <= p[0] or p[2] <= box[0] or box[3] <= p[1] or p[3] <= box[1]
               for p in plates):
            return _crop(rgb, box)
    return None


def make_crops(rng, n):
    """n records, half plates (label 0) and half background (label 1), shuffled."""
    crops = {0: [], 1: []}
    while len(crops[0]) < n // 2 or len(crops[1]) < n - n // 2:
        rgb, plates, _ = draw_scene(rng)
        if len(crops[0]) < n // 2:
            c = _plate_crop(rng, rgb, plates[int(rng.integers(0, len(plates)))])
            if c is not None:
                crops[0].append(c)
        for _ in range(2):
            if len(crops[1]) < n - n // 2:
                c = _background_crop(rng, rgb, plates)
                if c is not None:
                    crops[1].append(c)
    items = [(c, 0) for c in crops[0]] + [(c, 1) for c in crops[1]]
    order = rng.permutation(len(items))
    return [crop_record(*items[k]) for k in order]


# ----------------------------------------------------------------------------- LMDB
def write_lmdb(path, records):
    """records: [(key bytes, value bytes)] in key order, one transaction; replaces ``path``."""
    import lmdb
    if os.path.exists(path):
        shutil.rmtree(path)
    payload = sum(len(k) + len(v) + 4096 for k, v in records)
    map_size = (payload * 2 // 4096 + 256) * 4096
    env = lmdb.open(path, map_size=map_size, subdir=True, lock=False, meminit=True,
                    map_async=False)
    with env.begin(write=True) as txn:
        for key, value in records:
            txn.put(key, value, append=True)
    env.sync(True)
    env.close()
    lock = os.path.join(path, "lock.mdb")
    if os.path.exists(lock):
        os.remove(lock)
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def write_plate_sources(root, n_train=96, n_test=24, seed=SEED_PLATES):
    """The scenes as a VOC-style folder under ``root``; returns the two list files."""
    rng = np.random.default_rng(seed)
    for sub in ("JPEGImages", "Annotations"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    lists = []
    index = 0
    for name, n in (("trainval.txt", n_train), ("test.txt", n_test)):
        lines = []
        for _ in range(n):
            rgb, plates, _ = draw_scene(rng)
            stem = "plate_%05d" % index
            index += 1
            with open(os.path.join(root, "JPEGImages", stem + ".jpg"), "wb") as f:
                f.write(jpeg(rgb))
            with open(os.path.join(root, "Annotations", stem + ".xml"), "w") as f:
                f.write(voc_xml(stem + ".jpg", rgb, plates))
            lines.append("JPEGImages/%s.jpg Annotations/%s.xml\n" % (stem, stem))
        path = os.path.join(root, name)
        with open(path, "w") as f:
            f.writelines(lines)
        lists.append(path)
    return lists


def create_annoset(root, listfile, db, labelmap):
    """``trainer create_annoset`` (cli/annoset.py) on one list file, as SSD's create_data.sh."""
    from cli import main as cli
    cli._register()
    args = ["create_annoset", "--anno-type", "detection", "--labelmap-file", labelmap,
            "--check-label", "--encode-type", "jpg", "--redo", root, listfile, db]
    try:
        cli.main.main(args, prog_name="trainer", standalone_mode=False)
    except SystemExit as exc:
        if exc.code:
            raise
    lock = os.path.join(db, "lock.mdb")
    if os.path.exists(lock):
        os.remove(lock)
    return sum(os.path.getsize(os.path.join(db, f)) for f in os.listdir(db))


def make_plates(out, n_train=96, n_test=24, seed=SEED_PLATES, sources=None):
    import tempfile
    labelmap = os.path.join(HERE, "number_plate_ssd", "labelmap_plates.prototxt")
    tmp = None
    if sources is None:
        tmp = tempfile.mkdtemp(prefix="plates_voc_")
        sources = tmp
    try:
        lists = write_plate_sources(sources, n_train, n_test, seed)
        written = []
        for listfile, name, n in zip(lists, ("plates_trainval_lmdb", "plates_test_lmdb"),
                                     (n_train, n_test)):
            path = os.path.join(out, name)
            written.append((path, n, create_annoset(sources, listfile, path, labelmap)))
        return written
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def make_crop_lmdbs(out, n_train=480, n_test=100, seed=SEED_CROPS):
    rng = np.random.default_rng(seed)
    written = []
    for name, n in (("plate_crops_train_lmdb", n_train), ("plate_crops_test_lmdb", n_test)):
        records = [(b"%08d" % i, v) for i, v in enumerate(make_crops(rng, n))]
        path = os.path.join(out, name)
        written.append((path, n, write_lmdb(path, records)))
    return written


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=("plates", "crops"), help="write only one data set")
    ap.add_argument("--plates-out", default=os.path.join(HERE, "number_plate_ssd"))
    ap.add_argument("--crops-out", default=os.path.join(HERE, "resnet_ssd"))
    ap.add_argument("--keep-sources", metavar="DIR",
                    help="write the plates' VOC-style folder (JPEGImages/, Annotations/, "
                         "trainval.txt, test.txt) here and keep it")
    args = ap.parse_args(argv)
    written = []
    if args.only in (None, "plates"):
        os.makedirs(args.plates_out, exist_ok=True)
        written += make_plates(args.plates_out, sources=args.keep_sources)
    if args.only in (None, "crops"):
        os.makedirs(args.crops_out, exist_ok=True)
        written += make_crop_lmdbs(args.crops_out)
    for path, n, size in written:
        rel = os.path.relpath(path)
        print("%s: %d records, %d bytes" % (path if rel.startswith("..") else rel, n, size))


if __name__ == "__main__":
    main()
