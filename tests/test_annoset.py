"""``trainer create_annoset`` (cli/annoset.py): images + annotations -> AnnotatedDatum LMDB ->
the AnnotatedData layer gives back the boxes (round trip), as SSD-Caffe's convert_annoset."""
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from converters import caffe_pb2
from converters.prototxt import parse_text

F32 = np.float32

LABELMAP = """item { name: "none_of_the_above" label: 0 display_name: "background" }
item { name: "cat" label: 1 display_name: "cat" }
item { name: "dog" label: 2 display_name: "dog" }
"""


def run(args):
    from cli.main import _register, main
    _register()
    result = CliRunner().invoke(main, ["create_annoset"] + [str(a) for a in args])
    return result


def voc_xml(width, height, objects, size=True):
    parts = ["<annotation><filename>x</filename>"]
    if size:
        parts.append("<size><width>%d</width><height>%d</height><depth>3</depth></size>"
                     % (width, height))
    for name, box, difficult in objects:
        parts.append("<object><name>%s</name><pose>Left</pose><truncated>0</truncated>"
                     "<difficult>%d</difficult><bndbox><xmin>%d</xmin><ymin>%d</ymin>"
                     "<xmax>%d</xmax><ymax>%d</ymax></bndbox></object>"
                     % ((name, int(difficult)) + tuple(box)))
    parts.append("</annotation>")
    return "".join(parts)


def make_set(root, n=3, w=64, h=48, fmt="png"):
    """n images with boxes; returns the expected label rows per image (SSD's group order)."""
    rng = np.random.default_rng(0)
    (root / "JPEGImages").mkdir(parents=True)
    (root / "Annotations").mkdir()
    lines, expected, images = [], [], []
    for i in range(n):
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(root / "JPEGImages" / ("%d.%s" % (i, fmt)))
        objects = [("dog", (2 + i, 3, 30, 40), False), ("cat", (10, 5 + i, 50, 20), i == 1),
                   ("dog", (40, 10, 63, 47), False)][:i + 1]
        (root / "Annotations" / ("%d.xml" % i)).write_text(voc_xml(w, h, objects))
        lines.append("JPEGImages/%d.%s Annotations/%d.xml" % (i, fmt, i))
        groups = []        # by first appearance of a label, instance ids within a group
        for name, box, diff in objects:
            label = {"cat": 1, "dog": 2}[name]
            group = next((g for g in groups if g[0] == label), None)
            if group is None:
                group = (label, [])
                groups.append(group)
            x0, y0, x1, y1 = box
            group[1].append([len(group[1]), F32(x0) / F32(w), F32(y0) / F32(h),
                             F32(x1) / F32(w), F32(y1) / F32(h), float(diff)])
        expected.append([[i, g, a[0]] + a[1:] for g, annos in groups for a in annos])
        images.append(rgb)
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    (root / "labelmap.prototxt").write_text(LABELMAP)
    return expected, images


def read_layer(db, batch, transform="", tops=("data", "label")):
    from layers.annotated_data import AnnotatedData
    text = ('name: "data" type: "AnnotatedData" %s data_param { source: "%s" batch_size: %d '
            'backend: LMDB } transform_param { %s }'
            % (" ".join('top: "%s"' % t for t in tops), db, batch, transform))
    return AnnotatedData(parse_text(text, caffe_pb2.LayerParameter()), [], "TEST")


def records(db):
    import lmdb
    env = lmdb.open(str(db), readonly=True, lock=False)
    with env.begin() as txn:
        out = [(k.decode(), v) for k, v in txn.cursor()]
    env.close()
    return out


@pytest.fixture(autouse=True)
def inline(monkeypatch):
    from converters import glog
    monkeypatch.setenv("TRAINER_DATA_WORKERS", "0")
    # glog lines go to the current sys.stderr (the CliRunner's), whatever a test before set
    monkeypatch.setattr(glog._State, "stream", None)


def test_voc_round_trip(tmp_path):
    root = tmp_path / "voc"
    expected, images = make_set(root)
    db = tmp_path / "db"
    res = run(["--labelmap-file", root / "labelmap.prototxt", "--encode-type", "png",
               str(root) + "/", root / "list.txt", db])
    assert res.exit_code == 0, res.output
    assert "A total of 3 images." in res.output and "Processed 3 files." in res.output
    recs = records(db)
    assert [k for k, _ in recs] == ["%08d_JPEGImages/%d.png" % (i, i) for i in range(3)]
    anno = caffe_pb2.AnnotatedDatum.FromString(recs[0][1])
    assert anno.type == caffe_pb2.AnnotatedDatum.BBOX and anno.datum.encoded
    assert (anno.datum.channels, anno.datum.height, anno.datum.width, anno.datum.label) == \
        (3, 48, 64, -1)
    layer = read_layer(str(db), 3)
    data, label = (t.numpy() for t in layer.forward())
    layer.close()
    want = np.asarray([r for rows in expected for r in rows], F32)
    np.testing.assert_array_equal(label[0, 0], want)
    for i, rgb in enumerate(images):
        np.testing.assert_array_equal(data[i], rgb[:, :, ::-1].transpose(2, 0, 1))   # BGR


def test_inline_and_txt_formats(tmp_path):
    img = np.zeros((40, 50, 3), np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    Image.fromarray(img).save(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("2 5 6 25 30\n1 0 0 10 10\n2 1 1 2 2\n")
    (tmp_path / "labelmap.prototxt").write_text(LABELMAP)
    (tmp_path / "list.txt").write_text("a.png cat 5 4 25 20 2 0 0 50 40\nb.png b.txt\n"
                                       "a.png\n")
    db = tmp_path / "db"
    res = run(["--labelmap-file", tmp_path / "labelmap.prototxt", tmp_path, tmp_path / "list.txt",
               db])
    assert res.exit_code == 0, res.output
    recs = records(db)
    assert len(recs) == 3
    a = caffe_pb2.AnnotatedDatum.FromString(recs[0][1])
    assert [g.group_label for g in a.annotation_group] == [1, 2]
    box = a.annotation_group[0].annotation[0].bbox
    assert (box.xmin, box.ymin, box.xmax, box.ymax) == (F32(5) / F32(50), F32(4) / F32(40),
                                                        F32(25) / F32(50), F32(20) / F32(40))
    b = caffe_pb2.AnnotatedDatum.FromString(recs[1][1])
    assert [(g.group_label, [x.instance_id for x in g.annotation])
            for g in b.annotation_group] == [(2, [0, 1]), (1, [0])]
    c = caffe_pb2.AnnotatedDatum.FromString(recs[2][1])
    assert c.type == caffe_pb2.AnnotatedDatum.BBOX and len(c.annotation_group) == 0
    # the source PNG bytes are kept when no re-encoding is needed
    assert a.datum.data == (tmp_path / "a.png").read_bytes()


def test_classification_resize_gray_raw(tmp_path):
    from layers import image_ops
    rgb = np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    (tmp_path / "list.txt").write_text("a.png 3\na.png 5\n")
    db = tmp_path / "db"
    res = run(["--anno-type", "classification", "--resize-width", 20, "--resize-height", 16,
               "--encode-type", "png", tmp_path, tmp_path / "list.txt", db])
    assert res.exit_code == 0, res.output
    layer = read_layer(str(db), 2)
    data, label = (t.numpy() for t in layer.forward())
    layer.close()
    np.testing.assert_array_equal(label.ravel(), [3, 5])
    assert label.shape == (2, 1, 1, 1)
    want = image_ops.resize(np.ascontiguousarray(rgb[:, :, ::-1]), 20, 16)
    np.testing.assert_array_equal(data[0], want.transpose(2, 0, 1))
    # gray and raw
    db2 = tmp_path / "db2"
    res = run(["--anno-type", "classification", "--gray", "--no-encoded", tmp_path,
               tmp_path / "list.txt", db2])
    assert res.exit_code == 0, res.output
    d = caffe_pb2.AnnotatedDatum.FromString(records(db2)[0][1]).datum
    assert not d.encoded and (d.channels, d.height, d.width) == (1, 30, 40)
    gray = image_ops.bgr2gray(np.ascontiguousarray(rgb[:, :, ::-1]))[:, :, 0]
    assert np.abs(np.frombuffer(d.data, np.uint8).reshape(30, 40).astype(int) - gray).max() <= 1


def test_shuffle_and_min_dim(tmp_path):
    for i in range(5):
        Image.fromarray(np.full((20, 30, 3), i * 40, np.uint8)).save(tmp_path / ("%d.png" % i))
    (tmp_path / "list.txt").write_text("".join("%d.png\n" % i for i in range(5)))
    db = tmp_path / "db"
    res = run(["--shuffle", "--seed", 3, "--min-dim", 40, tmp_path, tmp_path / "list.txt", db])
    assert res.exit_code == 0, res.output
    assert "Shuffling data" in res.output
    keys = [k for k, _ in records(db)]
    assert sorted(int(k[:8]) for k in keys) == list(range(5))
    names = [k[9:] for k in sorted(keys)]
    assert sorted(names) == ["%d.png" % i for i in range(5)] and names != sorted(names)
    d = caffe_pb2.AnnotatedDatum.FromString(records(db)[0][1]).datum
    assert (d.height, d.width) == (40, 60)          # min side 20 -> 40, aspect kept


def test_errors(tmp_path):
    root = tmp_path / "voc"
    make_set(root, n=1)
    lst, lm = root / "list.txt", root / "labelmap.prototxt"
    # XML names need a label map
    res = run([root, lst, tmp_path / "db0"])
    assert res.exit_code == 1 and "labelmap" in res.output
    # an unknown class name
    (root / "Annotations" / "0.xml").write_text(voc_xml(64, 48, [("zebra", (1, 1, 5, 5), 0)]))
    res = run(["--labelmap-file", lm, root, lst, tmp_path / "db1"])
    assert res.exit_code == 1 and "Unknown name: zebra" in res.output
    # an existing database is kept unless --redo
    (root / "Annotations" / "0.xml").write_text(voc_xml(64, 48, [("cat", (1, 1, 5, 5), 0)]))
    assert run(["--labelmap-file", lm, root, lst, tmp_path / "db2"]).exit_code == 0
    res = run(["--labelmap-file", lm, root, lst, tmp_path / "db2"])
    assert res.exit_code == 1 and "--redo" in res.output
    assert run(["--redo", "--labelmap-file", lm, root, lst, tmp_path / "db2"]).exit_code == 0
    # a malformed list line, a duplicate name under --check-label
    (tmp_path / "bad.txt").write_text("a.png 1 2 3\n")
    res = run(["--labelmap-file", lm, tmp_path, tmp_path / "bad.txt", tmp_path / "db3"])
    assert res.exit_code == 1 and "bad.txt:1" in res.output
    (tmp_path / "dup.prototxt").write_text(LABELMAP + 'item { name: "cat" label: 3 }\n')
    res = run(["--check-label", "--labelmap-file", tmp_path / "dup.prototxt", root, lst,
               tmp_path / "db4"])
    assert res.exit_code == 1 and "duplicates of name: cat" in res.output
    # the database's directory is missing; the database name is a file; a list not in UTF-8
    res = run(["--labelmap-file", lm, root, lst, tmp_path / "no" / "dir" / "db6"])
    assert res.exit_code == 1 and "does not exist" in res.output and "Internal" not in res.output
    (tmp_path / "db7").write_text("a file")
    res = run(["--redo", "--labelmap-file", lm, root, lst, tmp_path / "db7"])
    assert res.exit_code == 1 and "is not a database directory" in res.output
    assert (tmp_path / "db7").read_text() == "a file"
    (tmp_path / "latin1.txt").write_bytes(b"a.png 1 1 1 2 2\ncaf\xe9.png 1 1 1 2 2\n")
    res = run(["--labelmap-file", lm, tmp_path, tmp_path / "latin1.txt", tmp_path / "db8"])
    assert res.exit_code == 1 and "latin1.txt:2" in res.output and "UTF-8" in res.output
    # a missing image is skipped with Caffe's warning
    (tmp_path / "missing.txt").write_text("nope.png\n")
    res = run([tmp_path, tmp_path / "missing.txt", tmp_path / "db5"])
    assert res.exit_code == 0 and "Failed to read nope.png" in res.output
