"""SSD-Caffe's AnnotatedData layer: an LMDB of AnnotatedDatum with SSD's data augmentation.

Tops: ``data`` (N, C, H, W) float32 and, with a second top, ``label``:

* records with an annotation type (``AnnotatedDatum.type``, or ``annotated_data_param.anno_type``
  which shadows it, with Caffe's warning): a (1, 1, num_boxes, 8) blob of rows ``[item_id,
  group_label, instance_id, xmin, ymin, xmax, ymax, difficult]``, ordered by image, then
  annotation group, then annotation; a batch without any box gives one row of -1 (1, 1, 1, 8).
  The shape changes from batch to batch (``top_shapes`` gives Caffe's setup shape: (1, 1,
  max(boxes of the first record, 1), 8), i.e. "1 1 1 8" for a first image with one box).
* records without a type: ``datum.label`` per item, shape (N, 1, 1, 1) as Caffe.

Per item (SSD's ``AnnotatedDataLayer::load_batch``): decode, ``distort_param``,
``expand_param``, ``batch_sampler`` crop, then the transform (``resize_param``,
``noise_param``, ``crop_size``, mirror, mean, scale) with the boxes following every step; see
layers/sampler.py for the details and the facts of SSD-Caffe reproduced there, and
layers/image_ops.py for the OpenCV operations (``cv::resize`` INTER_LINEAR is bit-exact).
The data shape of a batch comes from its first record (before augmentation); every item must
transform to it (``FIT_SMALL_SIZE`` requires ``batch_size: 1``, as Caffe).

Records are read in key order from the first and wrap around (no log line: SSD-Caffe's reader
logs the restart with DLOG). With several solvers (``shard``), solver ``rank`` keeps the
records whose running offset % world_size == rank, as Caffe's DataReader deals them out.

Speed: the per-item work runs in a pool of worker processes (fork; ``TRAINER_DATA_WORKERS``,
default min(4, CPUs); ``TRAINER_DATA_WORKER_TYPE=thread`` for threads; 0 workers: in the
prefetch thread) fed ``data_param.prefetch`` (default 4) batches ahead by a prefetch thread that
also assembles the float batches, so ``forward`` only takes a finished batch. Random draws come
from a generator seeded per item by (layer seed, rank, item number): results do not depend on
worker scheduling, and ``data_state()`` / ``load_data_state()`` resume exactly. The layer seed
is drawn from torch's generator (the solver's ``random_seed``) when the layer is created.

Differences from SSD-Caffe, on purpose: ``label_map_file`` is read and must parse (Caffe only
stores the path); unsupported options (``noise_param.clahe``/``convert_to_lab``, LEVELDB,
``float_data`` records) and situations where Caffe would abort (a sampled box of width 1 + 1
ulp, items of different sizes in a batch) are a clear CaffeError or a warning instead of a
crash; raw (non-encoded) records go through ``resize_param`` / ``noise_param`` like encoded ones
(SSD-Caffe's raw-datum path skips them and then fails its size check unless the sizes already
match). Unlike BVLC's transformer, a ``mean_file`` is subtracted at the output position (SSD's
index), must have the resized image's size, and cannot be combined with ``expand_param``.
"""
import os
import queue
import threading
import weakref

import numpy as np
import torch

from converters import glog
from converters.errors import CaffeError
from layers.data import (LmdbReader, _DataLayer, _key_bytes, _key_str, check_lmdb_data_param,
                         transform_param_of)
from layers.prefetch import take
from layers.registry import register
from layers.sampler import AnnotatedItemTransformer, F32
from layers.transform import read_mean_file, seed_from_torch

BBOX = 0


def _pb2():
    from converters import caffe_pb2
    return caffe_pb2


# ----------------------------------------------------------------------------- label maps
def read_label_map(path):
    """A LabelMap from its text file; a missing or malformed file is a CaffeError."""
    from converters.prototxt import read_text_proto
    if not os.path.exists(path):
        raise CaffeError("Failed to read label map file: %s (no such file)" % path)
    return read_text_proto(path, _pb2().LabelMap())


def map_name_to_label(label_map, strict=False):
    """SSD's MapNameToLabel: name -> label (``strict``: duplicate names are an error)."""
    out = {}
    for item in label_map.item:
        if strict and item.name in out:
            raise CaffeError("There are many duplicates of name: %s" % item.name,
                             where="io.cpp")
        out[item.name] = int(item.label)
    return out


def map_label_to_name(label_map, strict=False, display=False):
    """SSD's MapLabelToName / MapLabelToDisplayName."""
    out = {}
    for item in label_map.item:
        name = item.display_name if display else item.name
        if strict and item.label in out:
            raise CaffeError("There are many duplicates of label: %d" % item.label,
                             where="io.cpp")
        out[int(item.label)] = name
    return out


# ----------------------------------------------------------------------------- workers
_WORKER = {}


def _init_worker(transformer):
    # Ctrl-C / SIGHUP / SIGTERM are the solver's business (stop or snapshot gracefully, then
    # shut the pool down): a worker must not die of them half-way through a batch.
    import signal
    for name in ("SIGINT", "SIGHUP", "SIGTERM"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    _WORKER["t"] = transformer


def _run_item(transformer, value, key, seed):
    try:
        return transformer.process(value, key, seed)
    except CaffeError as exc:          # CaffeError's where/severity do not survive pickling
        return ("__error__", exc.message, exc.where, exc.severity)


def _work(value, key, seed):
    return _run_item(_WORKER["t"], value, key, seed)


def default_workers():
    """(number, kind) of item workers from TRAINER_DATA_WORKERS / TRAINER_DATA_WORKER_TYPE."""
    import multiprocessing
    text = os.environ.get("TRAINER_DATA_WORKERS", "").strip()
    try:
        n = int(text) if text else min(4, os.cpu_count() or 1)
    except ValueError:
        raise CaffeError("TRAINER_DATA_WORKERS must be a number of workers (got %r)" % text)
    kind = os.environ.get("TRAINER_DATA_WORKER_TYPE", "").strip().lower() or "process"
    if kind == "process" and "fork" not in multiprocessing.get_all_start_methods():
        kind = "thread"
    if kind not in ("process", "thread"):
        raise CaffeError("TRAINER_DATA_WORKER_TYPE must be 'process' or 'thread' (got %r)" % kind)
    return max(0, n), kind


def _make_executor(transformer, workers, kind):
    if workers <= 0:
        return None
    import concurrent.futures as cf
    if kind == "thread":
        return cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="annotated-data")
    import multiprocessing
    ctx = multiprocessing.get_context("fork")
    ex = cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                initargs=(transformer,))
    ex.submit(int).result()          # start (fork) the workers now, from this thread
    return ex


# ----------------------------------------------------------------------------- the batch source
_WAIT = {"count": 0}
_WAIT_LOCK = threading.Lock()


def _log_wait():
    # SSD-Caffe's BlockingQueue::pop: LOG_EVERY_N(INFO, 1000) << "Data layer prefetch queue empty"
    with _WAIT_LOCK:
        n = _WAIT["count"]
        _WAIT["count"] = n + 1
    if n % 1000 == 0:
        glog.info("Data layer prefetch queue empty", where="blocking_queue.cpp:50")


class _Cursor:
    """Sequential reading of an LMDB in key order with wrap-around (in one thread)."""

    def __init__(self, reader):
        self.reader = reader
        self.txn = None
        self.cur = None

    def open(self, index, key):
        self.close()
        self.txn = self.reader.env.begin(buffers=False)
        cur = self.txn.cursor()
        placed = key is not None and cur.set_key(_key_bytes(key))
        if not placed:
            cur.first()
            for _ in range(index):
                if not cur.next():
                    cur.first()
        self.cur = cur

    def close(self):
        if self.txn is not None:
            try:
                self.txn.abort()
            except Exception:  # pragma: no cover
                pass
        self.txn = None
        self.cur = None


class _Reading:
    """What the prefetch thread needs to make batches (no reference to the layer nor to
    :class:`AnnotatedBatches`, so that dropping the layer stops the thread at once)."""

    def __init__(self, reader, batch_size, transformer, assemble, executor, kind, rank,
                 world_size, skip_allowed):
        self.reader = reader
        self.batch_size = batch_size
        self.transformer = transformer
        self.assemble = assemble
        self.executor, self.kind = executor, kind
        self.rank, self.world_size, self.skip_allowed = rank, world_size, skip_allowed

    def advance(self, cursor, st):
        if cursor.cur.next():
            st["index"] += 1
        else:
            cursor.cur.first()
            st["index"] = 0
        st["key"] = _key_str(cursor.cur.key())
        st["offset"] += 1

    def read_batch(self, cursor, st):
        """The next batch's records and item seeds; advances ``st``."""
        if st["key"] is None:
            st["key"] = _key_str(cursor.cur.key())
        out = []
        for _ in range(self.batch_size):
            while (self.skip_allowed and self.world_size > 1
                   and st["offset"] % self.world_size != self.rank):
                self.advance(cursor, st)
            key = cursor.cur.key()
            out.append((_key_str(key), cursor.cur.value(),
                        (st["seed"], self.rank, st["item"])))
            st["item"] += 1
            self.advance(cursor, st)
        return out

    def submit(self, records):
        what = self.reader.what
        if self.executor is None:
            return [("now", k, v, s) for k, v, s in records]
        if self.kind == "thread":
            return [self.executor.submit(_run_item, self.transformer, v, what(k), s)
                    for k, v, s in records]
        return [self.executor.submit(_work, v, what(k), s) for k, v, s in records]

    def collect(self, pending):
        results = []
        for p in pending:
            if isinstance(p, tuple):
                r = _run_item(self.transformer, p[2], self.reader.what(p[1]), p[3])
            else:
                r = p.result()
            if isinstance(r, tuple) and r and r[0] == "__error__":
                raise CaffeError(r[1], where=r[2], severity=r[3])
            results.append(r)
        return results

    def batch(self, cursor, st):
        return self.assemble(self.collect(self.submit(self.read_batch(cursor, st))))


def _producer(ctx, state, stop, q, depth):
    """The prefetch thread: keeps ``depth`` batches submitted to the workers, assembles the
    oldest and queues it (with the positions before and after it)."""
    import collections
    cursor = _Cursor(ctx.reader)
    inflight = collections.deque()
    try:
        st = dict(state)
        cursor.open(st["index"], st["key"])
        while not stop.is_set():
            while len(inflight) < depth:
                before = dict(st)
                pending = ctx.submit(ctx.read_batch(cursor, st))
                inflight.append((before, pending, dict(st)))
            before, pending, after = inflight.popleft()
            item = (before, ctx.assemble(ctx.collect(pending)), after)
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.05)
                    break
                except queue.Full:
                    continue
    except BaseException as exc:  # handed to forward
        while not stop.is_set():
            try:
                q.put(("__error__", exc, None), timeout=0.05)
                break
            except queue.Full:
                continue
    finally:
        for _, pending, _ in inflight:
            for p in pending:
                if not isinstance(p, tuple):
                    p.cancel()
        cursor.close()


class AnnotatedBatches:
    """Batches of the layer: reads records, runs the item pipeline (in workers), assembles.

    ``position`` is the state of the next batch :meth:`get` returns: {"index", "key",
    "offset", "item", "seed"}. The prefetch thread holds no reference to this object: when it
    is dropped (with its layer) the thread is stopped and joined and the LMDB released.
    """

    def __init__(self, reader, batch_size, transformer, assemble, seed, prefetch, workers,
                 kind, rank=0, world_size=1, skip_allowed=True, name="annotated_data"):
        self.reader = reader
        self.batch_size = batch_size
        self.transformer = transformer
        self.assemble = assemble
        self.rank, self.world_size, self.skip_allowed = rank, world_size, skip_allowed
        self.prefetch = int(prefetch)
        self.name = name
        self.synchronous = self.prefetch <= 0 or os.environ.get(
            "TRAINER_NO_PREFETCH", "").lower() in ("1", "true", "yes")
        self.workers, self.kind = workers, kind
        self.executor = _make_executor(transformer, workers, kind)
        self.position = {"index": 0, "key": None, "offset": 0, "item": 0, "seed": int(seed)}
        self._thread = None
        self._stop = None
        self._queue = None
        self._sync_cursor = None
        self._finalizer = weakref.finalize(self, AnnotatedBatches._shutdown_all,
                                           [None], self.executor)

    def _reading(self):
        return _Reading(self.reader, self.batch_size, self.transformer, self.assemble,
                        self.executor, self.kind, self.rank, self.world_size,
                        self.skip_allowed)

    def start(self):
        if self.synchronous or self._thread is not None:
            return
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=max(1, self.prefetch))
        self._thread = threading.Thread(
            target=_producer,
            args=(self._reading(), dict(self.position), self._stop, self._queue,
                  max(1, self.prefetch)),
            name="prefetch-%s" % self.name, daemon=True)
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, AnnotatedBatches._shutdown_all,
                                           [(self._stop, self._queue, self._thread)],
                                           self.executor)
        self._thread.start()

    @staticmethod
    def _stop_thread(entry):
        if entry is None:
            return
        stop, q, thread = entry
        stop.set()
        try:
            while True:
                q.get_nowait()
        except queue.Empty:
            pass
        if thread.is_alive() and thread is not threading.current_thread():
            thread.join(timeout=30)

    @staticmethod
    def _shutdown_all(threads, executor):
        for entry in threads:
            AnnotatedBatches._stop_thread(entry)
        if executor is not None:
            # Not on this thread: the finalizer can run from a garbage collection that starts
            # inside executor.submit on a producer thread, which holds the executor's
            # (non-reentrant) shutdown lock; shutting down here would wait on it forever.
            def shut():
                try:
                    executor.shutdown(wait=False, cancel_futures=True)
                except Exception:  # pragma: no cover
                    pass
            try:
                threading.Thread(target=shut, name="annotated-data-shutdown",
                                 daemon=True).start()
            except RuntimeError:        # interpreter shutdown: no new threads, no producers
                shut()

    def stop(self):
        """Stop the prefetch thread (read-ahead batches are dropped; the position is kept)."""
        if self._thread is not None:
            AnnotatedBatches._stop_thread((self._stop, self._queue, self._thread))
        self._thread = self._stop = self._queue = None
        if self._sync_cursor is not None:
            self._sync_cursor.close()
            self._sync_cursor = None

    def close(self):
        self.stop()
        self._finalizer()

    def seek(self, state):
        self.stop()
        st = dict(self.position)
        st.update({k: state[k] for k in ("index", "key", "offset", "item", "seed") if k in state})
        st["index"] = int(st["index"]) % self.reader.entries
        st["offset"], st["item"], st["seed"] = int(st["offset"]), int(st["item"]), int(st["seed"])
        self.position = st
        self.start()

    # ------------------------------------------------------------------ consumer side
    def get(self):
        if self.synchronous:
            if self._sync_cursor is None:
                self._sync_cursor = _Cursor(self.reader)
                self._sync_cursor.open(self.position["index"], self.position["key"])
            st = dict(self.position)
            batch = self._reading().batch(self._sync_cursor, st)
            self.position = st
            return batch
        if self._thread is None:
            self.start()
        item = take(self._queue, self._thread, self.name, _log_wait)
        before, batch, after = item
        if isinstance(before, str) and before == "__error__":
            self._queue.put(item)
            raise batch
        self.position = after
        return batch


# ----------------------------------------------------------------------------- the layer
@register("AnnotatedData")           # SSD-Caffe has no V1 enum name for it
class AnnotatedData(_DataLayer):
    """SSD-Caffe's AnnotatedDataLayer (see the module docstring)."""

    min_tops = 1
    max_tops = 2

    def __init__(self, param, bottom_shapes, phase="TRAIN", rank=0, world_size=1,
                 workers=None, worker_type=None):
        super().__init__(param, bottom_shapes, phase)
        pb2 = _pb2()
        dp = param.data_param
        ap = param.annotated_data_param
        source, self.batch_size = check_lmdb_data_param(self, dp, "annotated_data.py")
        self.output_labels = len(param.top) > 1
        tp = transform_param_of(param, dp)
        if tp.HasField("resize_param") and \
                tp.resize_param.resize_mode == pb2.ResizeParameter.FIT_SMALL_SIZE and \
                self.batch_size != 1:
            self.fail("Check failed: batch_size == 1 (%d vs. 1) Only support batch size of 1 "
                      "for FIT_SMALL_SIZE." % self.batch_size, "annotated_data_layer.cpp")
        if tp.HasField("mean_file") and len(tp.mean_value):
            self.fail("Check failed: param_.mean_value_size() == 0 (%d vs. 0) Cannot specify "
                      "mean_file and mean_value at the same time" % len(tp.mean_value),
                      "data_transformer.cpp:21")
        self.label_map = None
        if ap.label_map_file:
            try:
                self.label_map = read_label_map(ap.label_map_file)
            except CaffeError as exc:
                self.fail("label_map_file: %s" % exc.message)
        phase_name = {0: "TRAIN", 1: "TEST"}.get(self.phase, self.phase)
        try:
            self.item_transformer = AnnotatedItemTransformer(tp, ap, phase_name)
        except CaffeError as exc:
            self.fail(exc.message, exc.where)
        self.scale = F32(tp.scale)
        self.mean_values = np.asarray(list(tp.mean_value), dtype=F32) if len(tp.mean_value) \
            else None
        self.mean = None
        self.mean_file = tp.mean_file if tp.HasField("mean_file") else None
        if tp.HasField("mean_file"):
            self._log_lines.append(("data_transformer.cpp:25",
                                    "Loading mean file from: %s" % tp.mean_file))
            mean = read_mean_file(tp.mean_file)
            mean = mean.reshape(mean.shape[-3:]) if mean.ndim >= 3 else mean[None]
            self.mean = np.ascontiguousarray(mean, dtype=F32)
            self.item_transformer.mean = self.mean
        self.source_path = source
        self.reader = LmdbReader(source, self.name)
        glog.info("Opened lmdb %s" % source, where="db_lmdb.cpp:35")
        try:
            self._setup(pb2, ap, dp, rank, world_size, workers, worker_type, phase_name)
        except BaseException:
            self.reader.close()
            raise

    def _setup(self, pb2, ap, dp, rank, world_size, workers, worker_type, phase_name):
        # The first record sets the top shapes (DataLayerSetUp).
        key, value = self.reader.first()
        what = self.reader.what(key)
        first = pb2.AnnotatedDatum()
        try:
            first.ParseFromString(value)
        except Exception as exc:
            self.fail("Corrupt record: %s is not an AnnotatedDatum (%s)" % (what, exc))
        c, h, w = self._datum_shape(first.datum, what)
        self._check_channels(c)
        data_shape = (self.batch_size,) + self.item_transformer.output_shape(c, h, w)
        self._log_lines.append(("annotated_data_layer.cpp:62",
                                "output data size: %s" % ",".join(str(d) for d in data_shape)))
        self.has_anno_type = first.HasField("type") or ap.HasField("anno_type")
        self.anno_type = int(first.type)
        if ap.HasField("anno_type"):
            glog.warning("type stored in AnnotatedDatum is shadowed.",
                         where="annotated_data_layer.cpp")
            self.anno_type = int(ap.anno_type)
        if self.anno_type != BBOX:
            self.fail("Unknown annotation type.", "annotated_data_layer.cpp")
        self.item_transformer.use_annotations = self.output_labels and self.has_anno_type
        shapes = [data_shape]
        if self.output_labels:
            if self.has_anno_type:
                n = sum(len(g.annotation) for g in first.annotation_group)
                shapes.append((1, 1, max(n, 1), 8))
            else:
                shapes.append((self.batch_size, 1, 1, 1))
        self._top_shapes = shapes
        self._check_top_shapes()
        self._noted = set()
        if workers is None or worker_type is None:
            dw, dk = default_workers()
            workers = dw if workers is None else workers
            worker_type = dk if worker_type is None else worker_type
        seed = seed_from_torch()
        self._initial = None
        self.batches = AnnotatedBatches(
            self.reader, self.batch_size, self.item_transformer, self._assembler(), seed,
            dp.prefetch, workers, worker_type, rank, world_size,
            skip_allowed=(phase_name == "TRAIN"), name="annotated-data-" + self.name)
        self._initial = dict(self.batches.position)
        self.batches.start()

    # ------------------------------------------------------------------ setup helpers
    def _datum_shape(self, datum, what):
        if datum.encoded:
            from layers.image_ops import decode
            img = decode(datum.data, color=self.item_transformer.color, key=what)
            return img.shape[2], img.shape[0], img.shape[1]
        if datum.channels <= 0 or datum.height <= 0 or datum.width <= 0:
            self.fail("%s has no valid size (channels %d, height %d, width %d)"
                      % (what, datum.channels, datum.height, datum.width),
                      "data_transformer.cpp")
        return datum.channels, datum.height, datum.width

    def _check_channels(self, c):
        mv = self.mean_values
        if mv is not None and len(mv) not in (1, c):
            self.fail("Check failed: mean_values_.size() == 1 || mean_values_.size() == "
                      "datum_channels Specify either 1 mean_value or as many as channels: %d"
                      % c)
        if self.mean is not None and self.mean.shape[0] != c:
            mc = self.mean.shape[0]
            self.fail("Check failed: img_channels == data_mean_.channels() (%d vs. %d) the "
                      "mean_file %s has %d channels" % (c, mc, self.mean_file, mc))

    def _assembler(self):
        """The function the prefetch thread applies to a batch's item results (no reference to
        the layer itself, so that the thread does not keep the layer alive)."""
        return _Assembler(self.name, self.batch_size, self.item_transformer, self.scale,
                          self.mean_values, self.mean, self.output_labels, self.has_anno_type,
                          self._noted)

    # ------------------------------------------------------------------ forward
    def forward(self):
        if self.shape_inference:
            return self._single(self._zeros())
        tops = self.batches.get()
        return self._single(self._to_device(tops[:1 + int(self.output_labels)]))

    # ------------------------------------------------------------------ position API
    def data_state(self):
        return dict(self.batches.position)

    def load_data_state(self, state):
        if state is not None:
            self.batches.seek(state)

    def reset(self):
        self.batches.seek(self._initial)

    def shard(self, rank, world_size):
        """Caffe's multi-solver reading: in TRAIN, rank keeps records offset % world == rank."""
        self.batches.stop()
        self.batches.rank, self.batches.world_size = int(rank), int(world_size)
        self.batches.seek(self.batches.position)

    def close(self):
        self.batches.close()
        self.reader.close()


class _Assembler:
    """Turns the item results of one batch into the tops (runs in the prefetch thread)."""

    def __init__(self, name, batch_size, transformer, scale, mean_values, mean, output_labels,
                 has_anno_type, noted):
        self.name = name
        self.batch_size = batch_size
        self.transformer = transformer
        self.scale = scale
        self.mean_values = mean_values
        self.mean = mean
        self.output_labels = output_labels
        self.has_anno_type = has_anno_type
        self.noted = noted

    def _notes(self, results):
        for r in results:
            for severity, where, text, key in r.notes:
                if key in self.noted:
                    continue
                self.noted.add(key)
                glog.log(severity, text, where=where)

    def __call__(self, results):
        self._notes(results)
        # Caffe shapes the batch from its first record (before augmentation) and checks every
        # item against it; FIT_SMALL_SIZE (batch_size 1) takes the item's own shape.
        rc = self.transformer.resize
        fit_small = rc is not None and rc.mode == 2
        shape = results[0].image.shape if fit_small else tuple(results[0].batch_shape)
        for i, r in enumerate(results):
            if r.image.shape != shape:
                raise CaffeError(
                    "Check failed: std::equal(top_shape.begin() + 1, top_shape.begin() + 4, "
                    "shape.begin() + 1): item %d of a batch of layer %s transforms to %s but "
                    "the batch (from its first record) is %s. batch_sampler and expand_param "
                    "change the image size: set transform_param.resize_param (WARP) or "
                    "crop_size so that every item has one size"
                    % (i, self.name, "x".join(map(str, r.image.shape)),
                       "x".join(map(str, shape))), where="annotated_data_layer.cpp")
        n = len(results)
        data = np.empty((n,) + shape, dtype=F32)
        np.stack([r.image for r in results], out=data, casting="unsafe")
        if self.mean is not None:
            c, hh, ww = shape
            for i, r in enumerate(results):
                rh, rw = r.resized_hw
                if self.mean.shape[1:] != (rh, rw):
                    raise CaffeError("Check failed: the mean file is %dx%d but the (resized) "
                                     "image is %dx%d (layer %s)"
                                     % (self.mean.shape[1], self.mean.shape[2], rh, rw,
                                        self.name), where="data_transformer.cpp")
                ho, wo = r.crop
                data[i] -= self.mean[:, ho:ho + hh, wo:wo + ww]
        elif self.mean_values is not None:
            mv = self.mean_values
            data -= mv[0] if len(mv) == 1 else mv[None, :, None, None]
        if self.scale != F32(1):
            data *= self.scale
        tops = [torch.from_numpy(data)]
        if self.output_labels:
            if self.has_anno_type:
                rows = [r.anno.rows(i) for i, r in enumerate(results) if len(r.anno)]
                if rows:
                    lab = np.concatenate(rows, axis=0)[None, None]
                else:
                    lab = np.full((1, 1, 1, 8), -1, dtype=F32)
            else:
                lab = np.asarray([r.label for r in results], dtype=F32).reshape(n, 1, 1, 1)
            tops.append(torch.from_numpy(np.ascontiguousarray(lab, dtype=F32)))
        return tuple(tops)


# ----------------------------------------------------------------------------- benchmark
def make_synthetic_lmdb(path, count=64, width=500, height=375, seed=0, encode="jpg"):
    """An LMDB of ``count`` AnnotatedDatum records (random images with 1-4 boxes) for
    benchmarks and tests. Returns ``path``."""
    import lmdb
    from converters.datum import make_annotated_datum, make_datum
    rng = np.random.default_rng(seed)
    env = lmdb.open(path, map_size=1 << 31, lock=False)
    with env.begin(write=True) as txn:
        for i in range(count):
            img = rng.integers(0, 256, (3, height // 8 + 1, width // 8 + 1), dtype=np.uint8)
            img = np.repeat(np.repeat(img, 8, axis=1), 8, axis=2)[:, :height, :width]
            groups = {}
            for _ in range(int(rng.integers(1, 5))):
                x0, y0 = rng.uniform(0, 0.7, 2)
                bw, bh = rng.uniform(0.1, 0.3, 2)
                label = int(rng.integers(1, 4))
                groups.setdefault(label, []).append(
                    {"instance_id": len(groups.get(label, [])), "xmin": x0, "ymin": y0,
                     "xmax": x0 + bw, "ymax": y0 + bh, "difficult": False})
            anno = make_annotated_datum(make_datum(img, -1, encode),
                                        [{"group_label": k, "annotations": v}
                                         for k, v in sorted(groups.items())])
            txn.put(("%08d_img%d.%s" % (i, i, encode)).encode(), anno.SerializeToString())
    env.close()
    return path


SSD300_AUGMENTATION = """
  transform_param {
    mirror: true mean_value: 104 mean_value: 117 mean_value: 123
    resize_param { prob: 1 resize_mode: WARP height: %(size)d width: %(size)d
      interp_mode: LINEAR interp_mode: AREA interp_mode: NEAREST interp_mode: CUBIC
      interp_mode: LANCZOS4 }
    emit_constraint { emit_type: CENTER }
    distort_param { brightness_prob: 0.5 brightness_delta: 32 contrast_prob: 0.5
      contrast_lower: 0.5 contrast_upper: 1.5 hue_prob: 0.5 hue_delta: 18
      saturation_prob: 0.5 saturation_lower: 0.5 saturation_upper: 1.5 random_order_prob: 0 }
    expand_param { prob: 0.5 max_expand_ratio: 4 }
  }
  annotated_data_param {
    batch_sampler { sampler { } max_sample: 1 max_trials: 1 }
    %(samplers)s
  }
"""


def ssd300_layer_text(source, batch_size=32, size=300, prefetch=4):
    """The LayerParameter text of SSD300's training data layer (examples/ssd/ssd_pascal.py)."""
    samplers = []
    for c in ("min_jaccard_overlap: 0.1", "min_jaccard_overlap: 0.3",
              "min_jaccard_overlap: 0.5", "min_jaccard_overlap: 0.7",
              "min_jaccard_overlap: 0.9", "max_jaccard_overlap: 1.0"):
        samplers.append("batch_sampler { sampler { min_scale: 0.3 max_scale: 1.0 "
                        "min_aspect_ratio: 0.5 max_aspect_ratio: 2.0 } sample_constraint { %s } "
                        "max_sample: 1 max_trials: 50 }" % c)
    return ('name: "data" type: "AnnotatedData" top: "data" top: "label" '
            'data_param { source: "%s" batch_size: %d backend: LMDB prefetch: %d }'
            % (source, batch_size, prefetch)
            + SSD300_AUGMENTATION % {"size": size, "samplers": "\n    ".join(samplers)})


def benchmark(source=None, batch_size=32, seconds=3.0, size=300, workers=None,
              worker_type=None, count=64, out=None):
    """Images/s of AnnotatedData with SSD300's augmentation on ``source`` (default: a synthetic
    LMDB of ``count`` VOC-sized 500x375 JPEGs in a temporary directory).

    Prints and returns {"per_item_cpu": images/s of the item pipeline on one core,
    "forward": images/s that forward() delivers with the prefetch workers, "workers": n,
    "worker_type": kind}.
    """
    import shutil
    import sys
    import tempfile
    import time
    from converters.prototxt import parse_text
    out = out or sys.stdout
    tmp = None
    if source is None:
        tmp = tempfile.mkdtemp(prefix="annotated_bench_")
        source = make_synthetic_lmdb(os.path.join(tmp, "lmdb"), count=count)
    min_level = glog._State.min_level
    glog._State.min_level = 1
    try:
        lp = parse_text(ssd300_layer_text(source, batch_size, size), _pb2().LayerParameter())
        if workers is None or worker_type is None:
            dw, dk = default_workers()
            workers = dw if workers is None else workers
            worker_type = dk if worker_type is None else worker_type
        # The item pipeline alone (one core).
        layer = AnnotatedData(lp, [], "TRAIN", workers=0, worker_type="thread")
        layer.batches.stop()
        t = layer.item_transformer
        with layer.reader.env.begin(buffers=False) as txn:
            records = [(k, v) for k, v in txn.cursor()]
        layer.close()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 2:
            k, v = records[n % len(records)]
            t.process(v, k, (1, 0, n))
            n += 1
        per_item = n / (time.perf_counter() - t0)
        layer = AnnotatedData(lp, [], "TRAIN", workers=workers, worker_type=worker_type)
        layer.forward()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            layer.forward()
            n += 1
        rate = n * batch_size / (time.perf_counter() - t0)
        layer.close()
    finally:
        glog._State.min_level = min_level
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    out.write("AnnotatedData (SSD%d augmentation) item pipeline: %8.1f images/s on one core\n"
              % (size, per_item))
    out.write("AnnotatedData forward with %d %s worker(s): %8.1f images/s (batch %d)\n"
              % (workers, worker_type, rate, batch_size))
    return {"per_item_cpu": per_item, "forward": rate, "workers": workers,
            "worker_type": worker_type}
