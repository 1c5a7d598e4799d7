"""The number-plate SSD of a Caffe user's question (shared/seeds/000_*.txt): "I set lr_mult 0 on
conv_1..conv_6 and training is no faster". Three versions of the same net, each trained by
`trainer` (prototxt, Net.run + Caffe SGD) and by a hand-written torch module with the same
requires_grad (same convolutions, Normalize, permute/flatten, and our MultiBoxLoss layer as the
loss of both):

* all trainable: every conv learns;
* as written: lr_mult 0 on conv_1..conv_6, conv_1_1 (second layer) trainable. Backward must still
  run through conv_6..conv_2 to reach conv_1_1 (data gradients, no weight gradients); conv_1 and
  relu_1, below the first trainable layer, run no backward at all;
* head only: conv_1_1 frozen too, so nothing below conv_6_norm runs backward. This is what the
  user wanted; in Caffe (and here) it is the placement of the trainable layer, not lr_mult alone,
  that decides the backward cost.

The AnnotatedData layer is replaced by an Input layer (data B x 3 x 480 x 480, label 1x1x2Bx8:
two plates per image). Forward-only time is measured too, so backward = step - forward.
Usage: python benchmarks/ssd_plate.py [--device cuda] [--batch N] [--size 480]
"""
import glob
import os
import torch
import torch.nn.functional as F

from harness import (ROOT_SEEDS, finish_args, forward_only, hand_step, parser, report, run,
                     trainer_step)
from converters import caffe_pb2
from converters.prototxt import parse_text

CONVS = ["conv_1", "conv_1_1", "conv_2", "conv_3", "conv_4", "conv_5", "conv_6"]
FROZEN = ["conv_1", "conv_2", "conv_3", "conv_4", "conv_5", "conv_6"]


def seed_prototxt():
    """The net text of the question (seed 000), from `name:` to the last layer."""
    paths = sorted(glob.glob(os.path.join(ROOT_SEEDS, "000_*.txt")))
    if not paths:
        raise SystemExit("seed 000 not found under %s" % ROOT_SEEDS)
    text = open(paths[0], encoding="utf-8").read()
    start = text.index('name: "RegNet_train_0"')
    end = text.index("deep-learning conv-neural-network caffe")
    body = text[start:end]
    return body[:body.rindex("}") + 1]


def make_net_param(batch, size, variant):
    net = parse_text(seed_prototxt(), caffe_pb2.NetParameter(), "seed000")
    data = net.layer[0]
    assert data.type == "AnnotatedData"
    data.Clear()
    data.name, data.type = "data", "Input"
    data.top.extend(["data", "label"])
    data.input_param.shape.add().dim.extend([batch, 3, size, size])
    data.input_param.shape.add().dim.extend([1, 1, 2 * batch, 8])
    for layer in net.layer:
        if layer.name in FROZEN and variant == "all trainable":
            for i, p in enumerate(layer.param):
                p.lr_mult, p.decay_mult = (1.0, 1.0) if i == 0 else (2.0, 0.0)
        if layer.name == "conv_1_1" and variant == "head only":
            for p in layer.param:
                p.lr_mult, p.decay_mult = 0.0, 0.0
    return net


def trainable(variant, name):
    if variant == "all trainable":
        return True
    if variant == "head only":
        return name not in FROZEN and name != "conv_1_1"
    return name not in FROZEN


class HandSSD(torch.nn.Module):
    """The plate net in plain torch; the loss is the same MultiBoxLoss layer module."""

    def __init__(self, net, variant):
        super().__init__()
        chans = {"conv_1": (3, 8), "conv_1_1": (8, 8), "conv_2": (8, 8), "conv_3": (8, 16),
                 "conv_4": (16, 16), "conv_5": (16, 32), "conv_6": (32, 32)}
        self.convs = torch.nn.ModuleDict({n: torch.nn.Conv2d(i, o, 3, padding=1)
                                          for n, (i, o) in chans.items()})
        self.loc = torch.nn.Conv2d(32, 12, 3, padding=1)
        self.conf = torch.nn.Conv2d(32, 6, 3, padding=1)
        self.scale = torch.nn.Parameter(torch.full((32,), 20.0))
        for n, conv in self.convs.items():
            conv.requires_grad_(trainable(variant, n))
        # constant priors and the loss: the Caffe layers (their cost is the same in both)
        li = net.layer_names.index("mbox_loss")
        self.loss_layer = net.layer_modules[li]
        self.prior_layer = net.layer_modules[net.layer_names.index("conv_6_norm_mbox_priorbox")]
        self.prior = None

    def forward(self, x, label):
        c = self.convs
        x = F.relu(c["conv_1"](x))
        x = F.max_pool2d(F.relu(c["conv_1_1"](x)), 2, 2, ceil_mode=True)
        for n in ("conv_2", "conv_3", "conv_4", "conv_5"):
            x = F.max_pool2d(F.relu(c[n](x)), 2, 2, ceil_mode=True)
        x = F.relu(c["conv_6"](x))
        norm = torch.sqrt((x * x).sum(1, keepdim=True) + 1e-10)
        x = x / norm * self.scale.view(1, -1, 1, 1)
        loc = self.loc(x).permute(0, 2, 3, 1).flatten(1)
        conf = self.conf(x).permute(0, 2, 3, 1).flatten(1)
        if self.prior is None:      # a constant of the shapes, as the prototxt's PriorBox
            with torch.no_grad():
                self.prior = self.prior_layer(x.detach(), torch.empty(
                    1, 3, self.size, self.size, device=x.device))
        prior = self.prior
        return self.loss_layer(loc, conf, prior, label)


def labels(batch, device):
    rows = []
    for i in range(batch):
        rows.append([i, 0, 0, 0.20, 0.40, 0.45, 0.50, 0])
        rows.append([i, 0, 1, 0.55, 0.60, 0.85, 0.72, 0])
    return torch.tensor(rows, dtype=torch.float32, device=device).view(1, 1, 2 * batch, 8)


def main():
    ap = parser(__doc__, batch_cpu=2, batch_gpu=16, iters_cpu=2, iters_gpu=20)
    ap.add_argument("--size", type=int, default=480)
    ap.add_argument("--variants", default="all trainable,as written,head only")
    args = finish_args(ap.parse_args())
    dev, b = args.device, args.batch
    torch.manual_seed(0)
    x = torch.rand(b, 3, args.size, args.size, device=dev) * 255 - 117
    label = labels(b, dev)
    feed = {"data": x, "label": label}
    steps, summary = [], []
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        from layers.net import Net
        net = Net(make_net_param(b, args.size, variant), "TRAIN", log=False).to(dev)
        backward_layers = [n for n, nb in zip(net.layer_names, net.need_backward) if nb]
        no_backward = [n for n, nb in zip(net.layer_names, net.need_backward) if not nb]
        summary.append("  %-14s %2d layers need backward; no backward: %s"
                       % (variant, len(backward_layers), ", ".join(no_backward)))
        hand = HandSSD(net, variant).to(dev)
        hand.size = args.size
        mults = []
        for n, conv in hand.convs.items():
            mults += [(conv.weight, 1, 1), (conv.bias, 2, 0)]
        mults += [(hand.loc.weight, 1, 1), (hand.loc.bias, 2, 0), (hand.conf.weight, 1, 1),
                  (hand.conf.bias, 2, 0), (hand.scale, 1, 1)]
        steps.append(("trainer, %s" % variant, trainer_step(net, feed)))
        steps.append(("hand-written, %s" % variant, hand_step(lambda h=hand: h(x, label), mults)))
        if variant == "as written":
            steps.append(("trainer forward only", forward_only(net, feed)))
    result = run(steps, args)
    report("Number-plate SSD (seed 000), batch %d, %dx%d, training step" % (b, args.size,
                                                                             args.size),
           result, b, [(name, name.replace("trainer", "hand-written"))
                       for name, _ in steps if name.startswith("trainer,")])
    for line in summary:
        print(line)
    fwd = result.get("trainer forward only")
    if fwd:
        for name in result:
            if name.startswith("trainer,"):
                wall = (result[name][0] - fwd[0]) * 1000
                cpu = (result[name][1] - fwd[1]) * 1000
                # a difference of two medians: below zero it is timing noise around ~0
                note = "  (step - forward, within noise of 0)" if min(wall, cpu) < 0 else ""
                print("  backward + update, %-14s %9.3f ms/iter (CPU time %9.3f ms/iter)%s" % (
                    name[len("trainer, "):], wall, cpu, note))


if __name__ == "__main__":
    main()
