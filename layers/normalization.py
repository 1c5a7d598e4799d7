"""Caffe's normalization layers: BatchNorm, LRN, MVN.

Each reproduces BVLC Caffe's set-up checks, defaults and Forward/Backward formulas
(``batch_norm_layer.cpp``, ``lrn_layer.cpp``, ``mvn_layer.cpp``). BatchNorm keeps Caffe's three
statistic blobs and its moving-average rule (which is not torch's momentum rule), updated in place
without gradients.
"""
import torch
import torch.nn.functional as F

from converters import caffe_pb2, glog
from layers.base import Layer, canonical_axis
from layers.registry import register


def _legacy_dim(layer, shape, index):
    """Caffe's Blob::LegacyShape: at most 4 axes; axes past the end count as 1."""
    if len(shape) > 4:
        layer.fail("Check failed: num_axes() <= 4 (%d vs. 4) Cannot use legacy accessors on "
                   "Blobs with > 4 axes." % len(shape), "blob.hpp:159")
    if index >= len(shape) or index < -len(shape):
        return 1
    return int(shape[index])


@register("BatchNorm")
class BatchNorm(Layer):
    """Caffe BatchNorm (no scale/shift: Caffe pairs it with a Scale layer).

    Blobs, in Caffe's order: running mean sum (C,), running variance sum (C,), moving-average
    factor (1,), all zero-initialised. ``use_global_stats`` defaults to ``phase == TEST``.

    * Without global stats: normalise with the batch mean and biased variance over every axis but
      1, ``y = (x - mean) / sqrt(var + eps)``; then, in place and without gradients,
      ``factor = factor * maf + 1``, ``mean_blob = mean_blob * maf + mean``,
      ``var_blob = var_blob * maf + m / (m - 1) * var`` with ``m = count / C`` (factor 1 when
      ``m == 1``). The update happens even when the blobs have ``lr_mult: 0``.
    * With global stats: ``s = 0 if factor == 0 else 1 / factor``; normalise with
      ``mean_blob * s`` and ``var_blob * s``; diff is ``dy / sqrt(var + eps)``.

    As Caffe's LayerSetUp, the layer appends ``param { lr_mult: 0 }`` for each blob the user gave
    no ParamSpec for, and refuses a non-zero ``lr_mult``. The blobs never receive gradients.
    """
    exact_bottoms = 1
    exact_tops = 1
    no_param_grad = True

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        self.check_blob_counts(len(param.bottom), len(param.top))
        p = param.batch_norm_param
        self.moving_average_fraction = float(p.moving_average_fraction)
        self.use_global_stats = phase == "TEST"
        if p.HasField("use_global_stats"):
            self.use_global_stats = bool(p.use_global_stats)
        shape = self.bottom_shapes[0]
        self.channels = 1 if len(shape) == 1 else int(shape[canonical_axis(1, len(shape), self)])
        self.eps = float(p.eps)
        for _ in range(2):
            self.add_blob((self.channels,))
        self.add_blob((1,))
        for blob in self.blobs:
            blob.requires_grad_(False)
        # Mask the statistics from the solver, exactly as Caffe's LayerSetUp does.
        for i in range(len(self.blobs)):
            if len(self.param.param) == i:
                self.param.param.add().lr_mult = 0.0
            elif self.param.param[i].lr_mult != 0:
                self.fail("Check failed: this->layer_param_.param(i).lr_mult() == 0.f (%s vs. 0) "
                          "Cannot configure batch normalization statistics as layer parameters."
                          % glog.format_number(self.param.param[i].lr_mult),
                          "batch_norm_layer.cpp:44")
        # Caffe's Reshape: bottom[0]->shape(1) must exist and equal channels_.
        canonical_axis(1, len(shape), self)

    def top_shapes(self):
        return [tuple(self.bottom_shapes[0])]

    # (Scale module,) while the Net runs this layer fused with the in-place Scale that follows
    # it (Net._fusable_batchnorm_scale); () otherwise. A tuple: not registered as a submodule.
    fused_scale = ()

    def fusable_with(self, scale):
        """Whether ``scale`` (a Scale layer on this layer's top) can be folded into
        ``F.batch_norm``'s affine: a learned scale (and bias) of one value per channel, axis 1."""
        shape = tuple(self.bottom_shapes[0])
        if len(shape) < 2 or not getattr(scale, "learned", False):
            return False
        per_channel = tuple(self.channels if i == 1 else 1 for i in range(len(shape)))
        blobs = [(scale.scale, scale.view)]
        if scale.bias is not None:
            blobs.append((scale.bias, scale.bias_view))
        return all(tuple(view) == per_channel and blob.numel() == self.channels
                   for blob, view in blobs)

    def forward(self, x):
        if x.dim() < 2 or x.shape[1] != self.channels:
            canonical_axis(1, x.dim(), self)
            self.fail("Check failed: bottom[0]->shape(1) == channels_ (%d vs. %d) "
                      % (x.shape[1], self.channels), "batch_norm_layer.cpp:55")
        if not self.fused_scale:
            return self._normalize(x)
        scale = self.fused_scale[0]
        gamma = scale.scale
        if gamma.dtype != x.dtype:       # autocast: keep the two layers' own arithmetic
            return scale.affine(self._normalize(x))
        beta = scale.bias.reshape(-1) if scale.bias is not None else None
        return self._normalize(x, gamma.reshape(-1), beta, scale)

    def _normalize(self, x, gamma=None, beta=None, scale=None):
        """Caffe's normalisation; with ``gamma`` / ``beta`` (a fused Scale) the affine is done by
        the same batch_norm kernel, forward and backward."""
        if self.use_global_stats:
            mean_blob, var_blob, factor_blob = self._blob_list()
            factor = factor_blob.detach()
            inv = torch.where(factor == 0, torch.zeros_like(factor), 1.0 / factor)
            mean = (mean_blob.detach() * inv).to(x.dtype)
            var = (var_blob.detach() * inv).to(x.dtype)
            return F.batch_norm(x, mean, var, gamma, beta, False, 0.0, self.eps)
        m = x.numel() // self.channels
        update = not self.shape_inference
        if m <= 1:
            y = self._forward_single(x, update)
            return y if scale is None else scale.affine(y)
        if not update:
            return F.batch_norm(x, None, None, gamma, beta, True, 0.0, self.eps)
        # momentum 1 makes torch write the plain batch mean and the unbiased (m / (m - 1)) batch
        # variance into the two scratch buffers (it computes 1 * stat + 0 * old, so the buffers
        # need no clearing); Caffe's moving sums are then updated from them.
        batch_mean, batch_var, one = self._scratch(x)
        y = F.batch_norm(x, batch_mean, batch_var, gamma, beta, True, 1.0, self.eps)
        self._update(batch_mean, batch_var, one)
        return y

    def _blob_list(self):
        """The three blobs (read each call: the Net may swap in shared tensors)."""
        return list(self.blobs._parameters.values())

    def _scratch(self, x):
        """Per device/dtype scratch tensors: batch mean, batch variance, and a constant 1."""
        key = (x.device, x.dtype)
        cache = self.__dict__.setdefault("_scratch_cache", {})
        if key not in cache:
            cache.clear()
            cache[key] = (torch.zeros(self.channels, dtype=x.dtype, device=x.device),
                          torch.zeros(self.channels, dtype=x.dtype, device=x.device),
                          torch.ones(1, dtype=torch.float32, device=x.device))
        return cache[key]

    def _forward_single(self, x, update):
        """One value per channel (m == 1): variance 0, Caffe's bias correction factor 1."""
        dims = [d for d in range(x.dim()) if d != 1]
        mean = x.mean(dim=dims, keepdim=True)
        centered = x - mean
        var = (centered * centered).mean(dim=dims, keepdim=True)
        y = centered / torch.sqrt(var + self.eps)
        if update:
            one = torch.ones(1, dtype=torch.float32, device=x.device)
            self._update(mean.detach().reshape(-1), var.detach().reshape(-1), one)
        return y

    def _update(self, batch_mean, unbiased_var, one):
        """Caffe's moving sums: blob = blob * maf + stat (factor: * maf + 1), in place."""
        blobs = self._blob_list()
        with torch.no_grad():
            if batch_mean.dtype == blobs[0].dtype and one.dtype == blobs[2].dtype:  # 2 launches
                torch._foreach_mul_(blobs, self.moving_average_fraction)
                torch._foreach_add_(blobs, [batch_mean, unbiased_var, one])
            else:
                for blob, stat in zip(blobs, (batch_mean, unbiased_var, one)):
                    blob.mul_(self.moving_average_fraction).add_(stat.to(blob.dtype))


@register("LRN", "LRN")
class LRN(Layer):
    """Caffe LRN (local_size 5, alpha 1, beta 0.75, k 1 by default; local_size must be odd; the
    bottom must have 4 axes).

    * ACROSS_CHANNELS: ``y = x * (k + alpha / n * sum of x^2 over the n channels centred on c,
      zero-padded) ^ -beta``.
    * WITHIN_CHANNEL: Caffe composes it from layers: square, AVE pooling (kernel n, stride 1, pad
      (n - 1) / 2, dividing by the full n*n window, padding included, which with stride 1 never
      reaches past the padded border), Power ``(1 + alpha * avg) ^ -beta`` (``k`` is not used),
      and a product with ``x``. Replicated exactly.
    """
    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        self.check_blob_counts(len(param.bottom), len(param.top))
        p = param.lrn_param
        self.size = int(p.local_size)
        if self.size % 2 != 1:
            self.fail("Check failed: size_ %% 2 == 1 (%d vs. 1) LRN only supports odd values for "
                      "local_size" % (self.size % 2), "lrn_layer.cpp:12")
        self.pre_pad = (self.size - 1) // 2
        self.alpha = float(p.alpha)
        self.beta = float(p.beta)
        self.k = float(p.k)
        self.within = p.norm_region == caffe_pb2.LRNParameter.WITHIN_CHANNEL
        shape = self.bottom_shapes[0]
        if len(shape) != 4:
            self.fail("Check failed: 4 == bottom[0]->num_axes() (4 vs. %d) Input must have 4 "
                      "axes, corresponding to (num, channels, height, width)" % len(shape),
                      "lrn_layer.cpp:71")

    def top_shapes(self):
        return [tuple(self.bottom_shapes[0])]

    def forward(self, x):
        if not self.within:
            return F.local_response_norm(x, self.size, self.alpha, self.beta, self.k)
        avg = F.avg_pool2d(x * x, self.size, stride=1, padding=self.pre_pad,
                           count_include_pad=True)
        return x * torch.pow(avg * self.alpha + 1.0, -self.beta)


class _MVNFunction(torch.autograd.Function):
    """MVN with variance normalisation on a (num, dim) view, with Caffe's Backward:
    ``(dy - mean(dy) - y * mean(dy * y)) / (sqrt(var) + eps)`` (finite even where var is 0)."""

    @staticmethod
    def forward(ctx, x, eps):
        var, mean = torch.var_mean(x, dim=1, correction=0, keepdim=True)
        std = torch.sqrt(var) + eps
        y = (x - mean) / std
        ctx.save_for_backward(y, std)
        return y

    @staticmethod
    def backward(ctx, dy):
        y, std = ctx.saved_tensors
        inner = dy.mean(dim=1, keepdim=True) + y * (dy * y).mean(dim=1, keepdim=True)
        return (dy - inner) / std, None


@register("MVN", "MVN")
class MVN(Layer):
    """Caffe MVN: subtract the mean over each (n, c) plane (over each n with
    ``across_channels``); with ``normalize_variance`` (default true) divide by
    ``sqrt(var) + eps`` (eps 1e-9, added to the standard deviation, not the variance; biased
    variance). Caffe's Backward for the variance case uses ``y`` and ``sqrt(var) + eps`` as saved
    (reproduced by a custom autograd function). Uses Caffe's legacy 4-D accessors, so the top is
    reshaped to (num, channels, height, width) and more than 4 axes are refused."""
    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        self.check_blob_counts(len(param.bottom), len(param.top))
        p = param.mvn_param
        self.normalize_variance = bool(p.normalize_variance)
        self.across_channels = bool(p.across_channels)
        self.eps = float(p.eps)
        shape = self.bottom_shapes[0]
        self.legacy_shape = tuple(_legacy_dim(self, shape, i) for i in range(4))

    def top_shapes(self):
        return [self.legacy_shape]

    def forward(self, x):
        n, c, h, w = self.legacy_shape
        num = n if self.across_channels else n * c
        flat = x.reshape(num, -1)
        if self.normalize_variance:
            y = _MVNFunction.apply(flat, self.eps)
        else:
            y = flat - flat.mean(dim=1, keepdim=True)
        return y.reshape(n, c, h, w)
