"""Read Caffe logs and compare ours with real Caffe's, line by line.

A log is a list of entries (tag, text); a glog line's continuation lines (the solver and net
protos Caffe prints) are appended to the entry's text. Two logs match when they have the same
entries in the same order, with equal text except numbers, which agree within a relative
tolerance. Lines whose position depends on Caffe's prefetch thread (data_layer.cpp:73,
blocking_queue.cpp:49) and the wall-clock part of "Iteration N (... iter/s, ...)" are ignored.
"""
import re

from refcheck import LOG_LINE

NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|nan|inf)")
TIMING = re.compile(r"\((?:[^()]*) iter/s, (?:[^()]*)s/(\d+) iters\)")
THREAD_LINES = ("data_layer.cpp:73", "blocking_queue.cpp:49")


def parse(text):
    entries = []
    for line in text.splitlines():
        m = LOG_LINE.match(line)
        if m:
            entries.append([m.group(1), m.group(5), m.group(6)])
        elif entries and not line.startswith("*** "):
            entries[-1][2] += "\n" + line
    return [tuple(e) for e in entries]


def normalise(entries, drop=THREAD_LINES):
    out = []
    for severity, tag, text in entries:
        if tag in drop:
            continue
        text = TIMING.sub(lambda m: "(T iter/s, Ts/%s iters)" % m.group(1), text)
        out.append((severity, tag, text.rstrip()))
    return out


def numbers_close(a, b, rtol):
    ta, tb = NUMBER.split(a), NUMBER.split(b)
    na, nb = NUMBER.findall(a), NUMBER.findall(b)
    if ta != tb or len(na) != len(nb):
        return False
    for x, y in zip(na, nb):
        if x == y:
            continue
        fx, fy = float(x), float(y)
        if abs(fx - fy) > rtol * max(abs(fx), abs(fy)) + 1e-7:
            return False
    return True


def compare(ours, ref, rtol=1e-3, skip=()):
    """List of differences between two parsed logs (empty when they match)."""
    a = [e for e in normalise(ours) if not any(s(e) for s in skip)]
    b = [e for e in normalise(ref) if not any(s(e) for s in skip)]
    problems = []
    for i, (x, y) in enumerate(zip(a, b)):
        if x[0] != y[0] or x[1] != y[1] or not numbers_close(x[2], y[2], rtol):
            problems.append("entry %d:\n  ours: %s %s %s\n  caffe: %s %s %s" % (
                i, x[0], x[1], x[2][:300], y[0], y[1], y[2][:300]))
            if len(problems) >= 8:
                break
    if len(a) != len(b):
        problems.append("ours has %d entries, Caffe's %d" % (len(a), len(b)))
    return problems


def iteration_losses(entries):
    out = {}
    for _, tag, text in entries:
        m = re.match(r"Iteration (\d+) \(.*\), loss = (\S+)", text)
        if m:
            out[int(m.group(1))] = float(m.group(2))
    return out
