"""Background batch loading for data layers: Caffe's ``BasePrefetchingDataLayer``.

Caffe's data layers read and transform the next ``prefetch`` batches (``data_param.prefetch``,
``PREFETCH_COUNT``, default 4) on an internal thread while the net computes, and ``Forward`` pops
the oldest full batch ("Waiting for data" when there is none yet). :class:`Prefetcher` does the
same with one Python thread per layer: one producer, so the record order (and the order of the
transformer's random draws) is exactly the sequential order, whatever the timing.

A *source* is any object with

* ``next_batch()`` -> a batch (anything; typically a tuple of tensors), called on the producer
  thread only while the thread runs;
* ``get_state()`` / ``set_state(state)`` -> a small picklable position (record index, cursor key,
  RNG state) taken *before* a batch is read, so that a consumer can resume exactly at the next
  batch it has not consumed yet;
* ``open()`` (optional): per-thread setup (e.g. an LMDB read transaction) done on the producer
  thread; ``close()`` (optional): called on the producer thread when it stops.

The thread does not reference the layer, so a layer that goes out of use is collected and its
thread stops (``weakref.finalize``).
"""
import os
import queue
import threading
import weakref

import torch

from converters import glog

# glog's LOG_EVERY_N(INFO, 1000) in BlockingQueue::pop is one counter per call site, shared by
# every queue of the process: the first wait logs, then every 1000th.
_WAIT_LOG = {"count": 0}
_WAIT_LOCK = threading.Lock()


def _log_wait():
    with _WAIT_LOCK:
        n = _WAIT_LOG["count"]
        _WAIT_LOG["count"] = n + 1
    if n % 1000 == 0:
        glog.info("Waiting for data", where="blocking_queue.cpp:49")


def prefetch_disabled():
    """``TRAINER_NO_PREFETCH=1`` reads batches synchronously in forward (debugging aid)."""
    return os.environ.get("TRAINER_NO_PREFETCH", "").lower() in ("1", "true", "yes")


_ERROR = object()


def take(q, thread, name, log_wait=_log_wait):
    """The next item of a prefetch queue. Waits as Caffe's BlockingQueue::pop does (logging the
    wait through ``log_wait``) and fails clearly if the producing thread died."""
    try:
        return q.get_nowait()
    except queue.Empty:
        log_wait()
    while True:
        try:
            return q.get(timeout=1.0)
        except queue.Empty:
            if not thread.is_alive() and q.empty():
                raise RuntimeError("data prefetch thread %s died" % name)
_POLL = 0.05


def _worker(source, q, stop):
    try:
        opener = getattr(source, "open", None)
        if opener is not None:
            opener()
        while not stop.is_set():
            before = source.get_state()
            batch = source.next_batch()
            if getattr(source, "pin_memory", False):   # set by a data layer on CUDA
                batch = tuple(t.pin_memory() if isinstance(t, torch.Tensor) else t
                              for t in batch)
            after = source.get_state()
            item = (before, batch, after)
            while not stop.is_set():
                try:
                    q.put(item, timeout=_POLL)
                    break
                except queue.Full:
                    continue
    except BaseException as exc:  # handed to the consumer, which raises it in forward
        while not stop.is_set():
            try:
                q.put((_ERROR, exc, None), timeout=_POLL)
                break
            except queue.Full:
                continue
    finally:
        closer = getattr(source, "close", None)
        if closer is not None:
            try:
                closer()
            except Exception:  # pragma: no cover - best effort on shutdown
                pass


def _shutdown(stop, q, thread):
    stop.set()
    # Unblock a producer waiting on a full queue.
    try:
        while True:
            q.get_nowait()
    except queue.Empty:
        pass
    if thread is not None and thread.is_alive() and thread is not threading.current_thread():
        thread.join(timeout=30)


class Prefetcher:
    """Up to ``count`` batches of ``source`` read ahead on a background thread.

    ``count`` <= 0 (or ``TRAINER_NO_PREFETCH=1``) reads synchronously in :meth:`get`.
    :attr:`position` is the source state of the next batch :meth:`get` will return.
    """

    def __init__(self, source, count=4, name="prefetch", start=True):
        self.source = source
        self.count = int(count)
        self.name = name
        self.synchronous = self.count <= 0 or prefetch_disabled()
        self._thread = None
        self._queue = None
        self._stop = None
        self._finalizer = None
        self._opened_sync = False
        self.position = source.get_state()
        if start:
            self.start()

    # ------------------------------------------------------------------ thread control
    @property
    def running(self):
        return self._thread is not None and self._thread.is_alive()

    def start(self):
        """Start the producer at :attr:`position` (no-op if running or synchronous)."""
        if self.synchronous or self._thread is not None:
            return
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=max(1, self.count))
        self._thread = threading.Thread(target=_worker, args=(self.source, self._queue, self._stop),
                                        name="%s-%s" % (self.name, id(self)), daemon=True)
        self._finalizer = weakref.finalize(self, _shutdown, self._stop, self._queue, self._thread)
        self._thread.start()

    def stop(self):
        """Stop the producer; batches read ahead are dropped (the position is kept)."""
        if self._finalizer is not None:
            self._finalizer()   # runs _shutdown once
            self._finalizer = None
        self._thread = None
        self._queue = None
        self._stop = None
        if self._opened_sync:
            closer = getattr(self.source, "close", None)
            if closer is not None:
                closer()
            self._opened_sync = False

    close = stop

    def seek(self, state):
        """Continue from ``state`` (a value of :attr:`position` or ``source.get_state()``)."""
        self.stop()
        self.source.set_state(state)
        self.position = self.source.get_state()
        self.start()

    # ------------------------------------------------------------------ consumer side
    def get(self):
        """The next batch in sequence (blocks while the producer is behind)."""
        if self.synchronous:
            if not self._opened_sync:
                opener = getattr(self.source, "open", None)
                if opener is not None:
                    opener()
                self._opened_sync = True
            batch = self.source.next_batch()
            self.position = self.source.get_state()
            return batch
        if self._thread is None:
            self.start()
        item = take(self._queue, self._thread, self.name)
        before, batch, after = item
        if before is _ERROR:
            # Keep raising the same error on later calls (the producer has stopped).
            self._queue.put(item)
            raise batch
        self.position = after
        return batch
