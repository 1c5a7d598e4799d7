"""Comparison helpers for fidelity tests against real Caffe's outputs."""
import re

import numpy as np

LOG_LINE = re.compile(r"^([IWEF])(\d{4}|\d{8}) (\d\d:\d\d:\d\d\.\d{6}) +(\d+) ([^ \]:]+:\d+)\] (.*)$")


def mismatch(ours, ref, rtol=1e-4, atol_scale=1e-5):
    """None if ``ours`` matches ``ref`` within rtol (with an absolute floor scaled to the
    array's magnitude, for values near zero); otherwise a short description."""
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if ours.shape != ref.shape:
        if ours.size == ref.size == 1:
            ours = ours.reshape(ref.shape)
        else:
            return "shape %s vs ref %s" % (ours.shape, ref.shape)
    scale = max(1.0, float(np.abs(ref).max())) if ref.size else 1.0
    atol = atol_scale * scale
    bad = ~np.isclose(ours, ref, rtol=rtol, atol=atol)
    if not bad.any():
        return None
    idx = np.argwhere(bad)[0]
    return "%d/%d differ, first at %s: %r vs ref %r" % (
        bad.sum(), bad.size, tuple(idx), ours[tuple(idx)], ref[tuple(idx)])


def log_texts(text, where_prefix=None):
    """(tag, message) of every glog line in ``text``, optionally only tags starting with a prefix."""
    out = []
    for line in text.splitlines():
        m = LOG_LINE.match(line)
        if m and (where_prefix is None or m.group(5).startswith(where_prefix)):
            out.append((m.group(5), m.group(6)))
    return out


def backward_lines(text):
    return [msg for tag, msg in log_texts(text)
            if msg.endswith("needs backward computation.")
            or msg.endswith("does not need backward computation.")]
