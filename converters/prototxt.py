"""Text-format prototxt reading and writing, as Caffe does it.

Reading reproduces ``ReadNetParamsFromTextFileOrDie`` / ``ReadSolverParamsFromTextFileOrDie``
(``upgrade_proto.cpp``): protobuf's text parser (one value per non-repeated field, unknown names
rejected), then the V0/V1/input/BatchNorm/solver upgrades of :mod:`converters.upgrade`.
A parse error becomes a :class:`CaffeError` ``"<file>:<line>:<column>: <what>"``.

Writing reproduces protobuf C++'s ``Message::DebugString()``, which Caffe prints in its logs
("Initializing solver from parameters:", "Initializing net from parameters:"): set fields in
field-number order, two-space indentation, enums by name, ``true``/``false``, and floats printed
as ``SimpleFtoa`` does (``%.6g`` if that reads back as the same float32, else ``%.9g``), so
``0.01`` stays ``0.01`` and ``1`` stays ``1``.
"""
import math
import os
import re

import numpy as np
from google.protobuf import text_encoding, text_format
from google.protobuf.descriptor import FieldDescriptor as _FD

from . import caffe_pb2
from .errors import CaffeError

__all__ = ["read_net", "read_solver", "read_text_proto", "parse_text", "write_text",
           "format_float", "format_double"]

_POSITION = re.compile(r"^\s*\d+:\d+\s*:\s*")


def parse_text(text, message, filename="<string>"):
    """Parse ``text`` (str or bytes) into the message instance ``message``; return it.

    Errors raise ``CaffeError("<filename>:<line>:<column>: <what>")`` with severity F.
    """
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CaffeError("%s: not a text prototxt (invalid UTF-8 at byte %d)"
                             % (filename, exc.start))
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as exc:
        what = _POSITION.sub("", str(exc))
        line, column = exc.GetLine(), exc.GetColumn()
        if line is not None and column is not None:
            raise CaffeError("%s:%d:%d: %s" % (filename, line, column, what)) from None
        if line is not None:
            raise CaffeError("%s:%d: %s" % (filename, line, what)) from None
        raise CaffeError("%s: %s" % (filename, what)) from None
    return message


def read_text_proto(path, message):
    """Read the text file ``path`` into ``message`` (no upgrade); missing file -> CaffeError."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CaffeError("File not found: %s" % path) from None
    except IsADirectoryError:
        raise CaffeError("Is a directory, not a prototxt file: %s" % path) from None
    except OSError as exc:
        raise CaffeError("Cannot read %s: %s" % (path, exc.strerror or exc)) from None
    return parse_text(data, message, str(path))


def read_net(path):
    """Read a text NetParameter and upgrade it as Caffe does (``ReadNetParamsFromTextFileOrDie``)."""
    from . import upgrade
    param = read_text_proto(path, caffe_pb2.NetParameter())
    upgrade.upgrade_net_as_needed(str(path), param)
    return param


def read_solver(path, upgrade_snapshot_prefix=True):
    """Read a text SolverParameter and upgrade it (``ReadSolverParamsFromTextFileOrDie``).

    ``upgrade_snapshot_prefix`` applies BVLC master's ``UpgradeSnapshotPrefixProperty`` (a missing
    prefix becomes the solver file's path without extension; a directory gets the file's stem
    appended); SSD-Caffe does not do this, pass False to mimic it.
    """
    from . import upgrade
    param = read_text_proto(path, caffe_pb2.SolverParameter())
    upgrade.upgrade_solver_as_needed(str(path), param)
    if upgrade_snapshot_prefix:
        upgrade.upgrade_snapshot_prefix(str(path), param)
    return param


# ---------------------------------------------------------------------------------------------
# Writing (DebugString)

def format_float(value):
    """protobuf's SimpleFtoa: shortest of %.6g / %.9g that reads back as the same float32."""
    value = float(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    f32 = np.float32(value)
    value = float(f32)
    text = "%.6g" % value
    if np.float32(float(text)) != f32:
        text = "%.9g" % value
    return text


def format_double(value):
    """protobuf's SimpleDtoa: %.15g, or %.17g when %.15g does not round-trip."""
    value = float(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    text = "%.15g" % value
    if float(text) != value:
        text = "%.17g" % value
    return text


def _format_scalar(field, value):
    t = field.type
    if t == _FD.TYPE_FLOAT:
        return format_float(value)
    if t == _FD.TYPE_DOUBLE:
        return format_double(value)
    if t == _FD.TYPE_BOOL:
        return "true" if value else "false"
    if t == _FD.TYPE_ENUM:
        v = field.enum_type.values_by_number.get(value)
        return v.name if v is not None else str(value)
    if t == _FD.TYPE_STRING:
        if isinstance(value, str):
            value = value.encode("utf-8")
        return '"%s"' % text_encoding.CEscape(value, as_utf8=False)
    if t == _FD.TYPE_BYTES:
        return '"%s"' % text_encoding.CEscape(value, as_utf8=False)
    return str(int(value))


def _print_message(message, indent, out):
    pad = "  " * indent
    fields = sorted(message.ListFields(), key=lambda fv: fv[0].number)
    for field, value in fields:
        values = value if field.is_repeated else [value]
        for item in values:
            if field.type in (_FD.TYPE_MESSAGE, _FD.TYPE_GROUP):
                out.append("%s%s {\n" % (pad, field.name))
                _print_message(item, indent + 1, out)
                out.append("%s}\n" % pad)
            else:
                out.append("%s%s: %s\n" % (pad, field.name, _format_scalar(field, item)))


def write_text(message):
    """The text of ``message`` as Caffe logs it (C++ ``DebugString``), ending with a newline.

    Caffe logs ``"...parameters: " + DebugString()``; strip the final newline before handing it
    to :func:`converters.glog.info`, which adds one.
    """
    out = []
    _print_message(message, 0, out)
    return "".join(out)


def write_text_file(path, message):
    """Write ``message`` as a text prototxt (atomically)."""
    from .caffemodel import atomic_write
    atomic_write(os.fspath(path), write_text(message).encode("utf-8"))
