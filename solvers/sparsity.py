"""Keep pruned weights pruned (``trainer train --keep-sparsity``, the user's seed 004).

Weights of Convolution, Deconvolution and InnerProduct layers that are exactly zero when training
starts (i.e. in the loaded caffemodel) stay exactly zero: their gradient is masked before the
update, so weight decay and momentum never move them, and the weights are masked again after the
update as a guarantee. The masks live on the params' device. The log reports each layer's
sparsity at start and at every snapshot.
"""
import torch

from converters import glog

MASKED_TYPES = ("Convolution", "Deconvolution", "InnerProduct")


class SparsityMasks:
    def __init__(self, net):
        self.entries = []     # (layer name, weight tensor, mask)
        for li, layer in enumerate(net.layer_modules):
            if net.layer_types[li] not in MASKED_TYPES or not len(layer.blobs):
                continue
            weight = layer.blobs[0]
            if not weight.requires_grad:
                continue
            mask = (weight.detach() != 0).to(weight.dtype)
            self.entries.append((net.layer_names[li], weight, mask))
        self.log("start")

    def to(self, device):
        self.entries = [(n, w, m.to(device)) for n, w, m in self.entries]
        return self

    def mask_gradients(self):
        for _, weight, mask in self.entries:
            if weight.grad is not None:
                weight.grad.mul_(mask)

    @torch.no_grad()
    def mask_weights(self):
        for _, weight, mask in self.entries:
            weight.mul_(mask)

    def log(self, when):
        for name, weight, mask in self.entries:
            zeros = int((weight.detach() == 0).sum())
            total = weight.numel()
            glog.info("Sparsity at %s: layer %s: %d of %d weights are zero (%.2f%%)%s" % (
                when, name, zeros, total, 100.0 * zeros / max(total, 1),
                "" if when == "start" else ", %d kept at zero" % int((mask == 0).sum())),
                where="sparsity.py:1")
