"""Data layers and the DataTransformer (layers/data.py, layers/transform.py, layers/prefetch.py).

The digits LMDB of refs/bvlc/data (written for real Caffe) must come out batch by batch exactly as
Caffe reads it: records in key order, wrapping to the first, data * 0.00390625. Everything else
runs on tiny databases and images made in tmp_path.
"""
import io
import os
import re

import numpy as np
import pytest
import torch

from conftest import ROOT, refs_path
from converters import caffe_pb2
from converters.errors import CaffeError

SCALE = np.float32(0.00390625)


# ----------------------------------------------------------------------------- helpers
def data_param(source, batch=4, tops=("data", "label"), prefetch=None, **transform):
    lp = caffe_pb2.LayerParameter(name="data", type="Data")
    lp.top.extend(tops)
    lp.data_param.source = str(source)
    lp.data_param.batch_size = batch
    lp.data_param.backend = caffe_pb2.DataParameter.LMDB
    if prefetch is not None:
        lp.data_param.prefetch = prefetch
    for k, v in transform.items():
        if k == "mean_value":
            lp.transform_param.mean_value.extend(v)
        else:
            setattr(lp.transform_param, k, v)
    return lp


def make_data(lp, phase="TRAIN"):
    from layers.data import Data
    return Data(lp, [], phase)


def write_lmdb(path, records):
    import lmdb
    env = lmdb.open(str(path), map_size=1 << 24, lock=False)
    with env.begin(write=True) as txn:
        for k, v in records:
            txn.put(k if isinstance(k, bytes) else k.encode(), v)
    env.close()
    return str(path)


def datum_bytes(arr, label=0, encoded=None):
    arr = np.asarray(arr)
    d = caffe_pb2.Datum()
    if encoded is not None:
        d.encoded = True
        d.data = encoded
    else:
        d.channels, d.height, d.width = arr.shape
        if arr.dtype == np.uint8:
            d.data = arr.tobytes()
        else:
            d.float_data.extend(arr.astype(np.float32).ravel().tolist())
    d.label = label
    return d.SerializeToString()


def random_lmdb(tmp_path, n=10, shape=(3, 6, 7), name="db", seed=0):
    rng = np.random.RandomState(seed)
    images = rng.randint(0, 256, size=(n,) + shape).astype(np.uint8)
    labels = np.arange(n) % 5
    path = write_lmdb(tmp_path / name, [("%08d" % i, datum_bytes(images[i], int(labels[i])))
                                        for i in range(n)])
    return path, images, labels


def caffe_transform(x, mean=None, mean_values=None, scale=1.0, crop=0, h_off=0, w_off=0,
                    mirror=False):
    """Caffe's DataTransformer::Transform(datum) loop, literally, for one (C, H, W) item."""
    c, h, w = x.shape
    height, width = (crop, crop) if crop else (h, w)
    out = np.zeros((c, height, width), np.float32)
    scale = np.float32(scale)
    for ci in range(c):
        for hi in range(height):
            for wi in range(width):
                elem = np.float32(x[ci, h_off + hi, w_off + wi])
                wt = width - 1 - wi if mirror else wi
                if mean is not None:
                    v = (elem - np.float32(mean[ci, h_off + hi, w_off + wi])) * scale
                elif mean_values is not None:
                    v = (elem - np.float32(mean_values[ci if len(mean_values) > 1 else 0])) * scale
                else:
                    v = elem * scale
                out[ci, hi, wt] = v
    return out


# ----------------------------------------------------------------------------- real Caffe's digits
def _digits():
    z = np.load(refs_path("bvlc", "data", "digits_uint8.npz"))
    return z


@pytest.mark.parametrize("split,batch,prefetch", [("train", 64, None), ("test", 99, None),
                                                  ("train", 64, 0)])
def test_digits_batches_match_caffe_order(split, batch, prefetch):
    z = _digits()
    x = z["%s_x" % split].reshape(-1, 1, 8, 8).astype(np.float32) * SCALE
    y = z["%s_y" % split].astype(np.float32)
    n = len(x)
    layer = make_data(data_param(refs_path("bvlc", "data", "digits_%s_lmdb" % split), batch,
                                 prefetch=prefetch, scale=float(SCALE)))
    assert layer.top_shapes() == [(batch, 1, 8, 8), (batch,)]
    assert layer.extra_log_lines() == [("data_layer.cpp:45",
                                        "output data size: %d,1,8,8" % batch)]
    pos = 0
    for _ in range(3 * n // batch + 2):          # wraps around several times
        data, label = layer()
        idx = (pos + np.arange(batch)) % n
        assert data.dtype == torch.float32 and label.shape == (batch,)
        np.testing.assert_array_equal(data.numpy(), x[idx])
        np.testing.assert_array_equal(label.numpy(), y[idx])
        pos = (pos + batch) % n
    layer.close()


def test_open_and_restart_log_lines(glog_capture):
    src = refs_path("bvlc", "data", "digits_test_lmdb")
    layer = make_data(data_param(src, 99, prefetch=0, scale=float(SCALE)), "TEST")
    for _ in range(7):       # 693 records of 297: the last record is read in batches 3 and 6
        layer()
    log = glog_capture.getvalue()
    assert re.search(r"db_lmdb\.cpp:35\] Opened lmdb %s$" % re.escape(src), log, re.M)
    assert log.count("data_layer.cpp:73] Restarting data prefetching from start.") == 2


def test_single_top_and_label_free(tmp_path):
    path, images, _ = random_lmdb(tmp_path, n=5)
    layer = make_data(data_param(path, 2, tops=("data",)))
    assert layer.top_shapes() == [(2, 3, 6, 7)]
    out = layer()
    assert isinstance(out, torch.Tensor)
    np.testing.assert_array_equal(out.numpy(), images[:2].astype(np.float32))


def test_wraparound_order_small_db(tmp_path):
    path, images, labels = random_lmdb(tmp_path, n=5)
    layer = make_data(data_param(path, 3))
    seen = []
    for _ in range(4):
        d, l = layer()
        seen.extend(l.numpy().astype(int).tolist())
    assert seen == [labels[i % 5] for i in range(12)]


def test_rand_skip_skips_first_records(tmp_path, glog_capture):
    path, images, labels = random_lmdb(tmp_path, n=20)
    lp = data_param(path, 4)
    lp.data_param.rand_skip = 15
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        layer = make_data(lp)
        lines = dict(layer.extra_log_lines())
        skip = int(re.match(r"Skipping first (\d+) data points\.", lines["data_layer.cpp:34"])
                   .group(1))
        assert 0 <= skip < 15
        d, _ = layer()
        np.testing.assert_array_equal(d.numpy(), images[(skip + np.arange(4)) % 20])
        layer.reset()          # back to the first record
        d, _ = layer()
        np.testing.assert_array_equal(d.numpy(), images[:4])
        layer.close()


def test_state_resume_continues_at_same_record_and_rng(tmp_path):
    path, images, _ = random_lmdb(tmp_path, n=13, shape=(3, 8, 8))
    lp = data_param(path, 4, crop_size=5, mirror=True, scale=0.5)
    torch.manual_seed(0)
    a = make_data(lp)
    for _ in range(5):
        a()
    state = a.state_dict_position()
    assert state["index"] == (5 * 4) % 13 and state["key"] == "%08d" % ((5 * 4) % 13)
    expected = [a()[0].numpy().copy() for _ in range(4)]
    torch.manual_seed(123)     # a different seed: the state carries the transformer's RNG
    b = make_data(lp)
    b()
    b.load_state_dict_position(state)
    got = [b()[0].numpy() for _ in range(4)]
    for e, g in zip(expected, got):
        np.testing.assert_array_equal(e, g)
    # reset(): the first batch again, with the same draws as a fresh layer of the same seed
    torch.manual_seed(0)
    c = make_data(lp)
    first = c()[0].numpy().copy()
    c()
    c.reset()
    np.testing.assert_array_equal(c()[0].numpy(), first)
    import json
    json.dumps(state)     # the solver stores it as JSON


def test_shape_inference_does_not_consume(tmp_path):
    path, images, _ = random_lmdb(tmp_path, n=6)
    layer = make_data(data_param(path, 2))
    with layer.inferring():
        z = layer()
    assert z[0].shape == (2, 3, 6, 7) and not z[0].any()
    np.testing.assert_array_equal(layer()[0].numpy(), images[:2])


def test_shard_keeps_every_other_record(tmp_path):
    path, images, labels = random_lmdb(tmp_path, n=8)
    l0 = make_data(data_param(path, 2))
    l1 = make_data(data_param(path, 2))
    l0.shard(0, 2)
    l1.shard(1, 2)
    np.testing.assert_array_equal(l0()[0].numpy(), images[[0, 2]])
    np.testing.assert_array_equal(l1()[0].numpy(), images[[1, 3]])


# ----------------------------------------------------------------------------- transform
def test_transform_mean_value_scale_vs_caffe_loop(tmp_path):
    path, images, _ = random_lmdb(tmp_path, n=4)
    for mv in ([10.5], [100.0, 20.0, 3.25]):
        layer = make_data(data_param(path, 4, scale=0.017, mean_value=mv))
        d = layer()[0].numpy()
        for i in range(4):
            np.testing.assert_array_equal(d[i], caffe_transform(images[i], mean_values=mv,
                                                                scale=0.017))


def test_transform_mean_file_crop_test_phase(tmp_path):
    from converters.caffemodel import write_binaryproto
    path, images, _ = random_lmdb(tmp_path, n=4, shape=(3, 9, 8))
    mean = np.random.RandomState(5).uniform(0, 255, size=(1, 3, 9, 8)).astype(np.float32)
    mfile = str(tmp_path / "mean.binaryproto")
    write_binaryproto(mfile, mean, legacy_4d=True)
    layer = make_data(data_param(path, 4, scale=0.25, crop_size=5, mean_file=mfile), "TEST")
    assert layer.top_shapes()[0] == (4, 3, 5, 5)
    assert ("data_transformer.cpp:25", "Loading mean file from: %s" % mfile) in \
        layer.extra_log_lines()
    d = layer()[0].numpy()
    for i in range(4):   # TEST: centre crop (9-5)/2 = 2, (8-5)/2 = 1; the mean is cropped too
        np.testing.assert_array_equal(d[i], caffe_transform(images[i], mean=mean[0], scale=0.25,
                                                            crop=5, h_off=2, w_off=1))


def test_transform_random_crop_mirror_vs_caffe_loop():
    from layers.transform import DataTransformer
    rng = np.random.RandomState(1)
    x = rng.randint(0, 256, size=(16, 2, 10, 9)).astype(np.uint8)
    mean = rng.uniform(0, 255, size=(2, 10, 9)).astype(np.float32)
    tp = caffe_pb2.TransformationParameter(scale=0.5, crop_size=4, mirror=True)
    t = DataTransformer(tp, "TRAIN", seed=7)
    t.mean = mean          # as if read from a mean_file
    m, ho, wo = t.draw(16, 10, 9)
    assert m.any() and not m.all() and len(set(ho.tolist())) > 1
    out = t.apply(x, m, ho, wo)
    for i in range(16):
        np.testing.assert_array_equal(out[i], caffe_transform(
            x[i], mean=mean, scale=0.5, crop=4, h_off=ho[i], w_off=wo[i], mirror=m[i]))
    # the same seed gives the same draws; TEST crops the centre
    t2 = DataTransformer(tp, "TRAIN", seed=7)
    t2.mean = mean
    np.testing.assert_array_equal(t2(x), out)
    t3 = DataTransformer(caffe_pb2.TransformationParameter(crop_size=4), "TEST")
    assert t3.rng is None
    np.testing.assert_array_equal(t3(x), x[:, :, 3:7, 2:6].astype(np.float32))


def test_transform_float_data_and_variable_sizes_with_crop(tmp_path):
    rng = np.random.RandomState(2)
    a = rng.uniform(-1, 1, size=(2, 5, 5)).astype(np.float32)
    b = rng.uniform(-1, 1, size=(2, 7, 6)).astype(np.float32)
    path = write_lmdb(tmp_path / "f", [("0", datum_bytes(a, 1)), ("1", datum_bytes(b, 2))])
    layer = make_data(data_param(path, 2, crop_size=3, scale=2.0), "TEST")
    d, l = layer()
    np.testing.assert_array_equal(d[0].numpy(), caffe_transform(a, scale=2, crop=3, h_off=1,
                                                                w_off=1))
    np.testing.assert_array_equal(d[1].numpy(), caffe_transform(b, scale=2, crop=3, h_off=2,
                                                                w_off=1))
    assert l.tolist() == [1.0, 2.0]


def test_transform_errors(tmp_path):
    path, _, _ = random_lmdb(tmp_path, n=2)
    lp = data_param(path, 2, mean_file="x.binaryproto", mean_value=[1.0])
    with pytest.raises(CaffeError, match="Cannot specify mean_file and mean_value"):
        make_data(lp)
    layer = make_data(data_param(path, 2, mean_value=[1.0, 2.0]))
    with pytest.raises(CaffeError, match="Specify either 1 mean_value or as many as channels: 3"):
        layer()
    with pytest.raises(CaffeError, match="crop_size"):
        make_data(data_param(path, 2, crop_size=9))
    with pytest.raises(CaffeError, match="File not found"):
        make_data(data_param(path, 2, mean_file=str(tmp_path / "nope.binaryproto")))
    lp = data_param(path, 2)
    lp.transform_param.resize_param.height = 4
    with pytest.raises(CaffeError, match="resize_param"):
        make_data(lp)


def test_encoded_png_records_and_force_gray(tmp_path):
    from PIL import Image
    rng = np.random.RandomState(3)
    rgb = rng.randint(0, 256, size=(5, 6, 3)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    path = write_lmdb(tmp_path / "enc", [("a", datum_bytes(None, 4, encoded=buf.getvalue()))])
    d, l = make_data(data_param(path, 1))()
    np.testing.assert_array_equal(d[0].numpy(), rgb[..., ::-1].transpose(2, 0, 1))   # BGR
    assert l.item() == 4
    g = make_data(data_param(path, 1, force_gray=True))
    assert g.top_shapes()[0] == (1, 1, 5, 6)
    assert g()[0].shape == (1, 1, 5, 6)


# ----------------------------------------------------------------------------- Data errors
def test_missing_lmdb_names_path(tmp_path):
    with pytest.raises(CaffeError, match=re.escape(str(tmp_path / "nope"))):
        make_data(data_param(tmp_path / "nope"))


def test_empty_lmdb(tmp_path):
    path = write_lmdb(tmp_path / "empty", [])
    with pytest.raises(CaffeError, match="no records"):
        make_data(data_param(path))


def test_corrupt_record_names_key(tmp_path):
    good = datum_bytes(np.zeros((1, 2, 2), np.uint8))
    path = write_lmdb(tmp_path / "bad", [("00000000", good), ("00000001", b"\xff\xff\xff")])
    layer = make_data(data_param(path, 2))
    with pytest.raises(CaffeError, match="00000001.*bad"):
        layer()
    with pytest.raises(CaffeError, match="00000001"):     # keeps failing, no hang
        layer()
    path2 = write_lmdb(tmp_path / "bad0", [("k0", b"\x0a\x05zz")])
    with pytest.raises(CaffeError, match="k0"):
        make_data(data_param(path2, 1))


def test_wrong_data_size_record(tmp_path):
    d = caffe_pb2.Datum(channels=1, height=3, width=3, data=b"\x00" * 5)
    path = write_lmdb(tmp_path / "short", [("x", d.SerializeToString())])
    with pytest.raises(CaffeError, match="5 bytes"):
        make_data(data_param(path, 1))


def test_leveldb_is_refused(tmp_path):
    path, _, _ = random_lmdb(tmp_path, n=2)
    lp = data_param(path, 2)
    lp.data_param.backend = caffe_pb2.DataParameter.LEVELDB
    with pytest.raises(CaffeError, match="LEVELDB"):
        make_data(lp)
    lp.data_param.ClearField("backend")     # unset: Caffe's default LEVELDB, but an LMDB folder
    assert make_data(lp).top_shapes()[0] == (2, 3, 6, 7)


# ----------------------------------------------------------------------------- other layers
def test_input_shapes():
    from layers.data import Input
    lp = caffe_pb2.LayerParameter(name="in", type="Input", top=["a", "b"])
    lp.input_param.shape.add().dim.extend([2, 3, 4])
    layer = Input(lp, [], "TEST")
    assert layer.top_shapes() == [(2, 3, 4), (2, 3, 4)]
    a, b = layer()
    assert a.shape == (2, 3, 4) and not a.any()
    lp.input_param.shape.add().dim.extend([5])
    assert Input(lp, [], "TEST").top_shapes() == [(2, 3, 4), (5,)]
    lp.input_param.shape.add().dim.extend([1])
    with pytest.raises(CaffeError, match="2 tops vs. 3 shapes"):
        Input(lp, [], "TEST")


def test_dummy_data_shapes_and_refill():
    from layers.data import DummyData
    lp = caffe_pb2.LayerParameter(name="d", type="DummyData", top=["x", "y"])
    dp = lp.dummy_data_param
    dp.shape.add().dim.extend([2, 3])
    dp.shape.add().dim.extend([4])
    dp.data_filler.add(type="gaussian", std=1.0)
    dp.data_filler.add(type="constant", value=3.0)
    layer = DummyData(lp, [], "TRAIN")
    assert layer.top_shapes() == [(2, 3), (4,)]
    x1, y1 = layer()
    x2, y2 = layer()
    assert not torch.equal(x1, x2)                 # gaussian: refilled every forward
    assert torch.equal(y1, torch.full((4,), 3.0)) and torch.equal(y1, y2)
    legacy = caffe_pb2.LayerParameter(name="d", type="DummyData", top=["x"])
    legacy.dummy_data_param.num.append(2)
    legacy.dummy_data_param.channels.append(3)
    legacy.dummy_data_param.height.append(4)
    legacy.dummy_data_param.width.append(5)
    z = DummyData(legacy, [], "TRAIN")
    assert z.top_shapes() == [(2, 3, 4, 5)]
    assert not z().any()                           # default: constant 0
    legacy.dummy_data_param.shape.add().dim.append(1)
    with pytest.raises(CaffeError, match="Both shape and legacy"):
        DummyData(legacy, [], "TRAIN")
    dp.data_filler.add(type="constant")
    with pytest.raises(CaffeError, match="Number of data fillers"):
        DummyData(lp, [], "TRAIN")


def _image_list(tmp_path, sizes, color=True):
    from PIL import Image
    rng = np.random.RandomState(4)
    lines, arrays = [], []
    (tmp_path / "imgs").mkdir()
    for i, (h, w) in enumerate(sizes):
        rgb = rng.randint(0, 256, size=(h, w, 3)).astype(np.uint8)
        Image.fromarray(rgb).save(tmp_path / "imgs" / ("im %d.png" % i))   # a space in the name
        lines.append("im %d.png %d" % (i, i + 10))
        arrays.append(rgb)
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    return arrays


def image_param(tmp_path, batch, **kw):
    lp = caffe_pb2.LayerParameter(name="img", type="ImageData", top=["data", "label"])
    ip = lp.image_data_param
    ip.source = str(tmp_path / "list.txt")
    ip.root_folder = str(tmp_path / "imgs") + os.sep
    ip.batch_size = batch
    for k, v in kw.items():
        if k in ("scale", "mirror", "crop_size"):
            setattr(lp.transform_param, k, v)
        else:
            setattr(ip, k, v)
    return lp


def test_image_data_color_gray_resize(tmp_path):
    from layers.data import ImageData
    from layers.transform import resize_linear_cv
    arrays = _image_list(tmp_path, [(6, 5)] * 3)
    layer = ImageData(image_param(tmp_path, 2), [], "TRAIN")
    assert layer.top_shapes() == [(2, 3, 6, 5), (2,)]
    texts = [t for _, t in layer.extra_log_lines()]
    assert "A total of 3 images." in texts and "output data size: 2,3,6,5" in texts
    order = []
    for _ in range(3):
        d, l = layer()
        order.extend(l.numpy().astype(int).tolist())
        for k in range(2):
            i = int(l[k]) - 10
            np.testing.assert_array_equal(d[k].numpy(), arrays[i][..., ::-1].transpose(2, 0, 1))
    assert order == [10, 11, 12, 10, 11, 12]
    gray = ImageData(image_param(tmp_path, 1, is_color=False, new_height=4, new_width=3), [],
                     "TEST")
    assert gray.top_shapes()[0] == (1, 1, 4, 3)
    d, _ = gray()
    rgb = arrays[0].astype(np.int64)
    y = ((rgb[..., 0] * 4899 + rgb[..., 1] * 9617 + rgb[..., 2] * 1868 + 8192) >> 14)
    np.testing.assert_array_equal(d[0].numpy(),
                                  resize_linear_cv(y.astype(np.uint8)[None], 4, 3))


def test_image_data_shuffle_is_seeded(tmp_path):
    from layers.data import ImageData
    _image_list(tmp_path, [(4, 4)] * 6)

    def labels(seed):
        torch.manual_seed(seed)
        layer = ImageData(image_param(tmp_path, 3, shuffle=True), [], "TRAIN")
        out = []
        for _ in range(4):
            out.extend(layer()[1].numpy().astype(int).tolist())
        return out
    a, b = labels(1), labels(1)
    assert a == b
    assert sorted(a[:6]) == list(range(10, 16)) and sorted(a[6:]) == list(range(10, 16))


def test_image_data_missing_file(tmp_path):
    from layers.data import ImageData
    _image_list(tmp_path, [(4, 4)])
    (tmp_path / "list.txt").write_text("im 0.png 1\nmissing.png 2\n")
    layer = ImageData(image_param(tmp_path, 2), [], "TRAIN")
    with pytest.raises(CaffeError, match="Could not load missing.png"):
        layer()


def test_resize_linear_matches_opencv_rule():
    from layers.transform import resize_linear_cv
    x = np.arange(12, dtype=np.uint8).reshape(1, 3, 4) * 20
    np.testing.assert_array_equal(resize_linear_cv(x, 3, 4), x)
    up = resize_linear_cv(x, 6, 8)                 # 2x: half-pixel centres, edges clamped
    assert up[0, 0, 0] == x[0, 0, 0] and up[0, -1, -1] == x[0, -1, -1]
    # OpenCV: dst(0,1) at src x = 0.25 -> 0.75*0 + 0.25*20 = 5
    assert up[0, 0, 1] == 5


def test_memory_data(glog_capture):
    from layers.data import MemoryData
    lp = caffe_pb2.LayerParameter(name="m", type="MemoryData", top=["data", "label"])
    mp = lp.memory_data_param
    mp.batch_size, mp.channels, mp.height, mp.width = 2, 1, 2, 3
    layer = MemoryData(lp, [], "TRAIN")
    assert layer.top_shapes() == [(2, 1, 2, 3), (2,)]
    with pytest.raises(CaffeError, match="Reset"):
        layer()
    x = np.arange(6 * 4, dtype=np.float32).reshape(4, 1, 2, 3)
    y = np.arange(4, dtype=np.float32).reshape(4, 1, 1, 1)
    layer.reset(x, y)
    for k in (0, 2, 0):
        d, l = layer()
        np.testing.assert_array_equal(d.numpy(), x[k:k + 2])
        np.testing.assert_array_equal(l.numpy(), y[k:k + 2, 0, 0, 0])
    with pytest.raises(CaffeError, match="multiple of batch size"):
        layer.reset(x[:3], y[:3])
    with pytest.raises(CaffeError, match="same first dimension"):
        layer.reset(x, y[:2])
    with pytest.raises(CaffeError, match="expects"):
        layer.reset(np.zeros((2, 3, 2, 3), np.float32), np.zeros(2))
    bad = caffe_pb2.LayerParameter(name="m", type="MemoryData", top=["data", "label"])
    bad.memory_data_param.batch_size = 2
    with pytest.raises(CaffeError, match="must be specified and positive"):
        MemoryData(bad, [], "TRAIN")


def test_hdf5_data(tmp_path, monkeypatch):
    from layers.data import HDF5Data
    lp = caffe_pb2.LayerParameter(name="h", type="HDF5Data", top=["data", "label"])
    lp.hdf5_data_param.batch_size = 3
    try:
        import h5py
    except ImportError:
        h5py = None
    files = []
    rng = np.random.RandomState(0)
    x = rng.uniform(size=(5, 2, 3)).astype(np.float32)
    y = np.arange(5, dtype=np.float32)
    if h5py is not None:
        for i, sl in enumerate((slice(0, 2), slice(2, 5))):
            p = tmp_path / ("f%d.h5" % i)
            with h5py.File(p, "w") as f:
                f["data"] = x[sl]
                f["label"] = y[sl]
            files.append(str(p))
    else:
        files.append(str(tmp_path / "f0.h5"))
    (tmp_path / "list.txt").write_text("\n".join(files) + "\n")
    lp.hdf5_data_param.source = str(tmp_path / "list.txt")
    if h5py is None:
        with pytest.raises(CaffeError, match="h5py"):
            HDF5Data(lp, [], "TRAIN")
        return
    layer = HDF5Data(lp, [], "TRAIN")
    assert layer.top_shapes() == [(3, 2, 3), (3,)]
    rows = []
    for _ in range(4):
        d, l = layer()
        rows.extend(l.numpy().astype(int).tolist())
        np.testing.assert_array_equal(d.numpy(), x[l.numpy().astype(int)])
    assert rows == [i % 5 for i in range(12)]
    monkeypatch.setitem(__import__("sys").modules, "h5py", None)
    with pytest.raises(CaffeError, match="h5py"):
        HDF5Data(lp, [], "TRAIN")


def test_registered_types():
    from layers import registry
    for name in ("Data", "ImageData", "MemoryData", "HDF5Data", "DummyData", "Input"):
        cls = registry.get(name)
        assert cls.never_backward and cls.is_data and cls.exact_bottoms == 0


# ----------------------------------------------------------------------------- lenet example
def test_lenet_digits_lmdb_in_repo():
    from layers.data import Data
    src = os.path.join(ROOT, "configs", "lenet", "digits_train_lmdb")
    if not os.path.isdir(src):
        pytest.skip("configs/lenet LMDBs not generated (python configs/lenet/make_digits_lmdb.py)")
    layer = Data(data_param(src, 64, scale=float(SCALE)), [], "TRAIN")
    assert layer.top_shapes() == [(64, 1, 28, 28), (64,)]
    d, l = layer()
    assert 0 <= float(d.min()) and float(d.max()) <= 1 and set(l.numpy().astype(int)) <= \
        set(range(10))


def test_make_digits_is_deterministic(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "make_digits_lmdb", os.path.join(ROOT, "configs", "lenet", "make_digits_lmdb.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    a = mod.make_images(20, np.random.default_rng(1))
    b = mod.make_images(20, np.random.default_rng(1))
    np.testing.assert_array_equal(a[0], b[0])
    mod.write_lmdb(str(tmp_path / "a"), *a)
    mod.write_lmdb(str(tmp_path / "b"), *b)
    assert (tmp_path / "a" / "data.mdb").read_bytes() == (tmp_path / "b" / "data.mdb").read_bytes()
    layer = make_data(data_param(tmp_path / "a", 20))
    d, l = layer()
    np.testing.assert_array_equal(d.numpy()[:, 0], a[0].astype(np.float32))
    np.testing.assert_array_equal(l.numpy(), a[1].astype(np.float32))


def test_unused_layers_stop_their_threads(tmp_path):
    import gc
    import threading
    import time
    path, _, _ = random_lmdb(tmp_path, n=4)
    before = threading.active_count()
    for _ in range(10):
        layer = make_data(data_param(path, 2))
        layer()
    del layer
    gc.collect()
    deadline = time.time() + 10
    while threading.active_count() > before and time.time() < deadline:
        time.sleep(0.05)
    assert threading.active_count() <= before


def test_release_from_a_finalizer_inside_acquire_does_not_deadlock(tmp_path):
    """A reader finalised by garbage collection while _acquire_env holds the lock (py-lmdb can
    trigger GC there) must not block; its release is applied by the next acquire."""
    import threading
    from layers import data as data_mod
    key = "/nonexistent/for-test"
    data_mod._ENVS[key] = [type("E", (), {"close": lambda self: None})(), 1]
    done = threading.Event()

    def release_while_locked():
        with data_mod._ENV_LOCK:          # as inside _acquire_env
            data_mod._release_env(key)    # what a finalizer would call
        done.set()
    t = threading.Thread(target=release_while_locked)
    t.start()
    t.join(timeout=5)
    assert done.is_set()
    assert key in data_mod._ENVS          # deferred, not lost
    with data_mod._ENV_LOCK:
        data_mod._drain_pending_locked()
    assert key not in data_mod._ENVS
