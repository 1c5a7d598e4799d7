"""Shared test fixtures: where real Caffe's reference outputs live, and log capture."""
import io
import os
import sys

import pytest

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
