"""`trainer time` prints Caffe's per-layer and average lines; frozen work costs no backward.
`trainer device_query` without CUDA is one clear fatal line."""
import re

from test_lenet_fidelity import run_trainer

NET = """
name: "TimeNet"
layer { name: "data" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 8 dim: 1 dim: 12 dim: 12 } shape { dim: 8 } } }
layer { name: "frozen" type: "Convolution" bottom: "data" top: "frozen"
  param { lr_mult: 0 } param { lr_mult: 0 }
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "conv" type: "Convolution" bottom: "frozen" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
  inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


def test_time_lines_and_frozen_backward(tmp_path):
    (tmp_path / "net.prototxt").write_text(NET)
    proc = run_trainer(["time", "-model", "net.prototxt", "-iterations", "3",
                        "--no-explain-backward"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    for text in ("caffe.cpp:364] Performing Forward", "caffe.cpp:380] *** Benchmark begins ***",
                 "Testing for 3 iterations.", "Average Forward pass:", "Average Backward pass:",
                 "Average Forward-Backward:", "Total Time:", "*** Benchmark ends ***"):
        assert text in err, text
    assert len(re.findall(r"Iteration: \d+ forward-backward time: \d+ ms\.", err)) == 3
    backward = dict(re.findall(r"\]\s+(\S+)\tbackward: (\S+) ms\.", err))
    assert set(backward) == {"data", "frozen", "conv", "ip", "loss"}
    # the frozen conv lies below the first trainable layer: no backward at all
    assert float(backward["frozen"]) == 0.0 and float(backward["data"]) == 0.0
    assert float(backward["conv"]) > 0.0


def test_device_query_without_cuda_is_one_fatal_line(tmp_path):
    import pytest
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: tests/test_cuda.py covers device_query there")
    proc = run_trainer(["device_query", "-gpu", "0"], tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    fatal = [l for l in proc.stderr.splitlines() if l.startswith("F")]
    assert len(fatal) == 1 and "CUDA" in fatal[0]
