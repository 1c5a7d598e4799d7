"""Fuzzing the readers of user files: random mutations (byte flips, truncations, insertions,
deletions, number and line edits) of real Caffe files from ../shared/refs must end in a
CaffeError (our one-line error) or a successful read, never in another exception.

Covered: text nets (parse + V0/V1/BatchNorm upgrades) and solvers (+ solver upgrades), binary
.caffemodel (+ every blob to an array, as the Net's copy_from does), .solverstate, .binaryproto,
LMDB records (Datum with raw pixels, AnnotatedDatum with JPEG / PNG images).
"""
import os
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import REFS
from converters.errors import CaffeError

# Deterministic by default (the same examples every run, no example database, nothing written
# into the repository); TRAINER_FUZZ_RANDOM=1 TRAINER_FUZZ_EXAMPLES=5000 for a longer hunt.
if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    import tempfile
    from hypothesis.configuration import set_hypothesis_home_dir
    set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "trainer-hypothesis"))
FUZZ = settings(max_examples=int(os.environ.get("TRAINER_FUZZ_EXAMPLES", "100")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                derandomize=os.environ.get("TRAINER_FUZZ_RANDOM", "") == "", database=None)


def ref_bytes(*parts):
    path = os.path.join(REFS, *parts)
    if not os.path.exists(path):
        pytest.skip("reference outputs not found: %s (set TRAINER_REFS)" % path)
    with open(path, "rb") as f:
        return f.read()


# ----------------------------------------------------------------------------- mutations
def _op():
    return st.tuples(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "dup"]),
                     st.floats(0, 1, allow_nan=False), st.binary(min_size=1, max_size=8),
                     st.integers(1, 64))


def mutate(data, ops):
    data = bytearray(data)
    for kind, where, blob, n in ops:
        pos = min(int(where * len(data)), max(len(data) - 1, 0))
        if kind == "flip" and data:
            data[pos] ^= 1 << (n % 8)
        elif kind == "set" and data:
            data[pos] = blob[0]
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = blob
        elif kind == "delete":
            del data[pos:pos + n]
        elif kind == "dup":
            data[pos:pos] = data[pos:pos + n]
    return bytes(data)


NUMBER = re.compile(rb"-?\d+(\.\d+)?(e-?\d+)?")
TEXT_VALUES = [b"0", b"-1", b"-7", b"1e40", b"-1e40", b"nan", b"inf", b"99999999999", b"3.5",
               b"2147483648", b"-2147483649", b"1e-45", b"", b'"x"', b"TRAIN", b"{", b"}"]


def text_mutate(data, ops, numbers):
    """Edits that keep the text mostly valid, to get past the parser into the upgrades."""
    lines = data.split(b"\n")
    for (kind, where, blob, n), value in zip(ops, numbers):
        i = min(int(where * len(lines)), len(lines) - 1)
        if kind in ("flip", "set"):
            matches = list(NUMBER.finditer(lines[i]))
            if matches:
                m = matches[n % len(matches)]
                lines[i] = lines[i][:m.start()] + value + lines[i][m.end():]
        elif kind == "delete":
            del lines[i]
        elif kind == "dup":
            lines[i:i] = [lines[i]]
        elif kind == "insert":
            lines[i:i] = [blob]
        elif kind == "truncate":
            lines[i] = lines[i][: n % (len(lines[i]) + 1)]
        if not lines:
            lines = [b""]
    return b"\n".join(lines)


def byte_mutations():
    return st.lists(_op(), min_size=1, max_size=4)


def text_mutations():
    return st.tuples(st.lists(_op(), min_size=1, max_size=4),
                     st.lists(st.sampled_from(TEXT_VALUES), min_size=4, max_size=4),
                     st.booleans())


def expect_clean(fn, *args):
    """Run a reader: success or CaffeError only."""
    try:
        fn(*args)
    except CaffeError as exc:
        assert exc.message.strip(), "empty error message"
    # any other exception fails the test, with hypothesis' minimal example


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return str(tmp_path_factory.mktemp("fuzz"))


def _write(scratch, name, data):
    path = os.path.join(scratch, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


# ----------------------------------------------------------------------------- text
NETS = [("bvlc", "lenet_sgd", "lenet_train_test.prototxt"),
        ("bvlc", "layer_outputs", "structure", "net.prototxt"),
        ("ssd", "ssd_layers", "multibox_bg0.prototxt")]
SOLVERS = [("bvlc", "lenet_sgd", "solver.prototxt"),
           ("bvlc", "solvers", "sgd_sigmoid", "solver.prototxt")]


def _read_net(path):
    from converters.prototxt import read_net
    read_net(path)


def _read_solver(path):
    from converters.prototxt import read_solver
    read_solver(path)


@pytest.mark.parametrize("parts", NETS, ids=lambda p: p[-2] + "/" + p[-1])
def test_fuzz_net_prototxt(parts, scratch):
    original = ref_bytes(*parts)

    @FUZZ
    @given(byte_mutations(), text_mutations())
    def run(byte_ops, text_ops):
        ops, values, textual = text_ops
        data = text_mutate(original, ops, values) if textual else mutate(original, byte_ops)
        expect_clean(_read_net, _write(scratch, "net.prototxt", data))
    run()


@pytest.mark.parametrize("parts", SOLVERS, ids=lambda p: p[-2] + "/" + p[-1])
def test_fuzz_solver_prototxt(parts, scratch):
    original = ref_bytes(*parts)

    @FUZZ
    @given(byte_mutations(), text_mutations())
    def run(byte_ops, text_ops):
        ops, values, textual = text_ops
        data = text_mutate(original, ops, values) if textual else mutate(original, byte_ops)
        expect_clean(_read_solver, _write(scratch, "solver.prototxt", data))
    run()


# ----------------------------------------------------------------------------- binary
def _read_caffemodel_and_blobs(path):
    from converters.caffemodel import blob_to_array, read_caffemodel
    net = read_caffemodel(path)
    for layer in net.layer:
        for i, blob in enumerate(layer.blobs):
            blob_to_array(blob, name="%s[%d]" % (layer.name, i))


def _read_solverstate(path):
    from converters.caffemodel import blob_to_array, read_solverstate
    state = read_solverstate(path)
    for blob in state.history:
        blob_to_array(blob)


def _read_binaryproto(path):
    from converters.caffemodel import read_binaryproto
    read_binaryproto(path)


BINARIES = [
    (("bvlc", "layer_outputs", "structure", "init.caffemodel"), _read_caffemodel_and_blobs),
    (("ssd", "ssd_layers", "layers_fb.init.caffemodel"), _read_caffemodel_and_blobs),
    (("bvlc", "solvers", "adam", "mlp_iter_100.solverstate"), _read_solverstate),
    (("bvlc", "layer_outputs", "losses", "infogain_H.binaryproto"), _read_binaryproto),
]


@pytest.mark.parametrize("parts,reader", BINARIES, ids=lambda x: x[-1] if isinstance(x, tuple)
                         else "")
def test_fuzz_binary(parts, reader, scratch):
    original = ref_bytes(*parts)

    @FUZZ
    @given(byte_mutations())
    def run(ops):
        expect_clean(reader, _write(scratch, parts[-1], mutate(original, ops)))
    run()


# ----------------------------------------------------------------------------- LMDB records
def _first_record(*parts):
    import lmdb
    path = os.path.join(REFS, *parts)
    if not os.path.isdir(path):
        pytest.skip("reference outputs not found: %s" % path)
    env = lmdb.open(path, readonly=True, lock=False, subdir=True)
    try:
        with env.begin() as txn:
            cur = txn.cursor()
            cur.first()
            return cur.key(), cur.value()
    finally:
        env.close()


def _decode_datum(data, key):
    from converters.datum import decode_datum
    decode_datum(data, key=key)


def _decode_annotated(data, key):
    from converters.datum import decode_annotated_datum
    decode_annotated_datum(data, key=key, color=True)


@pytest.mark.parametrize("parts,decoder", [
    (("bvlc", "data", "digits_train_lmdb"), _decode_datum),
    (("ssd", "annotated_data", "lmdb_jpg64"), _decode_annotated),
    (("ssd", "annotated_data", "lmdb_png_mixed"), _decode_annotated),
], ids=["datum", "annotated_jpg", "annotated_png"])
def test_fuzz_lmdb_record(parts, decoder):
    key, original = _first_record(*parts)

    @FUZZ
    @given(byte_mutations())
    def run(ops):
        expect_clean(decoder, mutate(original, ops), key)
    run()


def test_fuzz_data_layer_record_path():
    """The Data layer's own record path (parse + batch) on mutated Datums."""
    from layers.data import datum_array, parse_datum
    key, original = _first_record("bvlc", "data", "digits_train_lmdb")

    def read(data):
        datum = parse_datum(data, "record %r" % key)
        datum_array(datum, None, "record %r" % key)

    @FUZZ
    @given(byte_mutations())
    def run(ops):
        expect_clean(read, mutate(original, ops))
    run()
