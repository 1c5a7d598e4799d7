"""A small ResNet (3 basic blocks: Convolution + BatchNorm + Scale + ReLU, Eltwise SUM shortcut)
from a prototxt, trained by `trainer` (Net.run + Caffe SGD) against the same net hand-written in
torch (nn.Conv2d, F.batch_norm, affine, add), interleaved trials, median.

Usage: python benchmarks/resnet_block.py [--device cuda] [--batch N] [--blocks N] [--width C]
"""
import torch
import torch.nn.functional as F

from harness import finish_args, hand_step, net_from_text, parser, report, run, trainer_step


def conv(name, bottom, top, out, k, pad, stride=1):
    return ('layer { name: "%s" type: "Convolution" bottom: "%s" top: "%s"\n'
            '  param { lr_mult: 1 } convolution_param { num_output: %d kernel_size: %d pad: %d '
            'stride: %d bias_term: false weight_filler { type: "msra" } } }\n'
            % (name, bottom, top, out, k, pad, stride))


def bn_scale(name, blob):
    return ('layer { name: "%s_bn" type: "BatchNorm" bottom: "%s" top: "%s" }\n'
            'layer { name: "%s_scale" type: "Scale" bottom: "%s" top: "%s"\n'
            '  param { lr_mult: 1 decay_mult: 0 } param { lr_mult: 1 decay_mult: 0 }\n'
            '  scale_param { bias_term: true } }\n' % (name, blob, blob, name, blob, blob))


def relu(name, blob):
    return 'layer { name: "%s" type: "ReLU" bottom: "%s" top: "%s" }\n' % (name, blob, blob)


def prototxt(batch, size, width, blocks, classes=10):
    text = ['name: "ResNetBlocks"\n',
            'layer { name: "data" type: "Input" top: "data" top: "label"\n'
            '  input_param { shape { dim: %d dim: 3 dim: %d dim: %d } shape { dim: %d } } }\n'
            % (batch, size, size, batch)]
    text.append(conv("conv1", "data", "conv1", width, 3, 1) + bn_scale("conv1", "conv1") +
                relu("conv1_relu", "conv1"))
    prev = "conv1"
    for b in range(blocks):
        n = "res%d" % b
        text.append(conv(n + "_a", prev, n + "_a", width, 3, 1) + bn_scale(n + "_a", n + "_a") +
                    relu(n + "_a_relu", n + "_a"))
        text.append(conv(n + "_b", n + "_a", n + "_b", width, 3, 1) + bn_scale(n + "_b", n + "_b"))
        text.append('layer { name: "%s" type: "Eltwise" bottom: "%s" bottom: "%s" top: "%s" '
                    'eltwise_param { operation: SUM } }\n' % (n, prev, n + "_b", n))
        text.append(relu(n + "_relu", n))
        prev = n
    text.append('layer { name: "pool" type: "Pooling" bottom: "%s" top: "pool" '
                'pooling_param { pool: AVE global_pooling: true } }\n' % prev)
    text.append('layer { name: "fc" type: "InnerProduct" bottom: "pool" top: "fc"\n'
                '  param { lr_mult: 1 } param { lr_mult: 2 decay_mult: 0 }\n'
                '  inner_product_param { num_output: %d weight_filler { type: "msra" } } }\n'
                % classes)
    text.append('layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" '
                'top: "loss" }\n')
    return "".join(text)


class HandResNet(torch.nn.Module):
    """The same net: BatchNorm in training mode (batch statistics, running averages updated)
    with the affine inside the batch_norm kernel, as a torch user writes Caffe's BatchNorm +
    Scale (and as trainer runs them: Net._fusable_batchnorm_scale)."""

    def __init__(self, width, blocks, classes=10):
        super().__init__()
        self.convs = torch.nn.ModuleList(
            [torch.nn.Conv2d(3, width, 3, padding=1, bias=False)] +
            [torch.nn.Conv2d(width, width, 3, padding=1, bias=False) for _ in range(2 * blocks)])
        n = len(self.convs)
        self.gamma = torch.nn.ParameterList([torch.nn.Parameter(torch.ones(width))
                                             for _ in range(n)])
        self.beta = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(width))
                                            for _ in range(n)])
        for i in range(n):
            self.register_buffer("mean%d" % i, torch.zeros(width))
            self.register_buffer("var%d" % i, torch.ones(width))
        self.fc = torch.nn.Linear(width, classes)
        self.blocks = blocks

    def cbs(self, i, x, relu=True):
        x = self.convs[i](x)
        x = F.batch_norm(x, getattr(self, "mean%d" % i), getattr(self, "var%d" % i),
                         self.gamma[i], self.beta[i], training=True, momentum=0.001, eps=1e-5)
        return F.relu(x) if relu else x

    def forward(self, x, y):
        x = self.cbs(0, x)
        for b in range(self.blocks):
            h = self.cbs(1 + 2 * b, x)
            h = self.cbs(2 + 2 * b, h, relu=False)
            x = F.relu(x + h)
        x = x.mean((2, 3))
        return F.cross_entropy(self.fc(x), y)


def main():
    ap = parser(__doc__, batch_cpu=16, batch_gpu=128, iters_cpu=5, iters_gpu=50)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--blocks", type=int, default=3)
    args = finish_args(ap.parse_args())
    dev, b = args.device, args.batch
    torch.manual_seed(0)
    x = torch.rand(b, 3, args.size, args.size, device=dev)
    y = torch.randint(0, 10, (b,), device=dev)
    net = net_from_text(prototxt(b, args.size, args.width, args.blocks)).to(dev)
    trainer = trainer_step(net, {"data": x, "label": y.float()})
    hand = HandResNet(args.width, args.blocks).to(dev)
    mults = ([(c.weight, 1, 1) for c in hand.convs] + [(g, 1, 0) for g in hand.gamma] +
             [(bt, 1, 0) for bt in hand.beta] + [(hand.fc.weight, 1, 1), (hand.fc.bias, 2, 0)])
    hand_fn = hand_step(lambda: hand(x, y), mults)
    result = run([("trainer (prototxt)", trainer), ("hand-written torch", hand_fn)], args)
    report("ResNet blocks (%d x 2 conv %d ch, BatchNorm+Scale+Eltwise), batch %d, %dx%d, "
           "training step" % (args.blocks, args.width, b, args.size, args.size), result, b,
           [("trainer (prototxt)", "hand-written torch")])


if __name__ == "__main__":
    main()
