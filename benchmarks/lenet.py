"""LeNet training step: `trainer`'s Net + Caffe SGD against a hand-written torch module.

Both run the same ops on the same fixed batch (64x1x28x28 by default) with Caffe's SGD update
(momentum 0.9, weight decay 5e-4, lr_mult 1/2), so the ratio measures what the Caffe machinery
costs over plain torch; ``--batch 1`` leaves little but that cost (per-layer Python work, which on
a GPU is what small nets wait on). Goal: trainer / hand-written <= 1.05.
Usage: python benchmarks/lenet.py [--device cuda] [--batch N] [--threads N]
"""
import torch
import torch.nn.functional as F

import harness

LENET = """
name: "LeNetBench"
layer { name: "data" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 64 dim: 1 dim: 28 dim: 28 } shape { dim: 64 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param { lr_mult: 1 } param { lr_mult: 2 }
  convolution_param { num_output: 20 kernel_size: 5 weight_filler { type: "xavier" } } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  param { lr_mult: 1 } param { lr_mult: 2 }
  convolution_param { num_output: 50 kernel_size: 5 weight_filler { type: "xavier" } } }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool2" top: "ip1"
  param { lr_mult: 1 } param { lr_mult: 2 }
  inner_product_param { num_output: 500 weight_filler { type: "xavier" } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  param { lr_mult: 1 } param { lr_mult: 2 }
  inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""

SOLVER = 'base_lr: 0.01 momentum: 0.9 weight_decay: 0.0005 lr_policy: "fixed" type: "SGD"'


class HandLeNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 20, 5)
        self.conv2 = torch.nn.Conv2d(20, 50, 5)
        self.ip1 = torch.nn.Linear(800, 500)
        self.ip2 = torch.nn.Linear(500, 10)

    def forward(self, x, y):
        x = F.max_pool2d(self.conv1(x), 2, 2, ceil_mode=True)
        x = F.max_pool2d(self.conv2(x), 2, 2, ceil_mode=True)
        x = F.relu(self.ip1(x.flatten(1)))
        return F.cross_entropy(self.ip2(x), y)


def main():
    ap = harness.parser(__doc__, batch_cpu=64, batch_gpu=64, iters_cpu=20, iters_gpu=50)
    args = harness.finish_args(ap.parse_args())
    device, b = args.device, args.batch
    torch.manual_seed(0)
    x = torch.rand(b, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (b,), device=device)
    net = harness.net_from_text(LENET.replace("dim: 64", "dim: %d" % b)).to(device)
    trainer_step = harness.trainer_step(net, {"data": x, "label": y.float()}, SOLVER)
    hand = HandLeNet().to(device)
    hand_params = [hand.conv1.weight, hand.conv1.bias, hand.conv2.weight, hand.conv2.bias,
                   hand.ip1.weight, hand.ip1.bias, hand.ip2.weight, hand.ip2.bias]
    mults = [1, 2] * 4
    hand_step = harness.hand_step(lambda: hand(x, y),
                                  [(p, m, 1) for p, m in zip(hand_params, mults)])
    result = harness.run([("trainer", trainer_step), ("hand-written torch", hand_step)], args)
    harness.report("LeNet training step, batch %d, 28x28" % b, result, b,
                   [("trainer", "hand-written torch")])
    print("  top-level torch ops per step: trainer %d, hand-written %d"
          % (harness.count_ops(trainer_step), harness.count_ops(hand_step)))


if __name__ == "__main__":
    main()
