"""Shared test fixtures: where real Caffe's reference outputs live, and log capture."""
import io
import os
import sys

# Pin the CPU kernels' summation order before torch (and with it MKL and oneDNN) is loaded.
# Trajectory tests compare 150 SGD steps against real Caffe at float32 tolerance; on that path
# a handful of ReLU inputs land within 1e-7 of zero (LeNet's iteration 50 has one at +2e-7),
# and whether they pass depends on the order in which the BLAS and convolution kernels add up.
# Left free, the order follows the CPU (AVX2, AVX-512, ...), so the same checkout matched
# Caffe on one machine and not another. MKL's conditional numerical reproducibility mode and
# oneDNN's ISA cap give the same sums on any x86 CPU; set either variable to override.
os.environ.setdefault("MKL_CBWR", "COMPATIBLE")
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

REFS = os.environ.get("TRAINER_REFS") or os.path.join(os.path.dirname(ROOT), "shared", "refs")


def refs_path(*parts):
    path = os.path.join(REFS, *parts)
    if not os.path.exists(path):
        pytest.skip("reference outputs not found: %s (set TRAINER_REFS)" % path)
    return path


@pytest.fixture
def glog_capture():
    """Capture glog lines in a StringIO for the duration of a test."""
    from converters import glog
    buf = io.StringIO()
    glog.configure(stream=buf, min_level=0)
    yield buf
    glog._State.stream = None       # back to whatever sys.stderr is at call time (capsys-safe)
