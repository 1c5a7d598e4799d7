"""Layer-by-layer execution of a Net for timing (Caffe's ``caffe time``).

Training uses one autograd graph for the whole net. To time each layer's Backward as Caffe does,
this runs every layer on detached bottoms (so each layer owns a small graph) and then calls
``torch.autograd.grad`` layer by layer in reverse order, passing each layer's bottom diffs down.
A layer that Caffe would not back-propagate (no learnable param at or below it, or not under a
loss) has nothing to compute and costs nothing here, exactly as in training.
"""
import time

import torch


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class LayerwiseRunner:
    def __init__(self, net):
        self.net = net
        self.device = net.device

    def forward(self, times=None):
        """Forward every layer; returns the per-layer graphs needed by :meth:`backward`."""
        net = self.net
        data = {}
        graphs = []
        for li, layer in enumerate(net.layer_modules):
            bottoms = []
            for j, name in enumerate(net.bottom_names[li]):
                b = data[name]
                if net.bottom_need_backward[li][j] and b.is_floating_point():
                    b = b.detach().requires_grad_(True)
                else:
                    b = b.detach()
                bottoms.append(b)
            if times is not None:
                _sync(self.device)
                start = time.perf_counter()
            tops = layer(*bottoms)
            if isinstance(tops, torch.Tensor):
                tops = (tops,)
            if times is not None:
                _sync(self.device)
                times[li] += time.perf_counter() - start
            for name, value in zip(net.top_names[li], tops):
                data[name] = value
            graphs.append((bottoms, tops))
        return data, graphs

    def loss(self, data):
        total = 0.0
        for li, j, w in self.net.loss_tops:
            total += float(data[self.net.top_names[li][j]].detach().sum()) * w
        return total

    def backward(self, graphs, times=None):
        """Backward layer by layer in reverse order, as Caffe's Net::Backward."""
        net = self.net
        grads = {}
        for li in range(len(net.layer_modules) - 1, -1, -1):
            bottoms, tops = graphs[li]
            if not net.need_backward[li]:
                continue
            outs, gouts = [], []
            for j, (name, top) in enumerate(zip(net.top_names[li], tops)):
                if not top.requires_grad:
                    continue
                g = grads.pop(name, None)
                w = net.loss_weights[li][j]
                if w:
                    seed = torch.full_like(top, w)
                    g = seed if g is None else g + seed
                if g is not None:
                    outs.append(top)
                    gouts.append(g)
            inputs = [b for b in bottoms if b.requires_grad]
            params = [p for p in net.layer_modules[li].blobs if p.requires_grad]
            if not outs or not (inputs or params):
                continue
            if times is not None:
                _sync(self.device)
                start = time.perf_counter()
            result = torch.autograd.grad(outs, inputs + params, gouts, allow_unused=True)
            if times is not None:
                _sync(self.device)
                times[li] += time.perf_counter() - start
            k = 0
            for j, name in enumerate(net.bottom_names[li]):
                if bottoms[j].requires_grad:
                    g = result[k]
                    k += 1
                    if g is not None:
                        grads[name] = g if name not in grads else grads[name] + g
            for p, g in zip(params, result[len(inputs):]):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad + g
