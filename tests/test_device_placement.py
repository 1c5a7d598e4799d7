"""Every layer keeps its work on the device of its inputs, checked without a GPU.

On CUDA a layer that makes a tensor with no `device=` (a `torch.zeros(n)`, a `torch.tensor(...)`
of prior boxes, an index built with `torch.arange`) fails with "Expected all tensors to be on the
same device", but only on a GPU, which CI does not have. PyTorch's "meta" device has the same
rule and no data: a net moved to "meta" and fed meta tensors runs every layer's forward and
backward as shapes only, and any tensor that was made on the CPU meets a meta one and raises the
same error CUDA would (0-dim CPU scalars are allowed, as on CUDA). So this file runs the smoke
net of every layer type (tests/test_layer_coverage.py's table) forward and backward on "meta".

Not checked here: data layers (their batches are made on the host and moved by
`to_device_async`, covered by tests/test_cuda.py on a GPU), and the layers whose output shape or
control flow depends on values (they read them on the host by design, and meta tensors have
none; tests/test_host_reads.py counts those reads).
"""
import numpy as np
import pytest
import torch

import test_layer_coverage as coverage

# Batches made on the host by a loader: placement is to_device_async's job, not the layer's.
DATA_LAYERS = {"Data", "ImageData", "HDF5Data", "MemoryData", "DummyData", "AnnotatedData",
               "WindowData", "Parameter"}
# Output shape or control flow read from values (host reads by design; see test_host_reads.py).
VALUE_DEPENDENT = {
    "BatchReindex": "output size is the number of indices, read from the index blob",
    "Filter": "output size is the number of nonzero selectors",
    "MultiBoxLoss": "matching and hard-negative mining run on the host",
    "DetectionOutput": "NMS keeps a data-dependent number of boxes",
    "DetectionEvaluate": "matches detections to ground truth on the host",
}

CASES = [p for p in coverage.SMOKE
         if p.values[0]["type"] not in DATA_LAYERS | set(VALUE_DEPENDENT)]


def _meta_feed(c):
    feed = {}
    for i, (name, shape) in enumerate(c["inputs"]):
        value = c["feed"].get(name, coverage._rand(*shape, seed=i + 1))
        t = torch.as_tensor(np.asarray(value, np.float32)).to("meta")
        feed[name] = t.requires_grad_(name in c["grads"])
    return feed


@pytest.mark.parametrize("c", CASES)
def test_layer_runs_forward_and_backward_on_the_device_of_its_inputs(c, tmp_path):
    layer = coverage._special_layer(c, tmp_path)
    net = coverage._net(coverage._net_text(layer, c["inputs"]), phase=c["phase"]).to("meta")
    for name, t in list(net.named_parameters()) + list(net.named_buffers()):
        assert t.device.type == "meta", "%s stayed on %s" % (name, t.device)
    feed = _meta_feed(c)
    total = net.run(retain=True, inputs=feed)
    tensors, grads = [], []
    if total is not None and total.requires_grad:
        tensors.append(total)
        grads.append(torch.ones_like(total))
    for name in net.outputs:
        t = net._data[name]
        assert t.device.type == "meta", "output %s was made on %s" % (name, t.device)
        if not net.output_loss_weight(name) and t.requires_grad:
            tensors.append(t)
            grads.append(torch.ones_like(t))
    if tensors:
        torch.autograd.backward(tensors, grads)
    for name in c["grads"]:
        if name in feed:
            assert feed[name].grad is not None, "no gradient reached %s" % name
            assert feed[name].grad.device.type == "meta", name


def test_meta_catches_a_tensor_made_on_the_host():
    """The check can fail: a layer-like computation that builds a CPU tensor is caught."""
    x = torch.ones(2, 3, device="meta")
    with pytest.raises((RuntimeError, NotImplementedError)):
        x + torch.arange(3.0)   # what `offsets = torch.arange(n)` without device= does in a layer


def test_every_layer_type_is_checked_or_excused():
    checked = {p.values[0]["type"] for p in CASES}
    all_types = {p.values[0]["type"] for p in coverage.SMOKE}
    assert sorted(all_types - checked - DATA_LAYERS - set(VALUE_DEPENDENT)) == []
    assert len(checked) >= 50
