"""Activation memory of one training step: `trainer` (Net.run + backward) against the hand-written
torch module of the same net (LeNet, the ResNet block net, the number-plate SSD "all trainable" and
"as written"; the builders are imported from lenet.py, resnet_block.py and ssd_plate.py).

Caffe keeps one blob per top, and an in-place top shares its bottom's memory; our issue #5 asks
for no copy of a blob that Caffe would not keep. Measured, each storage counted once (by the
data_ptr of ``t.untyped_storage()``), parameters and buffers never:

* saved for backward: what autograd keeps from the forward (``saved_tensors_hooks``);
* blobs: what the Net holds after forward besides its inputs (``net._data``: the current version
  of every blob name; ``net._first``: the first version of a blob rewritten in place, kept only
  for pycaffe's ``.diff`` view); the hand-written module holds none;
* live: saved and blobs together, what the step holds at the end of its forward;
* peak: the most memory allocated during a full step (forward + backward, no blobs or gradients
  held before it) above what was allocated before it: ``torch.cuda.max_memory_allocated`` on
  CUDA; on the CPU the allocation events of ``torch.profiler`` (``profile_memory``) replayed in
  time order, c10's CPU allocator only (oneDNN's own scratch memory is not seen).

The Net keeps every blob until the next forward, as Caffe does (Caffe keeps their diffs too),
while a hand-written module lets autograd free each saved tensor during backward: that, not a
copy, is what separates the peaks. Saved-for-backward is the figure to hold at 1; live is above
it only by blobs Caffe keeps too (a Scale top feeding an Eltwise, which saves neither input).

Usage: python benchmarks/memory.py [--device cuda] [--batch N] [--nets lenet,resnet,ssd]
"""
import argparse
import re

import torch

import common  # noqa: F401  (puts the repository root on sys.path)
from common import machine

MIB = float(1 << 20)


def storage_key(t):
    try:
        s = t.untyped_storage()
    except (RuntimeError, NotImplementedError):     # no storage (sparse, nested, ...)
        return None, 0
    return (s.device, s.data_ptr()), s.nbytes()


def storages(tensors, exclude=()):
    """{storage key: bytes} of ``tensors``, each storage once, none of ``exclude``'s."""
    skip = {storage_key(t)[0] for t in exclude}
    out = {}
    for t in tensors:
        key, nbytes = storage_key(t)
        if key is not None and key not in skip and key[1]:
            out[key] = nbytes
    return out


def saved_for_backward(fn, exclude=()):
    """Run ``fn`` (a forward returning the loss); returns (its result, {storage key: bytes} of
    the tensors autograd saved for backward, excluding the storages of ``exclude`` (params))."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, storages(saved, exclude)


def module_state(module):
    return list(module.parameters()) + list(module.buffers())


def net_blobs(net):
    """{storage key: bytes} of the blobs a Net holds after forward, its Input tops excepted."""
    inputs = [net._data[t] for t in net.inputs if t in net._data]
    return storages(list(net._data.values()) + list(net._first.values()), inputs)


def peak_bytes(step, device):
    """Most bytes allocated during ``step()`` above the allocation before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) - base
    if device.type != "cpu":
        return None
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = []

    def walk(node):
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    current = peak = 0
    for _, size in sorted(events, key=lambda e: e[0]):
        current += size
        peak = max(peak, current)
    return peak


def measure_trainer(net, feed, device, peak=True):
    """{saved, blobs, live, peak} in bytes for one Net.run + backward."""
    params = module_state(net)
    for p in params:
        p.grad = None
    loss, saved = saved_for_backward(lambda: net.run(inputs=feed), params)
    blobs = net_blobs(net)
    loss.backward()
    out = {"saved": sum(saved.values()), "blobs": sum(blobs.values()),
           "live": sum({**saved, **blobs}.values())}
    if peak:
        net._data.clear()           # both sides start from the same state: no blobs, no grads
        net._first.clear()
        for p in params:
            p.grad = None
        out["peak"] = peak_bytes(lambda: net.run(inputs=feed).backward(), device)
    return out


def measure_hand(module, forward, device, peak=True):
    params = module_state(module)
    for p in params:
        p.grad = None
    loss, saved = saved_for_backward(forward, params)
    loss.backward()
    out = {"saved": sum(saved.values()), "blobs": 0, "live": sum(saved.values())}
    if peak:
        for p in params:
            p.grad = None
        out["peak"] = peak_bytes(lambda: forward().backward(), device)
    return out


# ----------------------------------------------------------------------------- the nets
def lenet_pair(batch, device):
    from lenet import LENET, HandLeNet
    from harness import net_from_text
    torch.manual_seed(0)
    x = torch.rand(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    net = net_from_text(re.sub(r"dim: 64\b", "dim: %d" % batch, LENET)).to(device)
    hand = HandLeNet().to(device)
    return net, {"data": x, "label": y.float()}, hand, lambda: hand(x, y)


def resnet_pair(batch, device, size=32, width=32, blocks=3):
    from resnet_block import HandResNet, prototxt
    from harness import net_from_text
    torch.manual_seed(0)
    x = torch.rand(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    net = net_from_text(prototxt(batch, size, width, blocks)).to(device)
    hand = HandResNet(width, blocks).to(device)
    return net, {"data": x, "label": y.float()}, hand, lambda: hand(x, y)


def ssd_pair(batch, device, variant, size=480):
    from layers.net import Net
    from ssd_plate import HandSSD, labels, make_net_param
    torch.manual_seed(0)
    x = torch.rand(batch, 3, size, size, device=device) * 255 - 117
    label = labels(batch, device)
    net = Net(make_net_param(batch, size, variant), "TRAIN", log=False).to(device)
    hand = HandSSD(net, variant).to(device)
    hand.size = size
    hand(x, label)          # the hand-written net computes its constant priors once
    return net, {"data": x, "label": label}, hand, lambda: hand(x, label)


NETS = {   # key: (title, default CPU batch, default CUDA batch, builders)
    "lenet": ("LeNet", 64, 64, [("", lenet_pair)]),
    "resnet": ("ResNet blocks (3 x 2 conv 32 ch, 32x32)", 16, 128, [("", resnet_pair)]),
    "ssd": ("Number-plate SSD (seed 000, 480x480)", 2, 16,
            [(v, lambda b, d, v=v: ssd_pair(b, d, v)) for v in ("all trainable", "as written")]),
}


def measure_pair(make, batch, device, peak=True):
    net, feed, hand, forward = make(batch, device)
    trainer = measure_trainer(net, feed, device, peak)
    # the trainer's held blobs go before the hand-written module runs
    net._data.clear()
    net._first.clear()
    return trainer, measure_hand(hand, forward, device, peak)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None,
                    help="batch size of every net (default: each net's speed-benchmark batch)")
    ap.add_argument("--nets", default="lenet,resnet,ssd")
    ap.add_argument("--no-peak", action="store_true", help="skip the peak (profiled) steps")
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    print("Activation memory of one training step on %s (%s)"
          % (machine(), "peak: torch.cuda.max_memory_allocated" if cuda else
             "peak: torch.profiler allocation events, c10 CPU allocator"))
    for key in [k.strip() for k in args.nets.split(",") if k.strip()]:
        title, batch_cpu, batch_gpu, builders = NETS[key]
        batch = args.batch or (batch_gpu if cuda else batch_cpu)
        for variant, make in builders:
            trainer, hand = measure_pair(make, batch, device, not args.no_peak)
            print("%s%s, batch %d" % (title, ", " + variant if variant else "", batch))
            for name, m in (("trainer", trainer), ("hand-written", hand)):
                peak = m.get("peak")
                print("  %-13s %9.2f MiB saved-for-backward  %9.2f MiB blobs  %9.2f MiB live"
                      "  %s" % (name, m["saved"] / MIB, m["blobs"] / MIB, m["live"] / MIB,
                                "peak n/a" if peak is None else "%9.2f MiB peak" % (peak / MIB)))
            ratios = ["%s %.3f" % (what, trainer[what] / hand[what])
                      for what in ("saved", "live", "peak")
                      if trainer.get(what) is not None and hand.get(what)]
            print("  ratio trainer / hand-written: %s" % ", ".join(ratios))


if __name__ == "__main__":
    main()
