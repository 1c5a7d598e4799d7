"""The remaining BVLC layer types: BatchReindex, Filter, the recurrent layers (RNN, LSTM,
LSTMUnit), and explicit refusals of the layers that need a runtime trainer does not have.

* ``BatchReindex`` (batch_reindex_layer.cpp): ``top = bottom0[permut]`` along axis 0; the index
  blob is 1-D, every index must lie in ``[0, N)`` (Caffe's CHECKs, checked on the float values
  before truncation); the gradient is scattered back (indices repeated add up); the index blob
  never gets one.
* ``Filter`` (filter_layer.cpp): K data bottoms and a selector last; the tops keep the items whose
  selector value is non-zero. At set-up the tops have the full batch (Caffe's ``first_reshape_``),
  afterwards as many items as were selected; unselected items get zero gradient, the selector none.
* ``LSTMUnit`` (lstm_unit_layer.cpp): bottoms ``c_prev`` (1xNxD), gate inputs (1xNx4D, order
  i, f, o, g), ``cont`` (1xN); tops ``c`` and ``h``. ``f = cont * sigmoid(.)``,
  ``c = f * c_prev + i * g``, ``h = o * tanh(c)``. Its backward is Caffe's own formulas (for a
  non-binary ``cont`` they differ from the exact derivative, as in Caffe).
* ``RNN`` / ``LSTM`` (recurrent_layer.cpp, rnn_layer.cpp, lstm_layer.cpp): Caffe unrolls them into
  a net of InnerProduct / Scale / Eltwise / TanH / LSTMUnit layers sharing their weights; here the
  same computation is one loop over the T timesteps. Bottoms ``x`` (TxNx...), ``cont`` (TxN),
  optionally ``x_static`` (Nx...), and with ``expose_hidden`` the initial states (``h_0`` /
  ``h_0, c_0``, each 1xNxnum_output); tops the output sequence (``o`` / ``h``, TxNxnum_output)
  and with ``expose_hidden`` the final states. Blobs in the unrolled net's order: RNN
  ``W_xh, b_h, [W_xh_static], W_hh, W_ho, b_o``; LSTM ``W_xc (4D x I), b_c, [W_xc_static],
  W_hc (4D x D)``, all filled by ``recurrent_param``'s ``weight_filler`` / ``bias_filler``.
  ``cont_t`` multiplies the previous state (0 starts a new sequence). Without ``expose_hidden``
  the state at the end of one forward pass is the initial state of the next one (Caffe copies
  ``h_T`` to ``h_0``); gradients never cross batches, and the exposed initial/final states carry
  no gradient (Caffe shares their data, not their diffs). The number of timesteps is fixed at
  set-up; the number of streams may change (the carried state then restarts at zero).

Refused, with a CaffeError naming the layer and the reason (never "Unknown layer type"):
``WindowData`` (R-CNN window files cropped with OpenCV), ``VideoData`` (SSD-Caffe's webcam / video
capture) and ``HDF5Output`` (writes blobs to an HDF5 file). ``Python`` layers are refused by the
Net itself (layers/net.py), since nothing named by a net file is ever imported.
"""
import torch
import torch.nn.functional as F

from converters import glog
from converters.errors import CaffeError
from layers.base import Layer, check_blob_counts, count
from layers.registry import register
from layers.vision import check


def _shape_string(shape):
    return "".join("%d " % d for d in shape) + "(%d)" % count(shape)


def _num(x):
    return glog.format_number(x)


# ================================================================ BatchReindex
@register("BatchReindex")
class BatchReindex(Layer):
    """Caffe's BatchReindexLayer: ``top[i] = bottom0[int(permut[i])]``."""

    exact_bottoms = 2
    exact_tops = 1
    label_bottoms = (1,)

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        self.check_blob_counts(len(bottom_shapes), len(param.top))
        check(self, len(self.bottom_shapes[1]) == 1, "batch_reindex_layer.cpp:11",
              "1 == bottom[1]->num_axes()", values=(1, len(self.bottom_shapes[1])))
        if len(self.bottom_shapes[0]) < 1:
            self.fail("bottom[0] must have at least 1 axis", "batch_reindex_layer.cpp:14")

    def top_shapes(self):
        return [(self.bottom_shapes[1][0],) + tuple(self.bottom_shapes[0][1:])]

    def forward(self, x, permut):
        if not self.shape_inference and permut.numel():
            low, high = float(permut.min()), float(permut.max())
            if low < 0:
                self.fail("Check failed: ridx_data[i] >= 0 (%s vs. 0) Index specified for reindex "
                          "layer was negative." % _num(low), "batch_reindex_layer.cpp:25")
            if high >= x.shape[0]:
                self.fail("Check failed: ridx_data[i] < initial_num (%s vs. %d) Index specified "
                          "for reindex layer was greater than batch size."
                          % (_num(high), x.shape[0]), "batch_reindex_layer.cpp:27")
        return x.index_select(0, permut.detach().reshape(-1).to(torch.long).to(x.device))


# ================================================================ Filter
@register("Filter")
class Filter(Layer):
    """Caffe's FilterLayer: keep the items whose selector (the last bottom) is non-zero."""

    min_bottoms = 2
    min_tops = 1

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        self.check_blob_counts(len(bottom_shapes), len(param.top))
        nb, nt = len(bottom_shapes), len(param.top)
        check(self, nt == nb - 1, "filter_layer.cpp:11", "top.size() == bottom.size() - 1",
              values=(nt, nb - 1))
        sel = self.bottom_shapes[-1]
        if len(sel) < 1:
            self.fail("the selector blob must have at least 1 axis", "filter_layer.cpp:21")
        for i in range(1, len(sel)):
            check(self, sel[i] == 1, "filter_layer.cpp:21", "bottom[selector_index]->shape(i) == 1",
                  "Selector blob dimensions must be singletons (1), except the first",
                  (sel[i], 1))
        for s in self.bottom_shapes[:-1]:
            check(self, len(s) >= 1 and s[0] == sel[0], "filter_layer.cpp:25",
                  "bottom[selector_index]->shape(0) == bottom[i]->shape(0)",
                  "Each bottom should have the same 0th dimension as the selector blob",
                  (sel[0], s[0] if len(s) else 0))
        self.label_bottoms = (nb - 1,)

    def top_shapes(self):
        # Caffe's first Reshape gives the tops the whole batch.
        return [tuple(s) for s in self.bottom_shapes[:-1]]

    def forward(self, *bottoms):
        selector = bottoms[-1].detach().reshape(bottoms[-1].shape[0], -1)[:, 0]
        index = torch.nonzero(selector != 0).reshape(-1).to(bottoms[0].device)
        tops = tuple(b.index_select(0, index) for b in bottoms[:-1])
        return tops[0] if len(tops) == 1 else tops


# ================================================================ LSTMUnit
class _LSTMUnitFunction(torch.autograd.Function):
    """Caffe's LSTMUnitLayer Forward_cpu / Backward_cpu."""

    @staticmethod
    def forward(ctx, c_prev, x, cont):
        d = c_prev.shape[-1]
        i = torch.sigmoid(x[..., :d])
        f = torch.sigmoid(x[..., d:2 * d]) * cont.unsqueeze(-1)
        o = torch.sigmoid(x[..., 2 * d:3 * d])
        g = torch.tanh(x[..., 3 * d:])
        c = f * c_prev + i * g
        tanh_c = torch.tanh(c)
        h = o * tanh_c
        ctx.save_for_backward(c_prev, i, f, o, g, tanh_c)
        return c, h

    @staticmethod
    def backward(ctx, dc, dh):
        c_prev, i, f, o, g, tanh_c = ctx.saved_tensors
        if dc is None:
            dc = torch.zeros_like(c_prev)
        if dh is None:
            dh = torch.zeros_like(c_prev)
        c_term = dc + dh * o * (1 - tanh_c * tanh_c)
        dc_prev = c_term * f
        di = c_term * g * i * (1 - i)
        df = c_term * c_prev * f * (1 - f)
        do = dh * tanh_c * o * (1 - o)
        dg = c_term * i * (1 - g * g)
        return dc_prev, torch.cat([di, df, do, dg], dim=-1), None


def lstm_unit(c_prev, x, cont):
    """(c, h) of one LSTM step with Caffe's gradients; ``cont`` is (1, N)."""
    return _LSTMUnitFunction.apply(c_prev, x, cont.detach().to(x.dtype))


@register("LSTMUnit")
class LSTMUnit(Layer):
    """Caffe's LSTMUnitLayer (one timestep of an LSTM; see the module docstring)."""

    exact_bottoms = 3
    exact_tops = 2
    label_bottoms = (2,)

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        self.check_blob_counts(len(bottom_shapes), len(param.top))
        shapes = self.bottom_shapes
        if len(shapes[0]) < 2:
            self.fail("bottom[0] must have 3 axes (1 x #streams x hidden_dim)",
                      "lstm_unit_layer.cpp:28")
        n = shapes[0][1]
        for i, s in enumerate(shapes):
            want = 2 if i == 2 else 3
            check(self, len(s) == want, "lstm_unit_layer.cpp:%d" % (26 if i == 2 else 28),
                  "%d == bottom[i]->num_axes()" % want, values=(want, len(s)))
            check(self, s[0] == 1, "lstm_unit_layer.cpp:30", "1 == bottom[i]->shape(0)",
                  values=(1, s[0]))
            check(self, s[1] == n, "lstm_unit_layer.cpp:31",
                  "num_instances == bottom[i]->shape(1)", values=(n, s[1]))
        self.hidden_dim = shapes[0][2]
        check(self, shapes[1][2] == 4 * self.hidden_dim, "lstm_unit_layer.cpp:35",
              "4 * hidden_dim_ == bottom[1]->shape(2)", values=(4 * self.hidden_dim, shapes[1][2]))

    def top_shapes(self):
        return [self.bottom_shapes[0], self.bottom_shapes[0]]

    def forward(self, c_prev, x, cont):
        return lstm_unit(c_prev, x, cont)


# ================================================================ RNN / LSTM
class _Recurrent(Layer):
    """Caffe's RecurrentLayer: shared set-up, checks and state carrying of RNN and LSTM."""

    num_recur = 1          # recurrent state blobs (h; LSTM: h, c)
    source_check = ""

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        super().__init__(param, bottom_shapes, phase)
        rp = param.recurrent_param
        self.expose = bool(rp.expose_hidden)
        exposed = self.num_recur if self.expose else 0
        limits = type("Limits", (), dict(
            exact_bottoms=None, min_bottoms=2 + exposed, max_bottoms=3 + exposed,
            exact_tops=1 + exposed, min_tops=None, max_tops=None))
        check_blob_counts(limits, param, len(bottom_shapes), len(param.top))
        shapes = self.bottom_shapes
        x, cont = shapes[0], shapes[1]
        check(self, len(x) >= 2, "recurrent_layer.cpp:16", "bottom[0]->num_axes() >= 2",
              "bottom[0] must have at least 2 axes -- (#timesteps, #streams, ...)", (len(x), 2))
        self.T, self.N = int(x[0]), int(x[1])
        check(self, len(cont) == 2, "recurrent_layer.cpp:23", "bottom[1]->num_axes() == 2",
              "bottom[1] must have exactly 2 axes -- (#timesteps, #streams)", (len(cont), 2))
        check(self, self.T == cont[0], "recurrent_layer.cpp:25", "T_ == bottom[1]->shape(0)",
              values=(self.T, cont[0]))
        check(self, self.N == cont[1], "recurrent_layer.cpp:26", "N_ == bottom[1]->shape(1)",
              values=(self.N, cont[1]))
        self.static = len(shapes) > 2 + exposed
        if self.static:
            s = shapes[2]
            check(self, len(s) >= 1, "recurrent_layer.cpp:46", "bottom[2]->num_axes() >= 1",
                  values=(len(s), 1))
            check(self, s[0] == self.N, "recurrent_layer.cpp:47", "N_ == bottom[2]->shape(0)",
                  values=(self.N, s[0]))
        self.num_output = d = int(rp.num_output)
        check(self, d > 0, self.source_check, "num_output > 0", "num_output must be positive",
              (d, 0))
        state_shape = (1, self.N, d)
        for j in range(exposed):
            i = 2 + int(self.static) + j
            check(self, tuple(shapes[i]) == state_shape, "recurrent_layer.cpp:216",
                  "recur_input_blobs_[j]->shape() == bottom[i]->shape()",
                  "bottom[%d] shape must match hidden state input shape: %s"
                  % (i, _shape_string(state_shape)))
        self.input_dim = count(x, 2)
        self.static_dim = count(shapes[2], 1) if self.static else 0
        self._state = None
        self._param_names = []
        self.make_blobs(rp.weight_filler, rp.bias_filler)

    def add_named_blob(self, name, shape, filler):
        self._param_names.append(name)
        return self.add_blob(shape, filler)

    def extra_log_lines(self):
        lines = [("recurrent_layer.cpp:20", "Initializing recurrent layer: assuming input batch "
                  "contains %d timesteps of %d independent streams." % (self.T, self.N))]
        index = 0
        for name in self._param_names:
            lines.append(("recurrent_layer.cpp:150", "Adding parameter %d: %s" % (index, name)))
            index += 1
        return lines

    def top_shapes(self):
        d = self.num_output
        tops = [(self.T, self.N, d)]
        if self.expose:
            tops += [(1, self.N, d)] * self.num_recur
        return tops

    def reset(self):
        """Caffe's RecurrentLayer::Reset: zero the carried hidden state."""
        self._state = None

    def forward(self, x, cont, *rest):
        if x.dim() < 2 or x.shape[0] != self.T:
            self.fail("Check failed: T_ == bottom[0]->shape(0) (%d vs. %d) input number of "
                      "timesteps changed" % (self.T, x.shape[0] if x.dim() else 0),
                      "recurrent_layer.cpp:187")
        n = x.shape[1]
        if tuple(cont.shape) != (self.T, n):
            self.fail("Check failed: bottom[1] (cont) must be %d x %d, got %s"
                      % (self.T, n, _shape_string(cont.shape)), "recurrent_layer.cpp:191")
        static = rest[0] if self.static else None
        hidden = rest[1:] if self.static else rest
        state_shape = (1, n, self.num_output)
        if self.expose:
            for j, h in enumerate(hidden):
                if tuple(h.shape) != state_shape:
                    self.fail("Check failed: bottom[%d] shape must match hidden state input "
                              "shape: %s" % (2 + int(self.static) + j, _shape_string(state_shape)),
                              "recurrent_layer.cpp:216")
            init = [h.detach() for h in hidden]
        elif (self._state is not None and tuple(self._state[0].shape) == state_shape
              and self._state[0].device == x.device and self._state[0].dtype == x.dtype):
            init = self._state
        else:
            init = [x.new_zeros(state_shape) for _ in range(self.num_recur)]
        cont = cont.detach().to(x.dtype)
        out, finals = self.unroll(x.reshape(self.T, n, -1), cont, static, init)
        finals = [f.detach() for f in finals]
        if not self.expose and not self.shape_inference:
            self._state = finals
        if self.expose:
            return (out,) + tuple(finals)
        return out


@register("RNN")
class RNN(_Recurrent):
    """Caffe's RNNLayer: ``h_t = tanh(W_hh (cont_t h_{t-1}) + W_xh x_t + b_h [+ W_xh_static
    x_static])``, ``o_t = tanh(W_ho h_t + b_o)``; the top is ``o``."""

    source_check = "rnn_layer.cpp:36"

    def make_blobs(self, wf, bf):
        d = self.num_output
        self.w_xh = self.add_named_blob("W_xh", (d, self.input_dim), wf)
        self.b_h = self.add_named_blob("b_h", (d,), bf)
        self.w_xh_static = (self.add_named_blob("W_xh_static", (d, self.static_dim), wf)
                            if self.static else None)
        self.w_hh = self.add_named_blob("W_hh", (d, d), wf)
        self.w_ho = self.add_named_blob("W_ho", (d, d), wf)
        self.b_o = self.add_named_blob("b_o", (d,), bf)

    def unroll(self, x, cont, static, init):
        n = x.shape[1]
        wx = F.linear(x, self.w_xh, self.b_h)
        ws = None
        if static is not None:
            ws = F.linear(static.reshape(n, -1), self.w_xh_static).reshape(1, n, -1)
        h = init[0]
        outs = []
        for t in range(self.T):
            s = F.linear(h * cont[t].reshape(1, n, 1), self.w_hh) + wx[t:t + 1]
            if ws is not None:
                s = s + ws
            h = torch.tanh(s)
            outs.append(torch.tanh(F.linear(h, self.w_ho, self.b_o)))
        return torch.cat(outs, 0), [h]


@register("LSTM")
class LSTM(_Recurrent):
    """Caffe's LSTMLayer: gate inputs ``W_hc (cont_t h_{t-1}) + W_xc x_t + b_c [+ W_xc_static
    x_static]`` into an LSTMUnit per timestep; the top is ``h`` (all timesteps)."""

    num_recur = 2
    source_check = "lstm_layer.cpp:51"

    def make_blobs(self, wf, bf):
        d = self.num_output
        self.w_xc = self.add_named_blob("W_xc", (4 * d, self.input_dim), wf)
        self.b_c = self.add_named_blob("b_c", (4 * d,), bf)
        self.w_xc_static = (self.add_named_blob("W_xc_static", (4 * d, self.static_dim), wf)
                            if self.static else None)
        self.w_hc = self.add_named_blob("W_hc", (4 * d, d), wf)

    def unroll(self, x, cont, static, init):
        n = x.shape[1]
        wx = F.linear(x, self.w_xc, self.b_c)
        ws = None
        if static is not None:
            ws = F.linear(static.reshape(n, -1), self.w_xc_static).reshape(1, n, -1)
        h, c = init
        outs = []
        for t in range(self.T):
            cont_t = cont[t:t + 1]
            gates = F.linear(h * cont_t.reshape(1, n, 1), self.w_hc) + wx[t:t + 1]
            if ws is not None:
                gates = gates + ws
            c, h = lstm_unit(c, gates, cont_t)
            outs.append(h)
        return torch.cat(outs, 0), [h, c]


# ================================================================ refused layer types
class _Refused(Layer):
    """A BVLC / SSD-Caffe layer type trainer knows but does not run: building it is an error
    that names the layer and says why (instead of Caffe's "Unknown layer type")."""

    reason = ""

    def __init__(self, param, bottom_shapes, phase="TRAIN"):
        raise CaffeError("Layer '%s' of type %s is not supported by trainer: %s"
                         % (param.name, param.type, self.reason))


@register("WindowData", "WINDOW_DATA")
class WindowData(_Refused):
    reason = ("it reads an R-CNN window file (window_data_param.source) and crops every window "
              "from its image with OpenCV at each iteration, which trainer does not implement. "
              "Write the crops to an LMDB (Data layer) or an image list (ImageData layer).")


@register("VideoData")
class VideoData(_Refused):
    reason = ("SSD-Caffe's VideoData grabs frames from a webcam or a video file through "
              "OpenCV's VideoCapture (video_data_param), a live source trainer does not "
              "implement. Extract the frames into an LMDB (Data / AnnotatedData) or an image "
              "list (ImageData).")


@register("HDF5Output", "HDF5_OUTPUT")
class HDF5Output(_Refused):
    reason = ("it writes its bottoms to an HDF5 file (hdf5_output_param.file_name) at every "
              "forward pass, which trainer does not implement. Remove the layer and read the "
              "blobs from the Net API instead (net.forward(); net.blobs[name].data).")
