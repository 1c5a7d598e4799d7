"""Keep pruned weights pruned (``trainer train --keep-sparsity``, the user's seed 004).

Weights of Convolution, Deconvolution and InnerProduct layers that are exactly zero when training
starts (i.e. in the loaded caffemodel, or in the restored snapshot) stay exactly zero: their
gradient is masked before the update, so weight decay (L2 and L1), momentum and the adaptive
solvers' histories never move them (the history of a masked weight stays zero), and the weights
are masked again after the update as a guarantee. Biases are not masked. The masks live on the
params' device: the CPU and CUDA paths are the same torch code.

The log reports each layer's sparsity at start and at every snapshot (frozen layers, whose weights
cannot change, are reported as such and not masked). A run with ``--keep-sparsity`` whose weights
have no zero at all gets a ``W`` line: the caffemodel was probably not the pruned one.
"""
import torch

from converters import glog

MASKED_TYPES = ("Convolution", "Deconvolution", "InnerProduct")


class SparsityMasks:
    def __init__(self, net):
        self.entries = []     # (layer name, weight tensor, mask) of the trained layers
        self.frozen = []      # (layer name, weight tensor) of the frozen ones
        seen = set()
        for li, layer in enumerate(net.layer_modules):
            if net.layer_types[li] not in MASKED_TYPES or not len(layer.blobs):
                continue
            weight = layer.blobs[0]
            if id(weight) in seen:          # shared by name: one tensor, one mask
                continue
            seen.add(id(weight))
            if not weight.requires_grad:
                self.frozen.append((net.layer_names[li], weight))
                continue
            mask = (weight.detach() != 0).to(weight.dtype)
            self.entries.append((net.layer_names[li], weight, mask))
        self.log("start")
        if self.entries and not any(bool((m == 0).any()) for _, _, m in self.entries):
            glog.warning("--keep-sparsity: no weight of the trained Convolution / "
                         "Deconvolution / InnerProduct layers is zero, so nothing is kept at "
                         "zero. Pass the pruned caffemodel with --weights (or resume from a "
                         "snapshot of a pruned run).")

    def to(self, device):
        self.entries = [(n, w, m.to(device)) for n, w, m in self.entries]
        return self

    def _follow(self):
        """Keep the masks beside their weights (the net may have moved after setup)."""
        for k, (n, w, m) in enumerate(self.entries):
            if m.device != w.device or m.dtype != w.dtype:
                self.entries[k] = (n, w, m.to(device=w.device, dtype=w.dtype))

    def mask_gradients(self):
        self._follow()
        for _, weight, mask in self.entries:
            if weight.grad is not None:
                weight.grad.mul_(mask)

    @torch.no_grad()
    def mask_weights(self):
        self._follow()
        for _, weight, mask in self.entries:
            weight.mul_(mask)

    def log(self, when):
        for name, weight, mask in self.entries:
            zeros = int((weight.detach() == 0).sum())
            total = weight.numel()
            glog.info("Sparsity at %s: layer %s: %d of %d weights are zero (%.2f%%)%s" % (
                when, name, zeros, total, 100.0 * zeros / max(total, 1),
                "" if when == "start" else ", %d kept at zero" % int((mask == 0).sum())))
        for name, weight in self.frozen:
            zeros = int((weight.detach() == 0).sum())
            total = weight.numel()
            glog.info("Sparsity at %s: layer %s: %d of %d weights are zero (%.2f%%), frozen "
                      "(lr_mult 0)" % (when, name, zeros, total, 100.0 * zeros / max(total, 1)))
