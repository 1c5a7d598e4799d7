"""The Layer base class: what every Caffe layer module shares.

A layer is built from its ``LayerParameter`` and the shapes of its bottoms (Caffe's
``LayerSetUp`` + ``Reshape``), creates its learnable blobs in Caffe's order in ``self.blobs``
(``weights`` then ``bias`` and so on, exactly the order a ``.caffemodel`` stores), and computes
its tops from its bottoms in :meth:`forward` with differentiable torch ops. Gradients come from
autograd; what Caffe decides about backward (``lr_mult: 0``, ``propagate_down``, loss roots) is
applied by the Net through ``requires_grad`` and ``detach``, so a layer never has to.
"""
import contextlib

import torch

from converters import glog
from converters.errors import CaffeError


class Layer(torch.nn.Module):
    """Base of every Caffe layer module.

    Class attributes a subclass may set (checked by :meth:`check_blob_counts`, as Caffe's
    ``ExactNumBottomBlobs`` and friends):

    * ``exact_bottoms``, ``min_bottoms``, ``max_bottoms``, ``exact_tops``, ``min_tops``,
      ``max_tops``: ``None`` means no constraint.
    * ``is_loss``: the first top is a loss with default ``loss_weight`` 1 (Caffe's loss layers).
    * ``label_bottoms``: indices of bottoms that never receive a gradient (labels, indices):
      Caffe's ``propagate_down`` for them is refused under ``force_backward``
      (``AllowForceBackward``).
    * ``never_backward``: layers Caffe never back-propagates through (Accuracy, ArgMax, data).
    * ``auto_top_blobs``: Caffe's ``AutoTopBlobs`` (DummyData etc.).
    """

    type_name = None
    exact_bottoms = None
    min_bottoms = None
    max_bottoms = None
    exact_tops = None
    min_tops = None
    max_tops = None
    is_loss = False
    label_bottoms = ()
    never_backward = False
    is_data = False
    no_param_grad = False   # blobs never get diffs (BatchNorm's statistics), even under force_backward

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__()
        self.param = param
        self.name = param.name
        self.phase = phase
        self.bottom_shapes = [tuple(s) for s in bottom_shapes]
        self.blobs = torch.nn.ParameterList()
        # Set by the Net while it infers top shapes: layers with side effects (BatchNorm running
        # statistics, data cursors, RNG draws) must not act on it.
        self.shape_inference = False

    # ----------------------------------------------------------------- helpers for subclasses
    def fail(self, message, where=None):
        """Raise a CaffeError naming this layer (Caffe's CHECK in LayerSetUp); without a
        ``file:line`` tag, the tag is the line that called ``fail``."""
        raise CaffeError("%s (layer %s, type %s)" % (message, self.name, self.param.type),
                         where=where if glog.has_line(where) else glog.caller_tag(1))

    def add_blob(self, shape, filler=None):
        """Create the next learnable blob with ``shape``, filled by a Caffe FillerParameter."""
        from layers.fillers import fill
        tensor = torch.empty(tuple(int(d) for d in shape), dtype=torch.float32)
        try:
            fill(tensor, filler)
        except CaffeError as exc:       # the filler's own check: name the layer
            self.fail(exc.message, exc.where)
        blob = torch.nn.Parameter(tensor)
        self.blobs.append(blob)
        return blob

    # ----------------------------------------------------------------- interface
    def forward(self, *bottoms):  # pragma: no cover - abstract
        raise NotImplementedError

    def top_shapes(self):
        """Shapes of the tops for ``self.bottom_shapes`` (Caffe's Reshape).

        The default runs :meth:`forward` once on zero-filled bottoms without gradients, with
        ``self.shape_inference`` set; layers that cannot (data layers, layers whose output size
        depends on values) override this.
        """
        bottoms = [torch.zeros(s, dtype=torch.float32) for s in self.bottom_shapes]
        with self.inferring(), torch.no_grad():
            tops = self.forward(*bottoms)
        if isinstance(tops, torch.Tensor):
            tops = (tops,)
        return [tuple(t.shape) for t in tops]

    @contextlib.contextmanager
    def inferring(self):
        self.shape_inference = True
        try:
            yield
        finally:
            self.shape_inference = False

    def extra_log_lines(self):
        """Lines Caffe's LayerSetUp prints for this layer (e.g. data_layer.cpp:45 sizes)."""
        return []

    def check_blob_counts(self, num_bottoms, num_tops):
        """Caffe's Layer::CheckBlobCounts, with layer.hpp's messages."""
        check_blob_counts(self, self.param, num_bottoms, num_tops)   # instance limits win

    def allow_force_backward(self, bottom_index):
        return bottom_index not in self.label_bottoms


def check_blob_counts(cls, param, num_bottoms, num_tops):
    """Caffe's CheckBlobCounts for layer class ``cls`` (the Net calls it before building)."""
    t = param.type
    # (wanted, got, Caffe's CHECK expression (wanted on the left, as glog prints it), text, line)
    checks = [
        (cls.exact_bottoms, num_bottoms, "ExactNumBottomBlobs() == bottom.size()",
         "%s Layer takes %s bottom blob(s) as input.", 349),
        (cls.min_bottoms, num_bottoms, "MinBottomBlobs() <= bottom.size()",
         "%s Layer takes at least %s bottom blob(s) as input.", 353),
        (cls.max_bottoms, num_bottoms, "MaxBottomBlobs() >= bottom.size()",
         "%s Layer takes at most %s bottom blob(s) as input.", 357),
        (cls.exact_tops, num_tops, "ExactNumTopBlobs() == top.size()",
         "%s Layer produces %s top blob(s) as output.", 361),
        (cls.min_tops, num_tops, "MinTopBlobs() <= top.size()",
         "%s Layer produces at least %s top blob(s) as output.", 365),
        (cls.max_tops, num_tops, "MaxTopBlobs() >= top.size()",
         "%s Layer produces at most %s top blob(s) as output.", 369),
    ]
    for want, got, expr, text, line in checks:
        if want is None:
            continue
        op = expr.split()[1]
        ok = {"==": got == want, "<=": want <= got, ">=": want >= got}[op]
        if not ok:
            raise CaffeError("Check failed: %s (%d vs. %d) %s (layer %s, type %s)" % (
                expr, want, got, text % (t, want), param.name, t),
                where="layer.hpp:%d" % line)


def canonical_axis(axis, num_axes, layer=None):
    """Caffe's Blob::CanonicalAxisIndex: negative axes count from the end; out of range fails."""
    if not -num_axes <= axis < num_axes:
        msg = "axis %d out of range for %d-D blob" % (axis, num_axes)
        if layer is not None:
            layer.fail(msg, "blob.hpp:141")
        raise CaffeError(msg, where="blob.hpp:141")
    return axis + num_axes if axis < 0 else axis


def count(shape, start=0, end=None):
    """Caffe's Blob::count(start, end): product of dims in [start, end)."""
    n = 1
    for d in tuple(shape)[start:end]:
        n *= int(d)
    return n


def check_top_shape(lp, top, shape):
    """Caffe's Blob::Reshape checks: no negative axis, at most INT_MAX values. The net builder
    calls it for every top; data layers also call it before their loader threads start."""
    for i, d in enumerate(shape):
        if d < 0:
            raise CaffeError("Check failed: shape[i] >= 0 (%d vs. 0) top '%s' of layer '%s' "
                             "(type %s) would have shape %s" % (
                                 d, top, lp.name, lp.type, " ".join(map(str, shape))),
                             where="blob.cpp:26")
    if count(shape) > 2147483647:
        raise CaffeError("Check failed: count_ <= 2147483647 blob size exceeds INT_MAX: top '%s' "
                         "of layer '%s' (type %s) would have shape %s" % (
                             top, lp.name, lp.type, " ".join(map(str, shape))),
                         where="blob.cpp:29")


def to_device_async(host, device):
    """A host tensor on ``device`` without making the host wait for the GPU: on CUDA it is
    pinned (unless it already is) and copied asynchronously; a copy from pageable memory would
    wait for everything queued on the stream before it."""
    if device.type != "cuda":
        return host.to(device)
    if not host.is_pinned():
        host = host.pin_memory()
    return host.to(device, non_blocking=True)
