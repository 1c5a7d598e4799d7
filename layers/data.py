"""Caffe's data layers: Data (LMDB), ImageData, MemoryData, HDF5Data, DummyData, Input.

Data layers have no bottoms and never back-propagate. Their tops are float32 tensors (labels
too, as Caffe's blobs), created on the layer's device (a module ``.to(device)`` moves them).

Data (``data_layer.cpp``, BVLC 1.0)
    Opens the LMDB at creation ("db_lmdb.cpp:35] Opened lmdb <source>"), reads the records in
    key order from the first, and wraps to the first after the last, logging
    "data_layer.cpp:73] Restarting data prefetching from start." each time (from the prefetch
    thread, as Caffe). Top 0 is (batch, C, H, W) of transformed data, the optional top 1 the
    labels (batch,). The batch shape comes from the first datum of each batch. The next
    ``data_param.prefetch`` (default 4) batches are read and transformed on a background
    thread (layers/prefetch.py); the record order is always the sequential order.
    ``data_state()`` / ``load_data_state()`` / ``reset()`` give and set the position of the next
    batch (record index, key and the transformer's RNG state). Note that real Caffe restarts
    from the first record when it resumes from a .solverstate (a fresh layer does the same).
    Only the LMDB backend is supported; LEVELDB is a clear error. ``rand_skip`` skips
    ``rng() % rand_skip`` records at the start ("Skipping first N data points.") as Caffe's
    ImageData and pre-1.0 Data layers do (BVLC 1.0's Data layer ignores it).
"""
import collections
import os
import threading
import weakref

import numpy as np
import torch

from converters import glog
from converters.errors import CaffeError
from layers.base import Layer, check_top_shape, to_device_async
from layers.prefetch import Prefetcher
from layers.registry import register
from layers.transform import DataTransformer, resize_linear_cv, seed_from_torch

_RESTART = "Restarting data prefetching from start."


def _caffe_pb2():
    from converters import caffe_pb2
    return caffe_pb2


def _size_string(shape):
    return ",".join(str(int(d)) for d in shape)


def check_plain_transform(layer, tp):
    """SSD's resize/noise/distort/expand fields belong to AnnotatedData; refuse them here
    rather than silently train on different data."""
    for field in ("resize_param", "noise_param", "distort_param", "expand_param"):
        if tp.HasField(field):
            layer.fail("transform_param.%s is not applied by the %s layer here (SSD's "
                       "AnnotatedData layer applies it)" % (field, layer.param.type))


def transform_param_of(param, legacy=None):
    """The layer's TransformationParameter, with the V1-era transformation fields of
    ``data_param``/``image_data_param`` (scale, mean_file, crop_size, mirror) folded in the way
    Caffe's UpgradeNetDataTransformation does when the upgrade has not run."""
    tp = _caffe_pb2().TransformationParameter()
    tp.CopyFrom(param.transform_param)
    if legacy is not None:
        for field in ("scale", "mean_file", "crop_size", "mirror"):
            if legacy.HasField(field) and not tp.HasField(field):
                setattr(tp, field, getattr(legacy, field))
    return tp


# ----------------------------------------------------------------------------- Datum decoding
def _decode_encoded(datum, mode, what):
    """Encoded datum bytes -> uint8 (C, H, W) BGR/gray, as cv::imdecode (converters.datum)."""
    from converters.datum import decode_image
    return decode_image(datum.data, color={"color": True, "gray": False}.get(mode), key=what)


def read_image_file(path, color, what):
    """cv::imread of ``path`` (color True: BGR, False: gray) as uint8 (C, H, W)."""
    from converters.datum import decode_image
    with open(path, "rb") as f:
        data = f.read()
    return decode_image(data, color=color, key=what)


def datum_array(datum, transformer=None, what="datum"):
    """One Datum as a (C, H, W) array: uint8 for ``data``, float32 for ``float_data``, the
    decoded image for ``encoded`` (honouring force_color / force_gray of ``transformer``)."""
    if datum.encoded:
        mode = transformer.decode_mode() if transformer is not None else None
        return _decode_encoded(datum, mode, what)
    if transformer is not None:
        transformer.warn_force_for_raw()
    c, h, w = datum.channels, datum.height, datum.width
    size = c * h * w
    if c <= 0 or h <= 0 or w <= 0:
        raise CaffeError("%s has no valid size (channels %d, height %d, width %d)"
                         % (what, c, h, w), where="data_transformer.cpp:61")
    if len(datum.data):
        if len(datum.data) != size:
            raise CaffeError("%s holds %d bytes of data for %dx%dx%d = %d"
                             % (what, len(datum.data), c, h, w, size))
        return np.frombuffer(datum.data, dtype=np.uint8).reshape(c, h, w)
    if len(datum.float_data) != size:
        raise CaffeError("%s holds %d float_data values for %dx%dx%d = %d"
                         % (what, len(datum.float_data), c, h, w, size))
    return np.asarray(datum.float_data, dtype=np.float32).reshape(c, h, w)


def parse_datum(value, what):
    """Datum from a record's bytes; a record that does not parse is a CaffeError."""
    from google.protobuf.message import DecodeError
    datum = _caffe_pb2().Datum()
    try:
        datum.ParseFromString(value)
    except DecodeError as exc:
        raise CaffeError("Corrupt record: %s is not a Datum (%s)" % (what, exc))
    return datum


def datums_to_batch(datums, transformer, whats):
    """Transform a list of Datums into float32 (N, C, H, W) (vectorised for raw uint8)."""
    first = datums[0]
    if not first.encoded and len(first.data):
        c, h, w = first.channels, first.height, first.width
        size = c * h * w
        fast = size > 0
        for d in datums:
            if (d.encoded or d.channels != c or d.height != h or d.width != w
                    or len(d.data) != size):
                fast = False
                break
        if fast:
            transformer.warn_force_for_raw()
            buf = b"".join([d.data for d in datums])
            arr = np.frombuffer(buf, dtype=np.uint8).reshape(len(datums), c, h, w)
            return transformer(arr)
    items = [datum_array(d, transformer, what) for d, what in zip(datums, whats)]
    if any(it.dtype != np.uint8 for it in items):
        items = [it.astype(np.float32, copy=False) for it in items]
    return transformer.transform_list(items, whats)


# ----------------------------------------------------------------------------- LMDB
_ENV_LOCK = threading.Lock()
_ENVS = {}      # realpath -> [lmdb.Environment, users]: py-lmdb opens an environment once
# Releases that could not take the lock: a reader's weakref finalizer can run from garbage
# collection inside _acquire_env (py-lmdb walks its open environments there), on the thread
# that already holds the lock. They are applied, in order, by the next acquire or release.
_PENDING_RELEASES = collections.deque()


def _acquire_env(path):
    import lmdb
    key = os.path.realpath(path)
    with _ENV_LOCK:
        _drain_pending_locked()
        entry = _ENVS.get(key)
        if entry is None:
            env = lmdb.open(path, readonly=True, lock=False, readahead=False, max_readers=512,
                            subdir=True)
            entry = _ENVS[key] = [env, 0]
        entry[1] += 1
        return key, entry[0]


def _release_env(key):
    if not _ENV_LOCK.acquire(blocking=False):
        _PENDING_RELEASES.append(key)     # never block: we may be inside _acquire_env
        return
    try:
        _drain_pending_locked()
        _release_locked(key)
    finally:
        _ENV_LOCK.release()


def _drain_pending_locked():
    while _PENDING_RELEASES:
        _release_locked(_PENDING_RELEASES.popleft())


def _release_locked(key):
    entry = _ENVS.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] <= 0:
        del _ENVS[key]
        try:
            entry[0].close()
        except Exception:  # pragma: no cover
            pass


class LmdbReader:
    """A read-only LMDB with Caffe's cursor semantics (key order, wrap to the first).

    Readers of the same database (a TRAIN and a TEST net on one source) share one environment.
    """

    def __init__(self, path, layer_name=None):
        import lmdb
        self.path = path
        self.layer_name = layer_name
        if not os.path.isdir(path):
            raise CaffeError("Check failed: mdb_status == 0 (2 vs. 0) No such file or directory: "
                             "cannot open lmdb %s%s" % (path, self._who()), where="db_lmdb.hpp:15")
        try:
            key, self.env = _acquire_env(path)
        except lmdb.Error as exc:
            raise CaffeError("Check failed: mdb_status == 0 cannot open lmdb %s%s: %s"
                             % (path, self._who(), exc), where="db_lmdb.hpp:15")
        self._release = weakref.finalize(self, _release_env, key)
        self.entries = int(self.env.stat()["entries"])
        if self.entries == 0:
            self._release()
            raise CaffeError("lmdb %s%s holds no records" % (path, self._who()),
                             where="db_lmdb.cpp:35")

    def _who(self):
        return " (layer %s)" % self.layer_name if self.layer_name else ""

    def what(self, key):
        return "record key %r of lmdb %s%s" % (_key_str(key), self.path, self._who())

    def first(self):
        """(key, value) of the first record, without any cursor state."""
        with self.env.begin(buffers=False) as txn:
            cur = txn.cursor()
            cur.first()
            return cur.key(), cur.value()

    def close(self):
        self._release()


def _key_str(key):
    if isinstance(key, (bytes, bytearray)):
        return bytes(key).decode("latin-1")
    return key


def _key_bytes(key):
    if isinstance(key, str):
        return key.encode("latin-1")
    return key


class LmdbDatumSource:
    """Batches of transformed Datums read sequentially from an LMDB (Caffe's load_batch).

    State: {"index": next record's 0-based index, "key": its key, "offset": records visited
    (Caffe's ``offset_`` for multi-solver skipping), "rng": the transformer's RNG state}.
    """

    def __init__(self, reader, batch_size, transformer, output_labels=True, rank=0,
                 world_size=1, skip_allowed=True):
        self.reader = reader
        self.batch_size = int(batch_size)
        self.transformer = transformer
        self.output_labels = output_labels
        self.rank, self.world_size, self.skip_allowed = rank, world_size, skip_allowed
        self.index = 0
        self.key = None
        self.offset = 0
        self._txn = None
        self._cursor = None

    # -- state
    def get_state(self):
        return {"index": self.index, "key": _key_str(self.key) if self.key is not None else None,
                "offset": self.offset, "rng": self.transformer.get_rng_state()}

    def set_state(self, state):
        self.index = int(state.get("index", 0)) % self.reader.entries
        key = state.get("key")
        self.key = _key_bytes(key) if key is not None else None
        self.offset = int(state.get("offset", 0))
        if state.get("rng") is not None:
            self.transformer.set_rng_state(state["rng"])

    # -- producer thread
    def open(self):
        self._txn = self.reader.env.begin(buffers=False)
        cur = self._txn.cursor()
        placed = False
        if self.key is not None:
            placed = cur.set_key(self.key)
        if not placed:
            cur.first()
            for _ in range(self.index):
                if not cur.next():
                    cur.first()
        self._cursor = cur
        self.key = cur.key()

    def close(self):
        if self._txn is not None:
            try:
                self._txn.abort()
            except Exception:  # pragma: no cover
                pass
        self._txn = None
        self._cursor = None

    def _next(self):
        cur = self._cursor
        if cur.next():
            self.index += 1
        else:
            glog.info(_RESTART, where="data_layer.cpp:73")
            cur.first()
            self.index = 0
        self.key = cur.key()
        self.offset += 1

    def _skip(self):
        return self.skip_allowed and self.world_size > 1 and \
            (self.offset % self.world_size) != self.rank

    def skip_records(self, n):
        """Advance ``n`` records (rand_skip), on the calling thread."""
        if n <= 0:
            return
        self.open()
        try:
            for _ in range(n):
                self._next()
        finally:
            self.close()

    def read_records(self):
        records = []
        cur = self._cursor
        for _ in range(self.batch_size):
            while self._skip():
                self._next()
            records.append((cur.key(), cur.value()))
            self._next()
        return records

    label_check = None     # (upper, ignore_label or None, consumer layer name): see check_labels

    def next_batch(self):
        records = self.read_records()
        whats = [self.reader.what(k) for k, _ in records]
        datums = [parse_datum(v, w) for (_, v), w in zip(records, whats)]
        data = datums_to_batch(datums, self.transformer, whats)
        out = [torch.from_numpy(data)]
        if self.output_labels:
            labels = np.asarray([d.label for d in datums], dtype=np.float32)
            if self.label_check is not None:
                check_label_values(labels, self.label_check, whats)
            out.append(torch.from_numpy(labels))
        return tuple(out)


def check_label_values(labels, label_check, whats):
    """Caffe's ``label_value < num_classes`` check of SoftmaxWithLoss, made on the CPU as the
    batch is read (a label is ``static_cast<int>`` of the float)."""
    upper, ignore, consumer = label_check
    values = labels.astype(np.int64)
    bad = (values < 0) | (values >= upper)
    if ignore is not None:
        bad &= values != ignore
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise CaffeError("Check failed: label_value < num_classes: label %d of %s is outside "
                         "[0, %d), the classes of layer %s (SoftmaxWithLoss)%s"
                         % (values[i], whats[i], upper, consumer,
                            "" if ignore is None else " and is not its ignore_label %d" % ignore),
                         where="softmax_loss_layer.cpp:80")


# ----------------------------------------------------------------------------- base classes
class _DataLayer(Layer):
    """Shared by the data layers: no bottoms, no backward, tops on the layer's device."""

    exact_bottoms = 0
    never_backward = True
    is_data = True

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        self.register_buffer("_device_probe", torch.empty(0), persistent=False)
        self._log_lines = []
        self._top_shapes = []

    @property
    def device(self):
        return self._device_probe.device

    def _check_top_shapes(self):
        """The net builder's blob checks, made before a loader thread starts: a batch too big
        for a blob is refused before any of it is read."""
        for top, shape in zip(self.param.top, self._top_shapes):
            check_top_shape(self.param, top, shape)

    def _to_device(self, tensors):
        """The batch's tops on the layer's device. On CUDA the host batch is pinned (by the
        prefetch thread where there is one, as Caffe's prefetch thread pushes batches) and copied
        asynchronously, and each device top keeps its host batch as ``host_copy`` (Caffe's
        SyncedMemory holds both after a push): a consumer that needs the values on the host
        (MultiBoxLoss's ground truth) reads them there instead of waiting for the GPU."""
        dev = self._device_probe.device
        if dev.type == "cpu":
            return tensors
        source = getattr(getattr(self, "prefetcher", None), "source", None)
        if dev.type == "cuda" and source is not None:
            source.pin_memory = True    # later batches come pinned from the prefetch thread
        out = []
        for t in tensors:
            d = to_device_async(t, dev)
            d.host_copy = t
            out.append(d)
        return tuple(out)

    def extra_log_lines(self):
        return list(self._log_lines)

    def top_shapes(self):
        return [tuple(s) for s in self._top_shapes]

    def _zeros(self):
        return tuple(torch.zeros(s, dtype=torch.float32, device=self.device)
                     for s in self._top_shapes)

    @staticmethod
    def _single(tops):
        return tops[0] if len(tops) == 1 else tops

    # data position API (overridden by the layers with a position)
    def data_state(self):
        return None

    def load_data_state(self, state):
        pass

    def reset(self):
        pass

    def check_labels(self, top_index, upper, ignore_label, consumer):
        """Asked by the Net for a top that is a SoftmaxWithLoss's label: refuse values outside
        [0, upper) other than ``ignore_label`` as batches are read (layers that can, do)."""

    # the names the solver looks for when it snapshots / restores (solvers/solver.py)
    def state_dict_position(self):
        return self.data_state()

    def load_state_dict_position(self, state):
        self.load_data_state(state)


class _PrefetchingDataLayer(_DataLayer):
    """A data layer whose batches come from a source through a :class:`Prefetcher`."""

    prefetcher = None

    def forward(self):
        if self.shape_inference:
            return self._single(self._zeros())
        tops = self.prefetcher.get()
        return self._single(self._to_device(tops))

    def data_state(self):
        """Position of the next batch forward will return (a small JSON-able dict)."""
        return dict(self.prefetcher.position)

    def load_data_state(self, state):
        """Continue from a :meth:`data_state` value (drops batches read ahead)."""
        if state is not None:
            self.prefetcher.seek(state)

    def reset(self):
        """Go back to the first record (rand_skip is not applied again)."""
        state = self._initial_state()
        self.prefetcher.seek(state)

    def _initial_state(self):  # pragma: no cover - overridden
        raise NotImplementedError

    def close(self):
        """Stop the prefetch thread (the layer can not be used afterwards)."""
        if self.prefetcher is not None:
            self.prefetcher.stop()


def check_lmdb_data_param(layer, dp, tag):
    """Caffe's checks of a DataParameter for an LMDB-reading layer (Data, AnnotatedData):
    source set, LMDB backend (an unset backend on an LMDB folder is read as LMDB with a warning,
    since Caffe's default is LEVELDB), positive batch_size. Returns (source, batch_size)."""
    pb2 = _caffe_pb2()
    source = dp.source
    if not source:
        layer.fail("data_param.source is not set")
    if dp.backend == pb2.DataParameter.LEVELDB:
        is_lmdb = os.path.isfile(os.path.join(source, "data.mdb"))
        if dp.HasField("backend") or not is_lmdb:
            layer.fail("The LEVELDB backend is not supported (source %s); convert the "
                       "database to LMDB and set data_param { backend: LMDB }" % source,
                       "db.cpp:25")
        glog.warning("data_param.backend is not set (Caffe's default is LEVELDB); reading "
                     "%s as LMDB" % source, where=tag)
    if dp.batch_size <= 0:
        layer.fail("data_param.batch_size must be positive (got %d)" % dp.batch_size,
                   "data_layer.cpp:31")
    return source, int(dp.batch_size)


# ----------------------------------------------------------------------------- Data
@register("Data", "DATA")
class Data(_PrefetchingDataLayer):
    """Caffe's DataLayer on an LMDB of Datum records (see the module docstring)."""

    min_tops = 1
    max_tops = 2

    def __init__(self, param, bottom_shapes, phase="TRAIN", rank=0, world_size=1):
        super().__init__(param, bottom_shapes, phase)
        dp = param.data_param
        source, self.batch_size = check_lmdb_data_param(self, dp, "data.py")
        self.source_path = source
        self.output_labels = len(param.top) != 1
        self.reader = LmdbReader(source, self.name)
        glog.info("Opened lmdb %s" % source, where="db_lmdb.cpp:35")
        tp = transform_param_of(param, dp)
        check_plain_transform(self, tp)
        self.transformer = DataTransformer(tp, phase, layer_name=self.name)
        self._log_lines.extend(self.transformer.log_lines)
        key, value = self.reader.first()
        what = self.reader.what(key)
        datum = parse_datum(value, what)
        first = datum_array(datum, self.transformer if datum.encoded else None, what)
        shape = (self.batch_size,) + self.transformer.infer_shape(*first.shape)
        self._top_shapes = [shape] + ([(self.batch_size,)] if self.output_labels else [])
        self._log_lines.append(("data_layer.cpp:45", "output data size: %s" % _size_string(shape)))
        self.source = LmdbDatumSource(self.reader, self.batch_size, self.transformer,
                                      self.output_labels, rank, world_size,
                                      skip_allowed=(self.phase == "TRAIN"))
        if dp.rand_skip:
            rng = np.random.Generator(np.random.PCG64(seed_from_torch()))
            skip = int(rng.integers(0, dp.rand_skip))
            self._log_lines.append(("data_layer.cpp:34", "Skipping first %d data points." % skip))
            self.source.skip_records(skip)
            self.source.offset = 0
        self._start_rng = self.transformer.get_rng_state()
        self._check_top_shapes()
        self.prefetcher = Prefetcher(self.source, dp.prefetch, name="data-" + self.name)

    def _initial_state(self):
        return {"index": 0, "key": None, "offset": 0, "rng": self._start_rng}

    def check_labels(self, top_index, upper, ignore_label, consumer):
        if top_index != 1 or not self.output_labels:
            return
        self.source.label_check = (int(upper), ignore_label, consumer)
        # batches read ahead before the check was known are read again (same position)
        self.prefetcher.seek(self.prefetcher.position)

    def shard(self, rank, world_size):
        """Caffe's multi-solver Skip(): in TRAIN, this solver keeps the records whose running
        offset % world_size == rank (call before the first forward)."""
        self.prefetcher.stop()
        self.source.rank, self.source.world_size = int(rank), int(world_size)
        self.prefetcher.seek(self.prefetcher.position)

    def close(self):
        super().close()
        self.reader.close()


# ----------------------------------------------------------------------------- ImageData
class ImageListSource:
    """Caffe's ImageDataLayer::load_batch over a list of (path, label) lines."""

    def __init__(self, lines, root, batch_size, transformer, new_h, new_w, is_color, shuffle,
                 seed, layer_name):
        self.lines = lines
        self.root = root
        self.batch_size = batch_size
        self.transformer = transformer
        self.new_h, self.new_w = new_h, new_w
        self.is_color = is_color
        self.shuffle = shuffle
        self.layer_name = layer_name
        self.order = list(range(len(lines)))
        self.rng = np.random.Generator(np.random.PCG64(seed)) if shuffle else None
        self.lines_id = 0

    def shuffle_images(self):
        self.rng.shuffle(self.order)

    def get_state(self):
        return {"lines_id": self.lines_id,
                "order": list(self.order) if self.shuffle else None,
                "shuffle_rng": self.rng.bit_generator.state if self.rng is not None else None,
                "rng": self.transformer.get_rng_state()}

    def set_state(self, state):
        self.lines_id = int(state.get("lines_id", 0))
        if state.get("order") is not None:
            self.order = [int(i) for i in state["order"]]
        if state.get("shuffle_rng") is not None and self.rng is not None:
            self.rng.bit_generator.state = state["shuffle_rng"]
        if state.get("rng") is not None:
            self.transformer.set_rng_state(state["rng"])

    def load(self, idx):
        name, _ = self.lines[self.order[idx]]
        path = self.root + name
        if not os.path.isfile(path):
            glog.error("Could not open or find file %s" % path, where="io.cpp:83")
            raise CaffeError("Check failed: cv_img.data Could not load %s (layer %s)"
                             % (name, self.layer_name), where="image_data_layer.cpp:143")
        try:
            img = read_image_file(path, self.is_color, path)
        except CaffeError as exc:       # undecodable: name the layer too
            raise CaffeError("%s (layer %s)" % (exc.message, self.layer_name),
                             where=exc.where) from None
        except OSError as exc:
            raise CaffeError("Check failed: cv_img.data Could not load %s (layer %s): %s"
                             % (name, self.layer_name, exc.strerror or exc),
                             where="image_data_layer.cpp:143")
        if self.new_h > 0 and self.new_w > 0:
            img = resize_linear_cv(img, self.new_h, self.new_w)
        return img

    def next_batch(self):
        items, labels, names = [], [], []
        n = len(self.lines)
        for _ in range(self.batch_size):
            items.append(self.load(self.lines_id))
            name, label = self.lines[self.order[self.lines_id]]
            labels.append(label)
            names.append(name)
            self.lines_id += 1
            if self.lines_id >= n:
                self.lines_id = 0        # Caffe: DLOG "Restarting data prefetching from start."
                if self.shuffle:
                    self.shuffle_images()
        data = self.transformer.transform_list(items, names)
        return (torch.from_numpy(data), torch.from_numpy(np.asarray(labels, dtype=np.float32)))


def read_image_list(source, what):
    """Lines "path label" (the label after the last space, as Caffe 1.0)."""
    try:
        with open(source, "r") as f:
            text = f.read()
    except OSError as exc:
        raise CaffeError("Could not open image list %s%s: %s" % (source, what, exc.strerror),
                         where="image_data_layer.cpp:37")
    lines = []
    for ln, line in enumerate(text.splitlines(), 1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        pos = line.rfind(" ")
        name, label = (line[:pos], line[pos + 1:]) if pos >= 0 else (line, "")
        try:
            value = int(label)
        except ValueError:
            raise CaffeError("%s:%d: expected \"path label\" with an integer label, got %r%s"
                             % (source, ln, line, what), where="image_data_layer.cpp:44")
        lines.append((name, value))
    return lines


@register("ImageData", "IMAGE_DATA")
class ImageData(_PrefetchingDataLayer):
    """Caffe's ImageDataLayer: images listed in ``source`` ("path label" lines), read with
    pillow into BGR (``is_color``) or gray, resized with OpenCV's bilinear rule when
    ``new_height``/``new_width`` are set, transformed, in list order (``shuffle``: a permutation
    drawn from the solver-seeded generator at setup and again at every wrap)."""

    exact_tops = 2

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        ip = param.image_data_param
        new_h, new_w = int(ip.new_height), int(ip.new_width)
        if not ((new_h == 0 and new_w == 0) or (new_h > 0 and new_w > 0)):
            self.fail("Check failed: (new_height == 0 && new_width == 0) || (new_height > 0 && "
                      "new_width > 0) Current implementation requires new_height and new_width "
                      "to be set at the same time.", "image_data_layer.cpp:31")
        tp = transform_param_of(param, ip)
        check_plain_transform(self, tp)
        self.transformer = DataTransformer(tp, phase, layer_name=self.name)
        self._log_lines.extend(self.transformer.log_lines)
        source = ip.source
        self._log_lines.append(("image_data_layer.cpp:38", "Opening file %s" % source))
        lines = read_image_list(source, " (layer %s)" % self.name)
        if not lines:
            self.fail("Check failed: !lines_.empty() File is empty", "image_data_layer.cpp:49")
        shuffle_seed = None
        if ip.shuffle:
            self._log_lines.append(("image_data_layer.cpp:53", "Shuffling data"))
            shuffle_seed = seed_from_torch()
        self._log_lines.append(("image_data_layer.cpp:63", "A total of %d images." % len(lines)))
        if ip.batch_size <= 0:
            self.fail("Check failed: batch_size > 0 (%d vs. 0) Positive batch size required"
                      % ip.batch_size, "image_data_layer.cpp:84")
        self.batch_size = int(ip.batch_size)
        self.source = ImageListSource(lines, ip.root_folder, self.batch_size, self.transformer,
                                      new_h, new_w, bool(ip.is_color), bool(ip.shuffle),
                                      shuffle_seed, self.name)
        if ip.shuffle:
            self.source.shuffle_images()
        self._start_state = self.source.get_state()
        if ip.rand_skip:
            rng = np.random.Generator(np.random.PCG64(seed_from_torch()))
            skip = int(rng.integers(0, ip.rand_skip))
            self._log_lines.append(("image_data_layer.cpp:70", "Skipping first %d data points."
                                    % skip))
            if skip >= len(lines):
                self.fail("Check failed: lines_.size() > skip (%d vs. %d) Not enough points to "
                          "skip" % (len(lines), skip), "image_data_layer.cpp:71")
            self.source.lines_id = skip
        first = self.source.load(self.source.lines_id)
        shape = (self.batch_size,) + self.transformer.infer_shape(*first.shape)
        self._top_shapes = [shape, (self.batch_size,)]
        self._log_lines.append(("image_data_layer.cpp:91",
                                "output data size: %s" % _size_string(shape)))
        self._check_top_shapes()
        self.prefetcher = Prefetcher(self.source, param.data_param.prefetch,
                                     name="imagedata-" + self.name)

    def _initial_state(self):
        return dict(self._start_state)


# ----------------------------------------------------------------------------- MemoryData
@register("MemoryData", "MEMORY_DATA")
class MemoryData(_DataLayer):
    """Caffe's MemoryDataLayer fed from numpy arrays with :meth:`reset` (pycaffe's
    ``set_input_arrays``): batches are consecutive slices, wrapping around; no transformation
    is applied to arrays given this way (Caffe warns when transform_param is set)."""

    exact_tops = 2

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        mp = param.memory_data_param
        self.batch_size = int(mp.batch_size)
        self.channels, self.height, self.width = int(mp.channels), int(mp.height), int(mp.width)
        if self.batch_size * self.channels * self.height * self.width <= 0:
            self.fail("Check failed: batch_size_ * size_ > 0 (0 vs. 0) batch_size, channels, "
                      "height, and width must be specified and positive in memory_data_param",
                      "memory_data_layer.cpp:18")
        self._top_shapes = [(self.batch_size, self.channels, self.height, self.width),
                            (self.batch_size,)]
        self._data = None
        self._labels = None
        self.pos = 0

    def reset(self, data=None, labels=None):
        """Feed ``data`` (n, C, H, W) and ``labels`` (n,) or (n,1,1,1); n a multiple of the batch
        size. With no arguments, go back to the first batch of the arrays given before."""
        if data is None and labels is None:
            self.pos = 0
            return
        if data is None or labels is None:
            raise CaffeError("MemoryData %s: reset needs both data and labels" % self.name)
        data = np.asarray(data)
        labels = np.asarray(labels)
        if data.ndim != 4:
            raise CaffeError("data array must have 4 dimensions, got shape %s (layer %s)"
                             % (data.shape, self.name))
        if data.shape[1:] != (self.channels, self.height, self.width):
            raise CaffeError("data array has shape %s, layer %s expects (n, %d, %d, %d)"
                             % (data.shape, self.name, self.channels, self.height, self.width))
        labels = labels.reshape(labels.shape[0], -1) if labels.ndim else labels.reshape(1, 1)
        if labels.shape[1] != 1:
            raise CaffeError("labels array must hold one label per item, got shape %s (layer %s)"
                             % (labels.shape, self.name))
        if labels.shape[0] != data.shape[0]:
            raise CaffeError("data and labels must have the same first dimension (%d vs. %d, "
                             "layer %s)" % (data.shape[0], labels.shape[0], self.name))
        n = data.shape[0]
        if n == 0 or n % self.batch_size:
            raise CaffeError("Check failed: n % batch_size_ == 0 (" + str(n % self.batch_size)
                             + " vs. 0) n must be a multiple of batch size (%d items, batch %d, "
                             "layer %s)" % (n, self.batch_size, self.name),
                             where="memory_data_layer.cpp:82")
        if self.param.HasField("transform_param"):
            glog.warning("MemoryData does not transform array data on Reset()",
                         where="memory_data_layer.cpp:85")
        self._data = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
        self._labels = torch.from_numpy(np.ascontiguousarray(labels.reshape(-1),
                                                             dtype=np.float32))
        self.pos = 0

    set_input_arrays = reset

    def forward(self):
        if self.shape_inference:
            return self._zeros()
        if self._data is None:
            raise CaffeError("Check failed: data_ MemoryDataLayer needs to be initialized by "
                             "calling Reset (layer %s)" % self.name,
                             where="memory_data_layer.cpp:111")
        b = self.batch_size
        data = self._data[self.pos:self.pos + b]
        labels = self._labels[self.pos:self.pos + b]
        self.pos = (self.pos + b) % self._data.shape[0]
        return self._to_device((data.clone(), labels.clone()))

    def data_state(self):
        return {"pos": self.pos}

    def load_data_state(self, state):
        if state is not None:
            self.pos = int(state.get("pos", 0))


# ----------------------------------------------------------------------------- HDF5Data
def _h5py():
    try:
        import h5py
    except ImportError:
        raise CaffeError("HDF5Data needs the h5py package, which is not installed "
                         "(pip install h5py)", where="hdf5_data_layer.cpp:24")
    return h5py


@register("HDF5Data", "HDF5_DATA")
class HDF5Data(_DataLayer):
    """Caffe's HDF5DataLayer: ``source`` lists .h5 files; each top reads the dataset of its
    name, all with the same first dimension; rows in order (``shuffle``: the file order and the
    rows of each file are permuted, again at each pass). No transformation, no prefetch."""

    min_tops = 1

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        hp = param.hdf5_data_param
        self.tops = list(param.top)
        self.batch_size = int(hp.batch_size)
        if self.batch_size <= 0:
            self.fail("hdf5_data_param.batch_size must be positive (got %d)" % self.batch_size)
        self.shuffle = bool(hp.shuffle)
        source = hp.source
        self._log_lines.append(("hdf5_data_layer.cpp:79",
                                "Loading list of HDF5 filenames from: %s" % source))
        try:
            with open(source, "r") as f:
                self.files = f.read().split()
        except OSError as exc:
            self.fail("Failed to open source file: %s (%s)" % (source, exc.strerror),
                      "hdf5_data_layer.cpp:89")
        self._log_lines.append(("hdf5_data_layer.cpp:93", "Number of HDF5 files: %d"
                                % len(self.files)))
        if not self.files:
            self.fail("Check failed: num_files_ >= 1 (0 vs. 1) Must have at least 1 HDF5 "
                      "filename listed in %s" % source, "hdf5_data_layer.cpp:94")
        try:
            _h5py()
        except CaffeError as exc:
            self.fail(exc.message, exc.where)
        self.rng = np.random.Generator(np.random.PCG64(seed_from_torch())) if self.shuffle \
            else None
        self.file_perm = list(range(len(self.files)))
        if self.shuffle:
            self.rng.shuffle(self.file_perm)
        self.current_file = 0
        self._load(self.file_perm[0])
        self.current_row = 0
        self._top_shapes = [(self.batch_size,) + tuple(b.shape[1:]) for b in self.blobs_data]
        self._initial = self.data_state()

    def _load(self, index):
        h5py = _h5py()
        path = self.files[index]
        try:
            with h5py.File(path, "r") as f:
                blobs = []
                for name in self.tops:
                    if name not in f:
                        self.fail("Failed to find HDF5 dataset %s in %s" % (name, path),
                                  "hdf5.cpp:16")
                    arr = np.asarray(f[name])
                    if arr.dtype.kind not in "fiub":
                        self.fail("Unsupported datatype of HDF5 dataset %s in %s: %s"
                                  % (name, path, arr.dtype), "hdf5.cpp:33")
                    if arr.ndim < 1:
                        self.fail("Input must have at least 1 axis (dataset %s in %s)"
                                  % (name, path), "hdf5.cpp:21")
                    blobs.append(np.ascontiguousarray(arr, dtype=np.float32))
        except OSError as exc:
            self.fail("Failed opening HDF5 file: %s (%s)" % (path, exc), "hdf5_data_layer.cpp:34")
        num = blobs[0].shape[0]
        for name, b in zip(self.tops, blobs):
            if b.shape[0] != num:
                self.fail("Check failed: hdf_blobs_[i]->shape(0) == num (%d vs. %d) dataset %s "
                          "of %s" % (b.shape[0], num, name, path), "hdf5_data_layer.cpp:57")
        if num == 0:
            self.fail("HDF5 file %s has no rows" % path, "hdf5_data_layer.cpp:57")
        self.blobs_data = blobs
        self.loaded_file = index
        self.data_perm = list(range(num))
        if self.shuffle:
            self.rng.shuffle(self.data_perm)

    def _next(self):
        self.current_row += 1
        if self.current_row == self.blobs_data[0].shape[0]:
            if len(self.files) > 1:
                self.current_file += 1
                if self.current_file == len(self.files):
                    self.current_file = 0
                    if self.shuffle:
                        self.rng.shuffle(self.file_perm)
                self._load(self.file_perm[self.current_file])
            self.current_row = 0
            if self.shuffle:
                self.rng.shuffle(self.data_perm)

    def forward(self):
        if self.shape_inference:
            return self._single(self._zeros())
        outs = [np.empty((self.batch_size,) + b.shape[1:], dtype=np.float32)
                for b in self.blobs_data]
        for i in range(self.batch_size):
            row = self.data_perm[self.current_row]
            for out, b in zip(outs, self.blobs_data):
                if out.shape[1:] != b.shape[1:]:
                    self.fail("HDF5 dataset shapes changed between files (%s vs. %s)"
                              % (out.shape[1:], b.shape[1:]))
                out[i] = b[row]
            self._next()
        return self._single(self._to_device(tuple(torch.from_numpy(o) for o in outs)))

    def data_state(self):
        return {"file": self.current_file, "row": self.current_row,
                "file_perm": list(self.file_perm), "data_perm": list(self.data_perm),
                "rng": self.rng.bit_generator.state if self.rng is not None else None}

    def load_data_state(self, state):
        if state is None:
            return
        self.file_perm = [int(i) for i in state["file_perm"]]
        self.current_file = int(state["file"])
        if self.loaded_file != self.file_perm[self.current_file]:
            self._load(self.file_perm[self.current_file])
        self.data_perm = [int(i) for i in state["data_perm"]]
        self.current_row = int(state["row"])
        if self.rng is not None and state.get("rng") is not None:
            self.rng.bit_generator.state = state["rng"]

    def reset(self):
        self.load_data_state(self._initial)


# ----------------------------------------------------------------------------- DummyData
@register("DummyData", "DUMMY_DATA")
class DummyData(_DataLayer):
    """Caffe's DummyDataLayer: one shape (``shape`` or legacy num/channels/height/width) and
    one ``data_filler`` for all tops or one per top; constant fillers (the default, value 0)
    are filled once, other fillers refill their tops at every forward."""

    min_tops = 1

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        dp = param.dummy_data_param
        num_top = len(param.top)
        nf = len(dp.data_filler)
        if nf not in (0, 1, num_top):
            self.fail("Check failed: num_data_filler == 0 || num_data_filler == 1 || "
                      "num_data_filler == num_top Number of data fillers must be 0, 1 or equal "
                      "to the number of tops: %d; you specified %d data fillers."
                      % (num_top, nf), "dummy_data_layer.cpp:20")
        legacy = len(dp.num) or len(dp.channels) or len(dp.height) or len(dp.width)
        shapes = []
        if legacy:
            if len(dp.shape):
                self.fail("Check failed: 0 == param.shape_size() (0 vs. %d) Both shape and "
                          "legacy fields were specified" % len(dp.shape),
                          "dummy_data_layer.cpp:34")
            for field in ("num", "channels", "height", "width"):
                k = len(getattr(dp, field))
                if k not in (1, num_top):
                    self.fail("Check failed: param.%s_size() == 1 || param.%s_size() == num_top "
                              "Must specify '%s' once, or once per top blob (%d); specified %d."
                              % (field, field, field, num_top, k), "dummy_data_layer.cpp:36")
            for i in range(num_top):
                shapes.append(tuple(int(getattr(dp, f)[0 if len(getattr(dp, f)) == 1 else i])
                                    for f in ("num", "channels", "height", "width")))
        else:
            k = len(dp.shape)
            if k not in (1, num_top):
                self.fail("Check failed: shape_size == 1 || shape_size == num_top Must specify "
                          "'shape' once, or once per top blob (%d); specified %d."
                          % (num_top, k), "dummy_data_layer.cpp:55")
            for i in range(num_top):
                shapes.append(tuple(int(d) for d in dp.shape[0 if k == 1 else i].dim))
        self._top_shapes = shapes
        if nf == 0:
            filler = _caffe_pb2().FillerParameter()
            filler.type = "constant"
            filler.value = 0
            fillers = [filler] * num_top
        else:
            fillers = [dp.data_filler[0 if nf == 1 else i] for i in range(num_top)]
        self.fillers = fillers
        self.refill = [(f.type or "constant") != "constant" for f in fillers]
        from layers.fillers import FILLER_TYPES, fill
        for f in fillers:     # a refilled top would meet an unknown name only in forward
            if (f.type or "constant") not in FILLER_TYPES:
                self.fail("Unknown filler name: %s" % f.type, "filler.hpp:285")
        self._constant = []
        for shape, f, refill in zip(shapes, fillers, self.refill):
            if refill:
                self._constant.append(None)
            else:
                t = torch.empty(shape, dtype=torch.float32)
                fill(t, f)
                self._constant.append(t)

    def forward(self):
        from layers.fillers import fill
        if self.shape_inference:
            return self._single(self._zeros())
        dev = self.device
        tops = []
        for shape, f, const in zip(self._top_shapes, self.fillers, self._constant):
            if const is not None:
                tops.append(const.to(dev, copy=True))
            else:
                t = torch.empty(shape, dtype=torch.float32)
                fill(t, f)
                tops.append(t.to(dev))
        return self._single(tuple(tops))


# ----------------------------------------------------------------------------- Input
@register("Input", "INPUT")
class Input(_DataLayer):
    """Caffe's InputLayer: tops of the given shapes (one shape for all tops, one per top, or
    none) that the caller fills (the Net feeds them; :meth:`feed` stores values here)."""

    min_tops = 1

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        ip = param.input_param
        num_top = len(param.top)
        k = len(ip.shape)
        if k not in (0, 1, num_top):
            self.fail("Check failed: num_shape == 0 || num_shape == 1 || num_shape == num_top "
                      "Must specify 'shape' once, once per top blob, or not at all: %d tops vs. "
                      "%d shapes." % (num_top, k), "input_layer.cpp:14")
        shapes = []
        for i in range(num_top):
            if k == 0:
                shapes.append(())
            else:
                shapes.append(tuple(int(d) for d in ip.shape[0 if k == 1 else i].dim))
        self._top_shapes = shapes
        self._values = [None] * num_top

    def feed(self, *arrays):
        """Values for the tops (numpy or tensors), used by forward until fed again."""
        if len(arrays) != len(self._top_shapes):
            raise CaffeError("Input layer %s has %d tops, %d arrays given"
                             % (self.name, len(self._top_shapes), len(arrays)))
        self._values = [torch.as_tensor(np.asarray(a, dtype=np.float32)) for a in arrays]
        self._top_shapes = [tuple(v.shape) for v in self._values]

    def forward(self):
        dev = self.device
        tops = []
        for shape, v in zip(self._top_shapes, self._values):
            tops.append(torch.zeros(shape, dtype=torch.float32, device=dev) if v is None
                        else v.to(dev, copy=True))
        return self._single(tuple(tops))


# ----------------------------------------------------------------------------- benchmark
def benchmark(source=None, batch_size=64, seconds=2.0, scale=0.00390625, crop_size=0,
              mirror=False, prefetch=4, phase="TRAIN", out=None):
    """Records/s of the Data layer on ``source`` (default: configs/lenet/digits_train_lmdb).

    Prints two figures: the layer's own read+decode+transform rate measured synchronously
    (the CPU cost), and the rate ``forward`` delivers with the prefetch thread. Returns a dict.
    """
    import sys
    import time
    pb2 = _caffe_pb2()
    if source is None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        source = os.path.join(root, "configs", "lenet", "digits_train_lmdb")
    out = out or sys.stdout

    def make(pf):
        lp = pb2.LayerParameter()
        lp.name = "data"
        lp.type = "Data"
        lp.top.extend(["data", "label"])
        lp.data_param.source = source
        lp.data_param.batch_size = batch_size
        lp.data_param.backend = pb2.DataParameter.LMDB
        lp.data_param.prefetch = pf
        lp.transform_param.scale = scale
        if crop_size:
            lp.transform_param.crop_size = crop_size
        if mirror:
            lp.transform_param.mirror = True
        return Data(lp, [], phase)

    results = {}
    min_level = glog._State.min_level
    glog._State.min_level = 1          # no "Opened lmdb" / "Restarting" lines while timing
    try:
        for label, pf in (("synchronous", 0), ("prefetch", prefetch)):
            layer = make(pf)
            layer.forward()
            n, t0 = 0, time.perf_counter()
            while True:
                layer.forward()
                n += 1
                dt = time.perf_counter() - t0
                if dt >= seconds:
                    break
            layer.close()
            results[label] = n * batch_size / dt
            out.write("Data layer %-11s: %10.0f records/s (%8.1f batches/s of %d) on %s\n"
                      % (label, results[label], n / dt, batch_size, source))
    finally:
        glog._State.min_level = min_level
    return results
