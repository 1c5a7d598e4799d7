"""Fidelity: every net of refs/bvlc/layer_outputs, forward and backward, against real Caffe.

Each case was run once forward and once backward in pycaffe (TRAIN phase); outputs.npz holds every
blob's data and diff and every param's data and diff (see refs/README.md). We run the same net
through our pycaffe-shaped API and compare within 1e-4 relative.
"""
import json
import os

import numpy as np
import pytest

from conftest import refs_path
from refcheck import backward_lines, mismatch

CASES = ["conv_pool", "activations", "structure", "norm", "losses", "noback"]


def run_case(case, monkeypatch, glog_capture):
    from layers.net import Net
    root = refs_path("bvlc", "layer_outputs", case)
    monkeypatch.chdir(root)          # Caffe resolves relative paths (infogain H) against the cwd
    meta = json.load(open("meta.json"))
    ref = np.load("outputs.npz")
    net = Net("net.prototxt", meta["phase"], weights="init.caffemodel")
    log = glog_capture.getvalue()
    inputs = {k[len("input__"):]: ref[k] for k in ref.files if k.startswith("input__")}
    net.forward(**inputs)
    diffs = {k[len("topdiff__"):]: ref[k] for k in ref.files if k.startswith("topdiff__")}
    net.backward(**diffs)
    return net, ref, meta, log


@pytest.mark.parametrize("case", CASES)
def test_needs_backward_lines(case, monkeypatch, glog_capture):
    net, ref, meta, log = run_case(case, monkeypatch, glog_capture)
    expected = backward_lines(open(os.path.join(refs_path("bvlc", "layer_outputs", case),
                                                "construct.log")).read())
    assert backward_lines(log) == expected


@pytest.mark.parametrize("case", CASES)
def test_forward_data(case, monkeypatch, glog_capture):
    net, ref, meta, log = run_case(case, monkeypatch, glog_capture)
    problems = {}
    for key in ref.files:
        if key.startswith("data__"):
            name = key[len("data__"):]
            if name not in net.blobs:
                problems[name] = "missing blob"
                continue
            m = mismatch(net.blobs[name].data, ref[key])
            if m:
                problems[name] = m
    assert not problems, problems


@pytest.mark.parametrize("case", CASES)
def test_backward_diffs(case, monkeypatch, glog_capture):
    net, ref, meta, log = run_case(case, monkeypatch, glog_capture)
    problems = {}
    for key in ref.files:
        if key.startswith("diff__"):
            name = key[len("diff__"):]
            if name not in net.blobs:
                problems[name] = "missing blob"
                continue
            m = mismatch(net.blobs[name].diff, ref[key])
            if m:
                problems[name] = m
    assert not problems, problems


@pytest.mark.parametrize("case", CASES)
def test_params(case, monkeypatch, glog_capture):
    net, ref, meta, log = run_case(case, monkeypatch, glog_capture)
    problems = {}
    for key in ref.files:
        for kind in ("param_data__", "param_diff__", "param_init__"):
            if not key.startswith(kind):
                continue
            layer, idx = key[len(kind):].rsplit("__", 1)
            if layer not in net.params:
                problems[key] = "missing params"
                continue
            if kind == "param_init__":
                continue
            view = net.params[layer][int(idx)]
            m = mismatch(view.data if kind == "param_data__" else view.diff, ref[key])
            if m:
                problems[key] = m
    assert not problems, problems


@pytest.mark.parametrize("case", CASES)
def test_losses(case, monkeypatch, glog_capture):
    net, ref, meta, log = run_case(case, monkeypatch, glog_capture)
    for name, value in meta["losses"].items():
        assert mismatch(net.blobs[name].data, np.float32(value)) is None, name
