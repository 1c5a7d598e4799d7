"""The committed caffe_pb2.py imports, matches caffe.proto, and carries Caffe's field numbers."""
import importlib.util
import os
import tempfile

import pytest

from converters import caffe_pb2, generate_proto

HERE = os.path.dirname(os.path.abspath(generate_proto.__file__))


def test_module_imports_and_has_the_main_messages():
    for name in ("NetParameter", "SolverParameter", "SolverState", "BlobProto", "BlobProtoVector",
                 "Datum", "AnnotatedDatum", "LabelMap", "V1LayerParameter", "V0LayerParameter"):
        assert hasattr(caffe_pb2, name), name


def test_regenerating_gives_the_committed_file():
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.skip("grpc_tools is not installed")
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate_proto.generate(tmp)
        with open(fresh) as f:
            new = f.read()
    with open(os.path.join(HERE, "caffe_pb2.py")) as f:
        assert f.read() == new, "caffe_pb2.py is stale: run python converters/generate_proto.py"


def test_protobuf_min_matches_the_generated_code():
    with open(os.path.join(HERE, "caffe_pb2.py")) as f:
        version = generate_proto.required_runtime(f.read())
    with open(os.path.join(HERE, "PROTOBUF_MIN")) as f:
        assert f.read().strip() == "protobuf>=%s" % version


@pytest.mark.parametrize("message,field,number,default", [
    ("LayerParameter", "annotated_data_param", 200, None),
    ("LayerParameter", "norm_param", 206, None),
    ("LayerParameter", "video_data_param", 207, None),
    ("LayerParameter", "clip_param", 148, None),
    ("LayerParameter", "swish_param", 147, None),
    ("NetParameter", "layer", 100, None),
    ("NetParameter", "layers", 2, None),
    ("SolverParameter", "eval_type", 41, "classification"),
    ("SolverParameter", "ap_version", 42, "Integral"),
    ("SolverParameter", "plateau_winsize", 43, None),
    ("SolverParameter", "show_per_class_result", 44, False),
    ("SolverParameter", "random_seed", 20, -1),
    ("SolverParameter", "type", 40, "SGD"),
    ("SolverState", "minimum_loss", 5, 1e38),
    ("TransformationParameter", "crop_h", 11, 0),
    ("TransformationParameter", "distort_param", 13, None),
    ("PriorBoxParameter", "offset", 13, 0.5),
    ("MultiBoxLossParameter", "sample_size", 22, 64),
    ("NormalizeParameter", "eps", 4, 1e-10),
    ("PoolingParameter", "round_mode", 13, 0),
    ("BatchNormParameter", "moving_average_fraction", 2, 0.999),
    ("V1LayerParameter", "param", 1001, None),
    ("V0LayerParameter", "hdf5_output_param", 1001, None),
])
def test_field_numbers_and_defaults(message, field, number, default):
    desc = getattr(caffe_pb2, message).DESCRIPTOR.fields_by_name[field]
    assert desc.number == number
    if default is not None:
        value = desc.default_value
        if isinstance(default, float):
            assert value == pytest.approx(default, rel=1e-6)
        else:
            assert value == default


SSD_FIELDS_MD = "/work/shared/refs/ssd/ssd_proto_fields.md"
_TYPES = {"int32": 5, "int64": 3, "uint32": 13, "uint64": 4, "float": 2, "double": 1, "bool": 8,
          "string": 9, "bytes": 12}


def _md_rows():
    """(message, field, number, label, type, default) rows of the SSD field tables."""
    rows, message = [], None
    with open(SSD_FIELDS_MD) as f:
        for line in f:
            if line.startswith("## "):
                message = line[3:].split()[0]
            elif line.startswith("| ") and message and not line.startswith("| field") \
                    and not line.startswith("|---"):
                cells = [c.strip() for c in line.strip().strip("|").split("|")]
                name, number, label, ftype = cells[:4]
                default = cells[4] if len(cells) > 4 else ""
                rows.append((message, name, int(number), label, ftype, default))
    return rows


@pytest.mark.skipif(not os.path.exists(SSD_FIELDS_MD), reason="refs not available")
def test_every_ssd_field_of_the_reference_list():
    from google.protobuf.descriptor import FieldDescriptor as FD
    rows = _md_rows()
    assert len(rows) > 150
    for message, name, number, label, ftype, default in rows:
        desc = getattr(caffe_pb2, message).DESCRIPTOR.fields_by_name[name]
        where = "%s.%s" % (message, name)
        assert desc.number == number, where
        assert desc.is_repeated == (label == "repeated"), where
        if ftype in _TYPES:
            assert desc.type == _TYPES[ftype], where
        else:
            target = desc.message_type or desc.enum_type
            assert target.full_name == "caffe." + ftype, where
        if default:
            value = desc.default_value
            if desc.enum_type is not None:
                value = desc.enum_type.values_by_number[value].name
                assert value == default, where
            elif desc.type == FD.TYPE_BOOL:
                assert value == (default == "true"), where
            elif desc.type in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
                assert value == pytest.approx(float(default), rel=1e-6), where
            elif desc.type == FD.TYPE_STRING:
                assert value == default, where
            else:
                assert value == int(default), where
