#!/usr/bin/env python3
"""Write the tiny data set and the "pretrained" teacher of the seed-001 example.

* ``images/train/*.png`` (64) and ``images/test/*.png`` (20): 36x36 colour images of ten
  classes (a filled disc, square or triangle of a class colour on a noisy background, random
  position and size), drawn with pillow from one seeded generator, so the files are the same on
  every run. ``train.txt`` / ``test.txt`` list them as "path label" (ImageData's format).
* ``teacher.caffemodel``: the teacher net: conv1 from its filler (seeded), BatchNorm statistics
  measured on the training images (centre crops) and fc100 fitted on the pooled features (softmax
  regression), so that it classifies the images. The statistics are stored with a moving-average
  factor of 1, as
  converters from other frameworks write them. With any other factor the drift is the same, only
  slower.

Run from anywhere; it writes next to itself:

    python configs/teacher_bn/make_data.py
"""
import os
import sys

import numpy as np
from PIL import Image, ImageDraw

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SIZE = 36
CLASSES = 10
SEED = 20240829
COLORS = [(220, 40, 40), (40, 200, 40), (40, 60, 220), (220, 200, 40), (200, 40, 200),
          (40, 200, 200), (240, 140, 30), (120, 60, 20), (250, 250, 250), (90, 90, 90)]


def draw(label, rng):
    bg = rng.integers(40, 200, size=3)
    arr = np.clip(bg + rng.normal(0, 18, size=(SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    d = ImageDraw.Draw(img)
    r = int(rng.integers(7, 13))
    cx, cy = (int(v) for v in rng.integers(r + 2, SIZE - r - 2, size=2))
    color = tuple(int(c) for c in np.clip(np.asarray(COLORS[label]) + rng.integers(-20, 21, 3),
                                          0, 255))
    shape = label % 3
    if shape == 0:
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == 1:
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=color)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    return img


def write_images(rng):
    for split, n in (("train", 64), ("test", 20)):
        folder = os.path.join(HERE, "images", split)
        os.makedirs(folder, exist_ok=True)
        lines = []
        for i in range(n):
            label = i % CLASSES
            name = "%s/%03d.png" % (split, i)
            draw(label, rng).save(os.path.join(HERE, "images", name), optimize=True)
            lines.append("%s %d" % (name, label))
        with open(os.path.join(HERE, split + ".txt"), "w") as f:
            f.write("\n".join(lines) + "\n")


def fit_classifier(fc, feats, labels, steps=300):
    """Make the teacher a teacher: fit fc100 (softmax regression) on the pooled features."""
    import torch
    w = fc.blobs[0].detach().clone().requires_grad_(True)
    b = fc.blobs[1].detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(feats @ w.t() + b, labels) + 1e-3 * (w * w).sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        fc.blobs[0].copy_(w)
        fc.blobs[1].copy_(b)


def write_teacher():
    """The fixed net's TEST phase has no data randomness: measure BN statistics with it."""
    import torch
    from converters.prototxt import read_net
    from layers.net import Net
    torch.manual_seed(SEED)
    cwd = os.getcwd()
    os.chdir(ROOT)           # the prototxt's data paths are relative to the repository root
    try:
        param = read_net(os.path.join(HERE, "teacher_train_val_fixed.prototxt"))
        for layer in param.layer:      # read the training images, centre-cropped, in order
            if layer.type == "ImageData":
                layer.image_data_param.source = "configs/teacher_bn/train.txt"
                layer.image_data_param.batch_size = 64
        net = Net(param, "TEST", log=False)
        with torch.no_grad():
            net.run(end=net.layer_names.index("conv1"))
            x = net._data["conv1"].double()
        bn = net.layer_dict["res2_1a_1_bn"]
        mean = x.mean(dim=(0, 2, 3))
        m = x.numel() // x.shape[1]
        var = x.var(dim=(0, 2, 3), unbiased=False) * m / (m - 1)
        with torch.no_grad():
            bn.blobs[0].copy_(mean.float())
            bn.blobs[1].copy_(var.float())
            bn.blobs[2].fill_(1.0)
            net.run(end=net.layer_names.index("pool_5"))
            feats = net._data["pool_5"].reshape(x.shape[0], -1).clone()
            labels = net._data["label"].long().clone()
        fit_classifier(net.layer_dict["fc100"], feats, labels)
        net.save(os.path.join(HERE, "teacher.caffemodel"))
        for layer in net.layer_modules:
            if hasattr(layer, "close"):
                layer.close()
    finally:
        os.chdir(cwd)


def main():
    rng = np.random.Generator(np.random.PCG64(SEED))
    write_images(rng)
    write_teacher()
    print("wrote %s/{train,test}.txt, images/, teacher.caffemodel" % HERE)


if __name__ == "__main__":
    main()
