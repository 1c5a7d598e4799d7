"""converters.caffemodel: reading the reference .caffemodel / .solverstate / .binaryproto files,
blob conversion with Caffe's shape rules, atomic writes and error cases."""
import glob
import os

import numpy as np
import pytest

from converters import caffe_pb2, caffemodel
from converters.errors import CaffeError

REFS = "/work/shared/refs"
needs_refs = pytest.mark.skipif(not os.path.isdir(REFS), reason="reference files not available")


def _parse_init_params(path):
    """init_params.txt lines: ``name [(d0, d1, ...), (...)]``."""
    import ast
    out = {}
    for line in open(path):
        line = line.strip()
        if line:
            name, rest = line.split(" ", 1)
            out[name] = [tuple(s) for s in ast.literal_eval(rest)]
    return out


def _models():
    return sorted(glob.glob(os.path.join(REFS, "**", "*.caffemodel"), recursive=True))


def _states():
    return sorted(glob.glob(os.path.join(REFS, "**", "*.solverstate"), recursive=True))


@needs_refs
def test_lenet_models_match_init_params():
    case = os.path.join(REFS, "bvlc", "lenet_sgd")
    expected = _parse_init_params(os.path.join(case, "init_params.txt"))
    for name in ("init.caffemodel", "lenet_iter_150.caffemodel",
                 "lenet_resumed_iter_200.caffemodel"):
        params = caffemodel.caffemodel_params(caffemodel.read_caffemodel(os.path.join(case,
                                                                                      name)))
        assert {k: [a.shape for a in v] for k, v in params.items()} == expected
        for arrays in params.values():
            assert all(a.dtype == np.float32 and np.isfinite(a).all() for a in arrays)


@needs_refs
@pytest.mark.parametrize("path", _models(), ids=lambda p: os.path.relpath(p, REFS))
def test_every_reference_caffemodel_reads_and_round_trips(path, tmp_path):
    net = caffemodel.read_caffemodel(path)
    params = caffemodel.caffemodel_params(net)
    out = str(tmp_path / "copy.caffemodel")
    rebuilt = caffe_pb2.NetParameter()
    rebuilt.CopyFrom(net)
    for layer in rebuilt.layer:
        arrays = [caffemodel.blob_to_array(b) for b in layer.blobs]
        del layer.blobs[:]
        for a in arrays:
            layer.blobs.add().CopyFrom(caffemodel.array_to_blob(a))
    caffemodel.write_caffemodel(out, rebuilt)
    again = caffemodel.caffemodel_params(caffemodel.read_caffemodel(out))
    assert again.keys() == params.keys()
    for name in params:
        for a, b in zip(params[name], again[name]):
            assert a.shape == b.shape
            np.testing.assert_array_equal(a, b)


@needs_refs
@pytest.mark.parametrize("path", _states(), ids=lambda p: os.path.relpath(p, REFS))
def test_every_reference_solverstate_reads(path, tmp_path):
    state = caffemodel.read_solverstate(path)
    stem = os.path.basename(path)[:-len(".solverstate")]
    assert state.learned_net == stem + ".caffemodel"
    assert state.iter == int(stem.rsplit("_", 1)[1])
    model = caffemodel.read_caffemodel(os.path.join(os.path.dirname(path), state.learned_net))
    shapes = [a.shape for arrays in caffemodel.caffemodel_params(model).values()
              for a in arrays]
    history = [caffemodel.blob_to_array(h).shape for h in state.history]
    # One history blob per learnable param (Adam/AdaDelta keep two sets).
    assert history[:len(shapes)] == shapes
    assert len(history) in (len(shapes), 2 * len(shapes))
    out = str(tmp_path / "copy.solverstate")
    caffemodel.write_solverstate(out, state)
    assert caffemodel.read_solverstate(out) == state
    with open(path, "rb") as f:
        assert open(out, "rb").read() == f.read()


@needs_refs
def test_infogain_binaryproto_matches_npy():
    case = os.path.join(REFS, "bvlc", "layer_outputs", "losses")
    h = caffemodel.read_binaryproto(os.path.join(case, "infogain_H.binaryproto"))
    ref = np.load(os.path.join(case, "infogain_H.npy"))
    np.testing.assert_array_equal(h.reshape(ref.shape), ref)


def test_blob_shape_rules():
    legacy = caffe_pb2.BlobProto(num=2, channels=3)
    assert caffemodel.blob_shape(legacy) == (2, 3, 0, 0)
    legacy = caffe_pb2.BlobProto(num=1, channels=2, height=1, width=3)
    legacy.data.extend(range(6))
    assert caffemodel.blob_to_array(legacy).shape == (1, 2, 1, 3)
    modern = caffe_pb2.BlobProto()
    modern.shape.dim.extend([2, 3])
    modern.double_data.extend([0.5] * 6)
    modern.data.extend([9.0] * 6)  # double_data wins, as in Blob<float>::FromProto
    np.testing.assert_array_equal(caffemodel.blob_to_array(modern), np.full((2, 3), 0.5))
    scalar = caffe_pb2.BlobProto()
    scalar.data.append(4.0)
    assert caffemodel.blob_to_array(scalar).shape == ()
    bad = caffe_pb2.BlobProto()
    bad.shape.dim.extend([2, 2])
    bad.data.extend([1, 2, 3])
    with pytest.raises(CaffeError, match="3 values for shape 2x2"):
        caffemodel.blob_to_array(bad)


def test_array_to_blob_and_binaryproto_round_trip(tmp_path):
    arr = np.random.RandomState(0).randn(1, 3, 4, 5).astype(np.float32)
    blob = caffemodel.array_to_blob(arr, diff=arr * 2)
    assert list(blob.shape.dim) == [1, 3, 4, 5] and not blob.HasField("num")
    np.testing.assert_array_equal(caffemodel.blob_diff_to_array(blob), arr * 2)
    for legacy in (False, True):
        path = str(tmp_path / ("mean%d.binaryproto" % legacy))
        caffemodel.write_binaryproto(path, arr, legacy_4d=legacy)
        np.testing.assert_array_equal(caffemodel.read_binaryproto(path), arr)
    path = str(tmp_path / "mean3d.binaryproto")
    caffemodel.write_binaryproto(path, arr[0], legacy_4d=True)
    assert caffemodel.read_binaryproto(path).shape == (1, 3, 4, 5)


def test_read_errors_name_the_file(tmp_path):
    empty = tmp_path / "empty.caffemodel"
    empty.write_bytes(b"")
    with pytest.raises(CaffeError, match="empty.caffemodel.*empty"):
        caffemodel.read_caffemodel(str(empty))
    with pytest.raises(CaffeError, match="missing.caffemodel"):
        caffemodel.read_caffemodel(str(tmp_path / "missing.caffemodel"))
    net = caffe_pb2.NetParameter(name="n")
    layer = net.layer.add(name="ip", type="InnerProduct")
    layer.blobs.add().CopyFrom(caffemodel.array_to_blob(np.ones((20, 30), np.float32)))
    data = net.SerializeToString()
    trunc = tmp_path / "trunc.caffemodel"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(CaffeError, match="trunc.caffemodel"):
        caffemodel.read_caffemodel(str(trunc))
    text = tmp_path / "text.caffemodel"
    text.write_bytes(b'name: "oops, a prototxt"\nlayer { name: "x" }\n')
    with pytest.raises(CaffeError, match="text.caffemodel"):
        caffemodel.read_caffemodel(str(text))
    state = caffe_pb2.SolverState(iter=5, learned_net="a.caffemodel")
    wrong = tmp_path / "state.caffemodel"
    wrong.write_bytes(state.SerializeToString())
    with pytest.raises(CaffeError, match="state.caffemodel"):
        caffemodel.read_caffemodel(str(wrong))
    hdf5 = tmp_path / "snap.solverstate.h5"
    hdf5.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(CaffeError, match="HDF5"):
        caffemodel.read_solverstate(str(hdf5))


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    caffemodel.atomic_write(str(path), b"new content")
    assert path.read_bytes() == b"new content"
    assert os.listdir(str(tmp_path)) == ["out.bin"]
    with pytest.raises(CaffeError, match="no_such_dir"):
        caffemodel.atomic_write(str(tmp_path / "no_such_dir" / "x.bin"), b"x")
