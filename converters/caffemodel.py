"""Binary Caffe files: ``.caffemodel`` (NetParameter), ``.solverstate`` (SolverState) and
``.binaryproto`` (BlobProto: mean files, InfogainLoss H), and the blob <-> array conversion.

Reading reproduces ``ReadNetParamsFromBinaryFileOrDie`` (parse, then the V0/V1/input/BatchNorm
upgrades of :mod:`converters.upgrade`) and ``Blob::FromProto`` (legacy num/channels/height/width
take precedence, as in Caffe, otherwise ``shape.dim``; ``double_data`` if present, else ``data``;
the value count must match the shape). Writing produces what ``Net::ToProto`` / ``Blob::ToProto``
write (``shape`` + float ``data``), so real Caffe reads our files back. Every write is atomic.
"""
import os
import tempfile

import numpy as np
from google.protobuf.message import DecodeError

from . import caffe_pb2
from .errors import CaffeError

__all__ = ["atomic_write", "read_binary_proto", "read_caffemodel", "write_caffemodel",
           "blob_to_array", "blob_diff_to_array", "blob_shape", "array_to_blob",
           "read_binaryproto", "write_binaryproto", "read_solverstate", "write_solverstate",
           "caffemodel_params"]

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def atomic_write(path, data):
    """Write ``data`` (bytes) to ``path`` atomically.

    A temporary file in the same directory is written, flushed and fsynced, then renamed over
    ``path`` with ``os.replace``; readers see the old file or the new one, never a partial one.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    stem = "." + os.path.basename(path) + "."
    try:
        fd, tmp = tempfile.mkstemp(prefix="%s%d." % (stem, os.getpid()), suffix=".tmp",
                                   dir=directory)
    except OSError as exc:
        raise CaffeError("Cannot write %s: %s" % (path, exc.strerror or exc)) from None
    try:
        # mkstemp makes the file private (0600); give it the mode a plain open() would: the
        # existing file's, else 0666 minus the umask (as Caffe's snapshots get).
        try:
            mode = os.stat(path).st_mode & 0o7777
        except OSError:
            mode = 0o666 & ~_umask()
        try:
            os.fchmod(fd, mode)
        except OSError:
            pass
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise CaffeError("Cannot write %s: %s" % (path, exc.strerror or exc)) from None
        raise
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    _remove_stale_temporaries(directory)


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove_stale_temporaries(directory):
    """Temporary files left in ``directory`` by writers that were killed (kill -9, power loss)
    in the middle of an atomic write: ``.<name>.<pid>.<random>.tmp`` whose process is gone."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if not (name.startswith(".") and name.endswith(".tmp")):
            continue
        parts = name[:-len(".tmp")].rsplit(".", 2)
        if len(parts) != 3 or not parts[1].isdigit() or int(parts[1]) == os.getpid():
            continue
        try:
            os.kill(int(parts[1]), 0)
            continue                    # its writer is alive
        except ProcessLookupError:
            pass
        except OSError:                 # alive, owned by someone else
            continue
        try:
            os.unlink(os.path.join(directory, name))
        except OSError:
            pass


def _read_bytes(path, what):
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise CaffeError("File not found: %s" % path) from None
    except IsADirectoryError:
        raise CaffeError("Is a directory, not a %s file: %s" % (what, path)) from None
    except OSError as exc:
        raise CaffeError("Cannot read %s: %s" % (path, exc.strerror or exc)) from None


def read_binary_proto(path, message, what=None):
    """Parse the binary file ``path`` into ``message``; CaffeError naming the file on failure."""
    path = os.fspath(path)
    what = what or message.DESCRIPTOR.name
    data = _read_bytes(path, what)
    if not data:
        raise CaffeError("Failed to parse %s file: %s (the file is empty)" % (what, path))
    if data.startswith(_HDF5_MAGIC):
        raise CaffeError("Failed to parse %s file: %s (this is an HDF5 file; only the "
                         "BINARYPROTO format is supported)" % (what, path))
    try:
        message.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise CaffeError("Failed to parse %s file: %s (truncated or not a %s: %s)"
                         % (what, path, what, exc)) from None
    return message


def read_caffemodel(path, upgrade=True):
    """Read a binary ``.caffemodel`` and upgrade V0/V1 layers (``ReadNetParamsFromBinaryFileOrDie``)."""
    path = os.fspath(path)
    net = read_binary_proto(path, caffe_pb2.NetParameter(), "NetParameter")
    if len(net.layer) == 0 and len(net.layers) == 0:
        raise CaffeError("Failed to parse NetParameter file: %s (no layers: not a NetParameter "
                         "/ .caffemodel?)" % path)
    if upgrade:
        from .upgrade import upgrade_net_as_needed
        upgrade_net_as_needed(path, net)
    return net


def write_caffemodel(path, net_param):
    """Write ``net_param`` (a NetParameter with blobs) as a binary ``.caffemodel``, atomically."""
    atomic_write(path, net_param.SerializeToString())


def caffemodel_params(net_param):
    """``{layer name: [array, ...]}`` of the blobs of every layer that has any (upgraded nets)."""
    return {l.name: [blob_to_array(b) for b in l.blobs] for l in net_param.layer if l.blobs}


# ---------------------------------------------------------------------------------------------
# Blobs

def blob_shape(blob):
    """The shape ``Blob::FromProto`` gives: legacy 4-D if any of num/channels/height/width is
    set, else ``shape.dim``."""
    if (blob.HasField("num") or blob.HasField("channels") or blob.HasField("height")
            or blob.HasField("width")):
        return (blob.num, blob.channels, blob.height, blob.width)
    return tuple(int(d) for d in blob.shape.dim)


def _values(blob, single, double, what):
    shape = blob_shape(blob)
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if any(d < 0 for d in shape):
        raise CaffeError("Blob %s has a negative dimension: %s" % (what, shape))
    doubles = getattr(blob, double)
    if len(doubles) > 0:
        values, n = doubles, len(doubles)
    else:
        values, n = getattr(blob, single), len(getattr(blob, single))
    if n != count:
        raise CaffeError("Blob %s: %d values for shape %s (count %d)"
                         % (what, n, "x".join(map(str, shape)) or "()", count))
    return np.asarray(values, dtype=np.float32).reshape(shape)


def blob_to_array(blob, name="data"):
    """A BlobProto's data as a float32 array of its Caffe shape (``Blob::FromProto``)."""
    return _values(blob, "data", "double_data", name)


def blob_diff_to_array(blob, name="diff"):
    """A BlobProto's diff as a float32 array (an empty diff gives zeros of the shape)."""
    if len(blob.diff) == 0 and len(blob.double_diff) == 0:
        return np.zeros(blob_shape(blob), dtype=np.float32)
    return _values(blob, "diff", "double_diff", name)


def array_to_blob(array, diff=None, blob=None):
    """A BlobProto holding ``array`` as ``shape`` + float ``data`` (``Blob::ToProto``).

    ``diff`` (same shape) is stored too when given (``snapshot_diff``).
    """
    arr = np.asarray(array, dtype=np.float32)
    blob = blob if blob is not None else caffe_pb2.BlobProto()
    blob.Clear()
    blob.shape.dim.extend(int(d) for d in arr.shape)
    blob.data.extend(arr.ravel().tolist())
    if diff is not None:
        d = np.asarray(diff, dtype=np.float32)
        if d.shape != arr.shape:
            raise CaffeError("diff shape %s differs from data shape %s" % (d.shape, arr.shape))
        blob.diff.extend(d.ravel().tolist())
    return blob


def read_binaryproto(path):
    """A ``.binaryproto`` BlobProto (mean file, Infogain H) as a float32 array of its shape."""
    path = os.fspath(path)
    blob = read_binary_proto(path, caffe_pb2.BlobProto(), "BlobProto")
    return blob_to_array(blob, name=path)


def write_binaryproto(path, array, legacy_4d=False):
    """Write ``array`` as a BlobProto file. ``legacy_4d`` writes num/channels/height/width
    (as ``compute_image_mean`` did) instead of ``shape``; the array must then have <= 4 axes."""
    arr = np.asarray(array, dtype=np.float32)
    if legacy_4d:
        if arr.ndim > 4:
            raise CaffeError("legacy 4-D BlobProto needs at most 4 axes, got %d" % arr.ndim)
        dims = (1,) * (4 - arr.ndim) + tuple(arr.shape)
        blob = caffe_pb2.BlobProto(num=dims[0], channels=dims[1], height=dims[2], width=dims[3])
        blob.data.extend(arr.ravel().tolist())
    else:
        blob = array_to_blob(arr)
    atomic_write(path, blob.SerializeToString())


# ---------------------------------------------------------------------------------------------
# Solver state

def read_solverstate(path):
    """Read a binary ``.solverstate`` (SolverState: iter, learned_net, history, current_step)."""
    path = os.fspath(path)
    if path.endswith(".h5"):    # Caffe restores these with RestoreSolverStateFromHDF5
        raise CaffeError("%s is an HDF5 solverstate (snapshot_format: HDF5), which is not "
                         "supported; resume from a BINARYPROTO .solverstate" % path)
    state = read_binary_proto(path, caffe_pb2.SolverState(), "SolverState")
    if not state.HasField("iter") and not state.HasField("learned_net") and not state.history:
        raise CaffeError("Failed to parse SolverState file: %s (no iter / learned_net / "
                         "history: not a .solverstate?)" % path)
    return state


def write_solverstate(path, state):
    """Write a SolverState message as a binary ``.solverstate``, atomically."""
    atomic_write(path, state.SerializeToString())
