"""converters.datum: Datum / AnnotatedDatum decoding against the reference LMDBs."""
import os

import numpy as np
import pytest

from converters import caffe_pb2, datum
from converters.errors import CaffeError

REFS = "/work/shared/refs"
needs_refs = pytest.mark.skipif(not os.path.isdir(REFS), reason="reference files not available")


def _records(path):
    lmdb = pytest.importorskip("lmdb")
    env = lmdb.open(path, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return [(bytes(k), bytes(v)) for k, v in txn.cursor()]
    finally:
        env.close()


@needs_refs
@pytest.mark.parametrize("split,count", [("train", 1500), ("test", 297)])
def test_digits_lmdb_records(split, count):
    recs = _records(os.path.join(REFS, "bvlc", "data", "digits_%s_lmdb" % split))
    ref = np.load(os.path.join(REFS, "bvlc", "data", "digits_uint8.npz"))
    assert len(recs) == count
    assert [k for k, _ in recs[:3]] == [b"00000000", b"00000001", b"00000002"]
    for i in (0, 1, count - 1):
        key, value = recs[i]
        arr, label = datum.decode_datum(value, key=key)
        assert arr.dtype == np.uint8 and arr.shape == (1, 8, 8)
        np.testing.assert_array_equal(arr[0], ref["%s_x" % split][i])
        assert label == ref["%s_y" % split][i]


@needs_refs
@pytest.mark.parametrize("db", ["jpg64", "png_mixed"])
def test_annotated_lmdb_records(db):
    base = os.path.join(REFS, "ssd", "annotated_data")
    recs = _records(os.path.join(base, "lmdb_" + db))
    src = np.load(os.path.join(base, "source_images.npz"))
    assert len(recs) == 6
    rows = []
    for i, (key, value) in enumerate(recs):
        img, groups = datum.decode_annotated_datum(value, key=key)
        if db == "jpg64":
            rgb = src["jpg64/rgb_pil_decoded/%d" % i]
        else:
            rgb = src["png_mixed/rgb/%d" % i]
        assert img.shape == (3,) + rgb.shape[:2]
        # BGR, C x H x W, as OpenCV hands it to Caffe.
        np.testing.assert_array_equal(img, rgb[..., ::-1].transpose(2, 0, 1))
        rows.append(datum.annotation_rows(groups, item_id=i))
        anno = caffe_pb2.AnnotatedDatum()
        anno.ParseFromString(value)
        assert anno.type == caffe_pb2.AnnotatedDatum.BBOX and anno.datum.encoded
        assert anno.datum.label == -1
    np.testing.assert_array_equal(np.concatenate(rows), src[db + "/gt"])
    assert [sum(len(g["annotations"]) for g in datum.decode_annotated_datum(v)[1])
            for _, v in recs] == [1, 2, 3, 1, 2, 3]


def test_make_and_decode_raw_float_and_encoded():
    rng = np.random.RandomState(1)
    img = rng.randint(0, 256, (3, 7, 9)).astype(np.uint8)
    for encoded in (None, "png"):
        arr, label = datum.decode_datum(datum.make_datum(img, 7, encoded).SerializeToString())
        np.testing.assert_array_equal(arr, img)
        assert label == 7
    floats = rng.randn(2, 3, 4).astype(np.float32)
    arr, label = datum.decode_datum(datum.make_datum(floats, 1).SerializeToString())
    assert arr.dtype == np.float32
    np.testing.assert_array_equal(arr, floats)
    jpg, _ = datum.decode_datum(datum.make_datum(img, 0, "jpg").SerializeToString())
    assert jpg.shape == img.shape and np.abs(jpg.astype(int) - img).mean() < 60


def test_color_modes_follow_opencv_flags():
    rng = np.random.RandomState(2)
    gray = rng.randint(0, 256, (1, 5, 6)).astype(np.uint8)
    color = rng.randint(0, 256, (3, 5, 6)).astype(np.uint8)
    gray_png = datum.make_datum(gray, 0, "png").SerializeToString()
    color_png = datum.make_datum(color, 0, "png").SerializeToString()
    assert datum.decode_datum(gray_png)[0].shape == (1, 5, 6)            # ANYCOLOR keeps gray
    forced = datum.decode_datum(gray_png, color=True)[0]                   # IMREAD_COLOR
    assert forced.shape == (3, 5, 6) and (forced == gray).all()
    assert datum.decode_datum(color_png, color=False)[0].shape == (1, 5, 6)  # IMREAD_GRAYSCALE
    color_jpg = datum.make_datum(color, 0, "jpg").SerializeToString()
    assert datum.decode_datum(color_jpg, color=False)[0].shape == (1, 5, 6)


def test_annotated_datum_round_trip():
    img = np.zeros((3, 4, 4), np.uint8)
    groups = [{"group_label": 2, "annotations": [
        {"instance_id": 0, "xmin": 0.1, "ymin": 0.2, "xmax": 0.5, "ymax": 0.75,
         "difficult": True}]}]
    anno = datum.make_annotated_datum(datum.make_datum(img, -1, "png"), groups)
    out_img, out_groups = datum.decode_annotated_datum(anno.SerializeToString())
    assert out_img.shape == (3, 4, 4)
    a = out_groups[0]["annotations"][0]
    assert out_groups[0]["group_label"] == 2 and a["difficult"] is True
    assert a["xmax"] == pytest.approx(0.5) and a["label"] is None
    rows = datum.annotation_rows(out_groups, item_id=1)
    assert rows.shape == (1, 8) and rows[0, 0] == 1 and rows[0, 7] == 1


def test_corrupt_records_name_the_key():
    with pytest.raises(CaffeError, match="key 00000042"):
        datum.decode_datum(b"\x0a\xff\xff\xff", key=b"00000042")
    short = caffe_pb2.Datum(channels=1, height=2, width=2, data=b"\x00\x01\x02")
    with pytest.raises(CaffeError, match="key k7.*3 bytes"):
        datum.decode_datum(short.SerializeToString(), key="k7")
    junk = caffe_pb2.Datum(channels=3, height=2, width=2, data=b"not an image", encoded=True)
    with pytest.raises(CaffeError, match="key img9"):
        datum.decode_datum(junk.SerializeToString(), key=b"img9")
    with pytest.raises(CaffeError, match="no datum"):
        datum.decode_annotated_datum(caffe_pb2.AnnotatedDatum().SerializeToString())
