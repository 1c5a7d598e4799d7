#!/usr/bin/env python3
"""Write the synthetic digit LMDBs the LeNet example trains on.

Digits 0-9 are drawn as pen strokes (lines and arcs) with pillow on a 112x112 canvas, each with
its own random scale, aspect, rotation, shear, shift, stroke width and point jitter, reduced to
28x28 with a box filter, and given a random background level and Gaussian noise: 28x28
grayscale, white strokes on black, as MNIST. Every draw comes from one seeded numpy generator
and the glyphs are geometry (no font files), so the images and the LMDB bytes are the same on
every run.

Records are Caffe ``Datum`` messages (channels 1, height 28, width 28, uint8 ``data``, label),
keys ``"%08d"`` from 0, in one transaction in key order, so the database files are
deterministic too. Written next to this script by default:

    python configs/lenet/make_digits_lmdb.py            # digits_train_lmdb (2000), digits_test_lmdb (500)
    python configs/lenet/make_digits_lmdb.py --train 6000 --test 1000 --out /tmp/digits
"""
import argparse
import math
import os
import shutil
import sys

import numpy as np
from PIL import Image, ImageDraw

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SIZE = 28
CANVAS = 112          # drawn at 4x, then box-filtered down to 28x28
SEED = 20240601


def _arc(cx, cy, rx, ry, t0, t1, steps=24):
    ts = np.linspace(math.radians(t0), math.radians(t1), steps)
    return [(cx + rx * math.cos(t), cy + ry * math.sin(t)) for t in ts]


# Each digit: a list of strokes, each a polyline in a unit box (x right, y down).
GLYPHS = {
    0: [_arc(0.5, 0.5, 0.3, 0.42, 0, 360, 40)],
    1: [[(0.34, 0.24), (0.52, 0.08), (0.52, 0.92)]],
    2: [_arc(0.5, 0.32, 0.26, 0.23, 180, 390, 20) + [(0.22, 0.92), (0.8, 0.92)]],
    3: [_arc(0.5, 0.29, 0.22, 0.2, 200, 450, 20), _arc(0.5, 0.7, 0.25, 0.22, -90, 160, 22)],
    4: [[(0.66, 0.92), (0.66, 0.08), (0.18, 0.66), (0.84, 0.66)]],
    5: [[(0.76, 0.08), (0.32, 0.08), (0.29, 0.47)] + _arc(0.49, 0.66, 0.27, 0.25, -140, 150, 22)],
    6: [_arc(0.74, 0.62, 0.5, 0.5, -90, -180, 12) + _arc(0.5, 0.68, 0.25, 0.23, 180, 540, 36)],
    7: [[(0.18, 0.08), (0.82, 0.08), (0.42, 0.92)]],
    8: [_arc(0.5, 0.28, 0.2, 0.19, 0, 360, 30), _arc(0.5, 0.7, 0.25, 0.22, 0, 360, 30)],
    9: [_arc(0.5, 0.32, 0.24, 0.23, 0, 360, 32), [(0.74, 0.32), (0.7, 0.92)]],
}


def render(digit, rng):
    """One 28x28 uint8 image of ``digit`` with random geometry and noise."""
    scale = rng.uniform(0.75, 1.05) * 80.0          # glyph height in canvas pixels
    aspect = rng.uniform(0.75, 1.1)
    angle = math.radians(rng.uniform(-15.0, 15.0))
    shear = rng.uniform(-0.25, 0.25)
    dx, dy = rng.uniform(-10.0, 10.0, size=2)       # up to 2.5 px at 28x28
    width = int(rng.integers(7, 13))
    jitter = 0.018
    ca, sa = math.cos(angle), math.sin(angle)
    img = Image.new("L", (CANVAS, CANVAS), 0)
    draw = ImageDraw.Draw(img)
    for stroke in GLYPHS[digit]:
        pts = np.asarray(stroke, dtype=np.float64) - 0.5
        pts = pts + rng.normal(0.0, jitter, size=pts.shape)
        x = pts[:, 0] * aspect + shear * pts[:, 1]
        y = pts[:, 1]
        xr = (ca * x - sa * y) * scale + CANVAS / 2 + dx
        yr = (sa * x + ca * y) * scale + CANVAS / 2 + dy
        poly = [(float(a), float(b)) for a, b in zip(np.round(xr, 2), np.round(yr, 2))]
        draw.line(poly, fill=255, width=width, joint="curve")
        r = width / 2.0
        for px, py in (poly[0], poly[-1]):           # round pen ends
            draw.ellipse((px - r, py - r, px + r, py + r), fill=255)
    small = np.asarray(img.resize((SIZE, SIZE), Image.BOX), dtype=np.float64)
    ink = rng.uniform(0.75, 1.0)
    background = rng.uniform(0.0, 25.0)
    noise = rng.normal(0.0, rng.uniform(2.0, 12.0), size=small.shape)
    out = background + small * ink * (255.0 - background) / 255.0 + noise
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def make_images(n, rng):
    labels = rng.permutation(np.arange(n) % 10)
    images = np.stack([render(int(d), rng) for d in labels])
    return images, labels.astype(np.int64)


def write_lmdb(path, images, labels):
    """Datum records "%08d" -> Datum, in one transaction; replaces ``path``."""
    import lmdb
    from converters import caffe_pb2
    if os.path.exists(path):
        shutil.rmtree(path)
    values = []
    for img, label in zip(images, labels):
        d = caffe_pb2.Datum()
        d.channels, d.height, d.width = 1, img.shape[0], img.shape[1]
        d.data = img.tobytes()
        d.label = int(label)
        values.append(d.SerializeToString())
    payload = sum(len(v) + 8 + 16 for v in values)
    map_size = ((payload * 3) // 2 // 4096 + 64) * 4096   # leaf pages hold ~4 records each
    env = lmdb.open(path, map_size=map_size, subdir=True, lock=False, meminit=True,
                    map_async=False)
    with env.begin(write=True) as txn:
        for i, v in enumerate(values):
            txn.put(b"%08d" % i, v, append=True)
    env.sync(True)
    env.close()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, default=2000, help="training records (2000)")
    ap.add_argument("--test", type=int, default=500, help="test records (500)")
    ap.add_argument("--out", default=HERE, help="output folder (next to this script)")
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    os.makedirs(args.out, exist_ok=True)
    for name, n in (("digits_train_lmdb", args.train), ("digits_test_lmdb", args.test)):
        images, labels = make_images(n, rng)
        path = os.path.join(args.out, name)
        write_lmdb(path, images, labels)
        size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
        print("%s: %d records, %d bytes" % (path, n, size))


if __name__ == "__main__":
    main()
