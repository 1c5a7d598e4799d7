"""ResNet-50 from a generated Caffe prototxt (Convolution without bias + BatchNorm + Scale + ReLU,
Eltwise SUM shortcuts, bottleneck blocks 3-4-6-3, stride on the 3x3 convolution as torchvision's
v1.5) trained by `trainer` (Net.run + Caffe SGD), against torchvision's resnet50 when torchvision is
importable, else the same architecture hand-written here. GPU-oriented: on the CPU the default is
a tiny run (batch 2, 112x112); `--print-prototxt` writes the generated net.

Usage: python benchmarks/resnet50.py [--device cuda] [--batch 64] [--size 224] [--amp bf16]
       [--channels-last]
"""
import contextlib
import sys

import torch
import torch.nn.functional as F

from harness import finish_args, hand_step, parser, report, run, trainer_step

STAGES = [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]


def _conv(name, bottom, top, out, k, stride=1, pad=0):
    return ('layer { name: "%s" type: "Convolution" bottom: "%s" top: "%s"\n'
            '  param { lr_mult: 1 decay_mult: 1 }\n'
            '  convolution_param { num_output: %d kernel_size: %d stride: %d pad: %d '
            'bias_term: false weight_filler { type: "msra" } } }\n'
            % (name, bottom, top, out, k, stride, pad))


def _bn(name, blob, relu=True):
    text = ('layer { name: "bn_%s" type: "BatchNorm" bottom: "%s" top: "%s" }\n'
            'layer { name: "scale_%s" type: "Scale" bottom: "%s" top: "%s"\n'
            '  param { lr_mult: 1 decay_mult: 0 } param { lr_mult: 1 decay_mult: 0 }\n'
            '  scale_param { bias_term: true } }\n' % (name, blob, blob, name, blob, blob))
    if relu:
        text += ('layer { name: "%s_relu" type: "ReLU" bottom: "%s" top: "%s" }\n'
                 % (name, blob, blob))
    return text


def prototxt(batch, size, classes=1000):
    t = ['name: "ResNet-50"\n',
         'layer { name: "data" type: "Input" top: "data" top: "label"\n'
         '  input_param { shape { dim: %d dim: 3 dim: %d dim: %d } shape { dim: %d } } }\n'
         % (batch, size, size, batch),
         _conv("conv1", "data", "conv1", 64, 7, 2, 3), _bn("conv1", "conv1"),
         'layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"\n'
         '  pooling_param { pool: MAX kernel_size: 3 stride: 2 } }\n']
    prev, channels = "pool1", 64
    for si, (width, blocks, stride) in enumerate(STAGES):
        for bi in range(blocks):
            n = "res%d%s" % (si + 2, chr(ord("a") + bi))
            s = stride if bi == 0 else 1
            if bi == 0:
                t.append(_conv(n + "_branch1", prev, n + "_branch1", width * 4, 1, s))
                t.append(_bn(n + "_branch1", n + "_branch1", relu=False))
                short = n + "_branch1"
            else:
                short = prev
            t.append(_conv(n + "_branch2a", prev, n + "_branch2a", width, 1))
            t.append(_bn(n + "_branch2a", n + "_branch2a"))
            t.append(_conv(n + "_branch2b", n + "_branch2a", n + "_branch2b", width, 3, s, 1))
            t.append(_bn(n + "_branch2b", n + "_branch2b"))
            t.append(_conv(n + "_branch2c", n + "_branch2b", n + "_branch2c", width * 4, 1))
            t.append(_bn(n + "_branch2c", n + "_branch2c", relu=False))
            t.append('layer { name: "%s" type: "Eltwise" bottom: "%s" bottom: "%s" top: "%s" }\n'
                     % (n, short, n + "_branch2c", n))
            t.append('layer { name: "%s_relu" type: "ReLU" bottom: "%s" top: "%s" }\n' % (n, n, n))
            prev, channels = n, width * 4
    t.append('layer { name: "pool5" type: "Pooling" bottom: "%s" top: "pool5"\n'
             '  pooling_param { pool: AVE global_pooling: true } }\n' % prev)
    t.append('layer { name: "fc1000" type: "InnerProduct" bottom: "pool5" top: "fc1000"\n'
             '  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }\n'
             '  inner_product_param { num_output: %d weight_filler { type: "msra" } } }\n'
             % classes)
    t.append('layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc1000" bottom: "label" '
             'top: "loss" }\n')
    return "".join(t)


class Bottleneck(torch.nn.Module):
    def __init__(self, cin, width, stride):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(width)
        self.conv2 = torch.nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(width)
        self.conv3 = torch.nn.Conv2d(width, width * 4, 1, bias=False)
        self.bn3 = torch.nn.BatchNorm2d(width * 4)
        self.down = None
        if stride != 1 or cin != width * 4:
            self.down = torch.nn.Sequential(torch.nn.Conv2d(cin, width * 4, 1, stride, bias=False),
                                            torch.nn.BatchNorm2d(width * 4))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        return F.relu(h + (self.down(x) if self.down is not None else x))


class HandResNet50(torch.nn.Module):
    """torchvision's resnet50 architecture, written out (used when torchvision is absent)."""

    def __init__(self, classes=1000):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(64)
        layers, cin = [], 64
        for width, blocks, stride in STAGES:
            for bi in range(blocks):
                layers.append(Bottleneck(cin, width, stride if bi == 0 else 1))
                cin = width * 4
        self.layers = torch.nn.Sequential(*layers)
        self.fc = torch.nn.Linear(2048, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, ceil_mode=True)
        return self.fc(self.layers(x).mean((2, 3)))


def hand_model():
    try:
        import torchvision
        return torchvision.models.resnet50(), "torchvision resnet50"
    except ImportError:
        return HandResNet50(), "hand-written resnet50"


def main():
    ap = parser(__doc__, batch_cpu=2, batch_gpu=64, iters_cpu=1, iters_gpu=20)
    ap.add_argument("--size", type=int, default=None, help="image size (224; 112 on the CPU)")
    ap.add_argument("--amp", default="", choices=["", "bf16", "fp16"],
                    help="autocast both (fp16 without loss scaling here: timing only)")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--print-prototxt", action="store_true")
    args = finish_args(ap.parse_args())
    if args.size is None:
        args.size = 224 if args.device.type == "cuda" else 112
    dev, b = args.device, args.batch
    text = prototxt(b, args.size)
    if args.print_prototxt:
        sys.stdout.write(text)
        return
    if args.device.type == "cpu":
        print("(ResNet-50 is a GPU benchmark; on the CPU this is a tiny run: batch %d, %dx%d)"
              % (b, args.size, args.size))
    from harness import net_from_text
    torch.manual_seed(0)
    x = torch.rand(b, 3, args.size, args.size, device=dev)
    y = torch.randint(0, 1000, (b,), device=dev)
    net = net_from_text(text).to(dev)
    model, hand_name = hand_model()
    model = model.to(dev).train()
    if args.channels_last:
        net.to(memory_format=torch.channels_last)
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def autocast():
        if not args.amp:
            return contextlib.nullcontext()
        return torch.autocast(dev.type, dtype=torch.bfloat16 if args.amp == "bf16"
                              else torch.float16)

    inner = trainer_step(net, {"data": x, "label": y.float()})

    def trainer():
        with autocast():
            inner()
    mults = []
    for name, p in model.named_parameters():
        if name.endswith("bias") and name.startswith("fc"):
            mults.append((p, 2, 0))
        elif p.dim() == 1:
            mults.append((p, 1, 0))        # BatchNorm gamma/beta: Caffe's Scale, decay_mult 0
        else:
            mults.append((p, 1, 1))

    def loss():
        with autocast():
            return F.cross_entropy(model(x), y)
    hand = hand_step(loss, mults)
    result = run([("trainer (prototxt)", trainer), (hand_name, hand)], args)
    mode = " ".join(m for m in (("amp " + args.amp) if args.amp else "",
                                "channels-last" if args.channels_last else "") if m)
    report("ResNet-50 training step, batch %d, %dx%d%s" % (b, args.size, args.size,
                                                          (", " + mode) if mode else ""),
           result, b, [("trainer (prototxt)", hand_name)])


if __name__ == "__main__":
    main()
