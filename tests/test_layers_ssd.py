"""Unit tests of the SSD layers (layers/ssd.py) and box arithmetic (layers/bbox_util.py).

Hand-made cases for PriorBox counts and order, encode/decode, matching, NMS and AP; an
independent loop-by-loop transcription of SSD-Caffe's MultiBoxLoss (forward and Caffe's Backward
formulas) checks the vectorised layer over the configurations the refs do not cover.
"""
import math

import numpy as np
import pytest
import torch

from converters import caffe_pb2
from converters.errors import CaffeError
from layers import bbox_util as bu
from layers import registry


def make(type_name, shapes, phase="TRAIN", **fields):
    """A layer of ``type_name`` from a LayerParameter built with ``fields`` (sub-messages as
    dicts, repeated fields as lists)."""
    lp = caffe_pb2.LayerParameter(name="L", type=type_name)
    for key, value in fields.items():
        _set(lp, key, value)
    return registry.get(type_name)(lp, shapes, phase)


def _set(msg, key, value):
    if isinstance(value, dict):
        sub = getattr(msg, key)
        for k, v in value.items():
            _set(sub, k, v)
    elif isinstance(value, list):
        field = getattr(msg, key)
        for v in value:
            if isinstance(v, dict):
                item = field.add()
                for k, vv in v.items():
                    _set(item, k, vv)
            else:
                field.append(v)
    else:
        setattr(msg, key, value)


# ============================================================================ PriorBox
@pytest.mark.parametrize("ratio", [0.0, -2.0])
def test_priorbox_refuses_an_aspect_ratio_that_is_not_positive(ratio):
    """SSD-Caffe divides by it and takes its square root: NaN priors, trained on silently."""
    with pytest.raises(CaffeError, match="aspect_ratio must be positive"):
        make("PriorBox", [(1, 4, 2, 3), (1, 3, 30, 60)],
             prior_box_param={"min_size": [10.0], "aspect_ratio": [ratio], "flip": True})


def test_priorbox_count_and_order():
    layer = make("PriorBox", [(1, 4, 2, 3), (1, 3, 30, 60)],
                 prior_box_param={"min_size": [10.0], "max_size": [20.0],
                                  "aspect_ratio": [2.0, 2.0, 0.5, 3.0], "flip": True,
                                  "variance": [0.1, 0.1, 0.2, 0.2]})
    # ratios: 1, 2, 1/2, 3, 1/3 (the repeated 2 and the 0.5 already present are dropped)
    assert layer.aspect_ratios == pytest.approx([1, 2, 0.5, 3, 1 / 3.0])
    assert layer.num_priors == 6
    out = layer(torch.zeros(1, 4, 2, 3), torch.zeros(1, 3, 30, 60)).numpy()
    assert out.shape == (1, 2, 2 * 3 * 6 * 4)
    boxes = out[0, 0].reshape(2, 3, 6, 4)
    # step defaults to image / map: 20 in x, 15 in y; first cell centre (10, 7.5).
    w = (boxes[0, 0, :, 2] - boxes[0, 0, :, 0]) * 60
    h = (boxes[0, 0, :, 3] - boxes[0, 0, :, 1]) * 30
    root2, root3 = math.sqrt(2), math.sqrt(3)
    assert w == pytest.approx([10, math.sqrt(200), 10 * root2, 10 / root2, 10 * root3, 10 / root3],
                              rel=1e-5)
    assert h == pytest.approx([10, math.sqrt(200), 10 / root2, 10 * root2, 10 / root3, 10 * root3],
                              rel=1e-5)
    cx = (boxes[..., 0] + boxes[..., 2]) / 2 * 60
    cy = (boxes[..., 1] + boxes[..., 3]) / 2 * 30
    assert cx[1, 2] == pytest.approx([50] * 6, rel=1e-5)
    assert cy[1, 2] == pytest.approx([22.5] * 6, rel=1e-5)
    var = out[0, 1].reshape(-1, 4)
    assert np.allclose(var, [0.1, 0.1, 0.2, 0.2])


def test_priorbox_integer_sizes_clip_single_variance_offset():
    layer = make("PriorBox", [(1, 1, 1, 1), (1, 1, 100, 100)],
                 prior_box_param={"min_size": [25.6], "max_size": [48.9], "clip": True,
                                  "variance": [0.3], "img_size": 100, "step": 100.0,
                                  "offset": 0.0})
    out = layer(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 100, 100)).numpy()
    boxes = out[0, 0].reshape(-1, 4) * 100
    # centre (0, 0); min 25 (int), second sqrt(25 * 48) (ints); clipped at 0.
    assert boxes[0] == pytest.approx([0, 0, 12.5, 12.5])
    half = math.sqrt(25 * 48) / 2
    assert boxes[1] == pytest.approx([0, 0, half, half], rel=1e-5)
    assert np.all(out[0, 1] == np.float32(0.3))


def test_priorbox_img_hw_step_hw_and_multiple_min_sizes():
    layer = make("PriorBox", [(1, 1, 2, 2), (1, 1, 7, 7)],
                 prior_box_param={"min_size": [4.0, 8.0], "aspect_ratio": [2.0], "flip": False,
                                  "img_h": 20, "img_w": 40, "step_h": 10.0, "step_w": 20.0})
    assert layer.num_priors == 4          # (1, 2) per min size
    out = layer(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 7, 7)).numpy()[0, 0].reshape(2, 2, 4, 4)
    centre = ((out[1, 1, 0, 0] + out[1, 1, 0, 2]) / 2 * 40,
              (out[1, 1, 0, 1] + out[1, 1, 0, 3]) / 2 * 20)
    assert centre == pytest.approx((30, 15))
    widths = (out[0, 0, :, 2] - out[0, 0, :, 0]) * 40
    assert widths == pytest.approx([4, 4 * math.sqrt(2), 8, 8 * math.sqrt(2)], rel=1e-5)


@pytest.mark.parametrize("fields,message", [
    ({}, "must provide min_size"),
    ({"min_size": [10.0], "max_size": [5.0]}, "max_size must be greater than min_size"),
    ({"min_size": [10.0, 12.0], "max_size": [20.0]}, "max_size_size"),
    ({"min_size": [10.0], "variance": [0.1, 0.1, 0.2]}, "variance_size"),
    ({"min_size": [10.0], "img_size": 10, "img_h": 10, "img_w": 10}, "not both"),
    ({"min_size": [10.0], "step": 4.0, "step_h": 4.0, "step_w": 4.0}, "not both"),
    ({"min_size": [-1.0]}, "min_size must be positive"),
])
def test_priorbox_errors(fields, message):
    with pytest.raises(CaffeError, match=message):
        make("PriorBox", [(1, 1, 2, 2), (1, 1, 8, 8)], prior_box_param=fields)


def test_priorbox_no_gradient_to_bottoms():
    layer = make("PriorBox", [(1, 1, 2, 2), (1, 1, 8, 8)], prior_box_param={"min_size": [4.0]})
    x = torch.zeros(1, 1, 2, 2, requires_grad=True)
    assert not layer(x, torch.zeros(1, 1, 8, 8)).requires_grad


# ============================================================================ Normalize / Permute
@pytest.mark.parametrize("across,shared", [(True, True), (False, False), (True, False),
                                           (False, True)])
def test_normalize_forward_backward(across, shared):
    torch.manual_seed(0)
    layer = make("Normalize", [(2, 3, 4, 5)],
                 norm_param={"across_spatial": across, "channel_shared": shared,
                             "scale_filler": {"type": "constant", "value": 3.0}})
    assert tuple(layer.blobs[0].shape) == (() if shared else (3,))
    with torch.no_grad():
        if not shared:
            layer.blobs[0].copy_(torch.tensor([1.0, 2.0, 3.0]))
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    xf = x.float().requires_grad_()
    y = layer(xf)
    dims = (1, 2, 3) if across else (1,)
    norm = torch.sqrt((x * x).sum(dim=dims, keepdim=True) + 1e-10)
    s = layer.blobs[0].detach().double()
    expect = x / norm * (s if shared else s.view(1, 3, 1, 1))
    assert torch.allclose(y.double(), expect, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(x)
    y.backward(g.float())
    # Caffe's Backward: (g - (x.g)/n^2 x) / n * s ; scale diff: sum(top * g) / s
    gs = g * (s if shared else s.view(1, 3, 1, 1))
    dot = (x * gs).sum(dim=dims, keepdim=True)
    dx = (gs - dot / norm ** 2 * x) / norm
    assert torch.allclose(xf.grad.double(), dx, rtol=1e-4, atol=1e-6)
    top = expect
    if shared:
        ds = (top * g).sum() / s
    else:
        ds = (top * g).sum(dim=(0, 2, 3)) / s
    assert torch.allclose(layer.blobs[0].grad.double(), ds, rtol=1e-4, atol=1e-6)


def test_normalize_default_scale_is_one_and_needs_two_axes():
    layer = make("Normalize", [(2, 3)])
    assert float(layer.blobs[0].detach()) == 1.0
    with pytest.raises(CaffeError, match=">=2"):
        make("Normalize", [(5,)])


def test_permute():
    layer = make("Permute", [(2, 3, 4, 5)], permute_param={"order": [0, 2]})
    assert layer.orders == (0, 2, 1, 3)
    x = torch.randn(2, 3, 4, 5)
    assert torch.equal(layer(x), x.permute(0, 2, 1, 3))
    same = make("Permute", [(2, 3)], permute_param={"order": [0, 1]})
    assert torch.equal(same(x[:, :, 0, 0]), x[:, :, 0, 0])
    with pytest.raises(CaffeError, match="duplicate"):
        make("Permute", [(2, 3, 4)], permute_param={"order": [1, 1]})
    with pytest.raises(CaffeError, match="less than the input dimension"):
        make("Permute", [(2, 3, 4)], permute_param={"order": [3]})


# ============================================================================ SmoothL1Loss
def test_smooth_l1_loss_and_caffe_gradient():
    a = torch.tensor([[0.5, -2.0], [3.0, 0.1]], requires_grad=True)
    b = torch.tensor([[0.0, 0.0], [0.0, 0.3]], requires_grad=True)
    w = torch.tensor([[1.0, 2.0], [0.5, 1.0]])
    layer = make("SmoothL1Loss", [(2, 2), (2, 2), (2, 2)])
    loss = layer(a, b, w)
    d = (w * (a - b)).detach()
    expect = torch.where(d.abs() < 1, 0.5 * d * d, d.abs() - 0.5).sum() / 2
    assert float(loss.detach()) == pytest.approx(float(expect))
    loss.backward()
    fprime = torch.where(d.abs() < 1, d, torch.sign(d)) / 2    # not multiplied by w (Caffe)
    assert torch.allclose(a.grad, fprime)
    assert torch.allclose(b.grad, -fprime)
    assert layer.top_shapes() == [()]


# ============================================================================ bbox_util
@pytest.mark.parametrize("code", [bu.CORNER, bu.CENTER_SIZE, bu.CORNER_SIZE])
@pytest.mark.parametrize("in_target", [False, True])
def test_encode_decode_round_trip(code, in_target):
    torch.manual_seed(1)
    xy = torch.rand(50, 2) * 0.6
    wh = torch.rand(50, 2) * 0.3 + 0.05
    priors = torch.cat([xy, xy + wh], 1)
    xy2 = torch.rand(50, 2) * 0.6
    wh2 = torch.rand(50, 2) * 0.3 + 0.05
    gts = torch.cat([xy2, xy2 + wh2], 1)
    var = torch.tensor([0.1, 0.1, 0.2, 0.2]).expand(50, 4)
    enc = bu.encode_bboxes(priors, var, code, in_target, gts)
    dec = bu.decode_bboxes(priors, var, code, in_target, enc)
    assert torch.allclose(dec, gts, atol=1e-5)


def test_encode_center_size_values():
    prior = torch.tensor([[0.2, 0.2, 0.4, 0.6]])
    gt = torch.tensor([[0.25, 0.3, 0.45, 0.5]])
    var = torch.tensor([[0.1, 0.1, 0.2, 0.2]])
    enc = bu.encode_bboxes(prior, var, bu.CENTER_SIZE, False, gt)[0]
    # centre offsets (0.05/0.2, -0.0/0.4) / 0.1; log size ratio / 0.2
    assert enc.tolist() == pytest.approx([2.5, 0.0, 0.0, math.log(0.5) / 0.2], abs=1e-5)


def test_jaccard_overlap():
    a = torch.tensor([[0.0, 0.0, 0.5, 0.5]])
    b = torch.tensor([[0.25, 0.25, 0.75, 0.75], [0.5, 0.0, 1.0, 0.5], [0.6, 0.6, 0.9, 0.9]])
    ov = bu.jaccard_overlap(a, b)[0]
    assert ov.tolist() == pytest.approx([0.0625 / 0.4375, 0.0, 0.0])   # touching = 0


def test_match_bipartite_and_per_prediction():
    gts = torch.tensor([[0.0, 0.0, 0.4, 0.4], [0.5, 0.5, 0.9, 0.9]])
    preds = torch.tensor([
        [0.0, 0.0, 0.4, 0.4],      # perfect for gt 0
        [0.0, 0.0, 0.38, 0.4],     # 0.95 with gt 0
        [0.5, 0.5, 0.85, 0.9],     # 0.875 with gt 1 -> bipartite for gt 1
        [0.55, 0.5, 0.9, 0.9],     # 0.875 with gt 1 too (tie: the lower index wins)
        [0.3, 0.3, 0.6, 0.6],      # small overlaps with both
    ])
    idx, ov = bu.match_bboxes(gts, preds, bu.BIPARTITE, 0.5)
    assert idx.tolist() == [0, -1, 1, -1, -1]
    idx, ov = bu.match_bboxes(gts, preds, bu.PER_PREDICTION, 0.5)
    assert idx.tolist() == [0, 0, 1, 1, -1]
    assert ov[1].item() == pytest.approx(0.95)
    assert 0 < ov[4].item() < 0.5          # best overlap recorded even when unmatched
    # cross-boundary predictions are ignored (-2) and never matched
    preds2 = preds.clone()
    preds2[0] = torch.tensor([-0.01, 0.0, 0.4, 0.4])
    idx, ov = bu.match_bboxes(gts, preds2, bu.PER_PREDICTION, 0.5, ignore_cross_boundary=True)
    assert idx.tolist() == [-2, 0, 1, 1, -1]
    assert ov[0].item() == 0


def test_match_bipartite_gives_each_gt_one_prediction_even_below_threshold():
    gts = torch.tensor([[0.0, 0.0, 0.2, 0.2]])
    preds = torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.6, 0.6, 0.9, 0.9]])
    idx, _ = bu.match_bboxes(gts, preds, bu.PER_PREDICTION, 0.5)
    assert idx.tolist() == [0, -1]


def test_nms_fast():
    boxes = np.array([[0, 0, 1, 1], [0, 0, 0.95, 1], [0.5, 0.5, 1.5, 1.5], [2, 2, 3, 3],
                      [0, 0, 0.9, 0.9]], np.float32) / 4
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.95], np.float32)
    # 4 (0.95) first; 0 overlaps it 0.81 -> removed; 1 overlaps 4 by 0.85 -> removed;
    # 2 overlaps 4 by 0.16 -> kept; 3 disjoint -> kept
    assert bu.apply_nms_fast(boxes, scores, -bu.FLT_MAX, 0.45, 1.0, -1) == [4, 2, 3]
    assert bu.apply_nms_fast(boxes, scores, 0.65, 0.45, 1.0, -1) == [4, 2]
    assert bu.apply_nms_fast(boxes, scores, -bu.FLT_MAX, 0.45, 1.0, 2) == [4]    # top_k first
    assert bu.apply_nms_fast(boxes, scores, -bu.FLT_MAX, 0.9, 1.0, -1) == [4, 0, 2, 3]
    # adaptive threshold: 0.9 * 0.5 after the first kept box = 0.45 -> 0 suppressed then
    assert bu.apply_nms_fast(boxes, scores, -bu.FLT_MAX, 0.9, 0.5, -1) == [4, 2, 3]
    assert bu.apply_nms_fast(boxes, scores, 1.0, 0.45, 1.0, -1) == []


def test_nms_mining_variant_drops_small_boxes_and_stops_at_top_k():
    boxes = np.array([[0, 0, 0.001, 0.001], [0, 0, 0.5, 0.5], [0.6, 0.6, 1, 1]], np.float32)
    scores = np.array([3.0, 2.0, 1.0], np.float32)
    assert bu.apply_nms(boxes, scores, 0.5, -1) == [1, 2]
    assert bu.apply_nms(boxes, scores, 0.5, 2) == [1]     # top_k cuts the candidates first
    assert bu.apply_nms(boxes, scores, 0.5, 0) == []      # SSD-Caffe's top_k 0 keeps none


def test_compute_ap_versions():
    tp = [(0.9, 1), (0.8, 0), (0.7, 1), (0.6, 0)]
    fp = [(s, 1 - f) for s, f in tp]
    prec, rec, ap = bu.compute_ap(tp, 3, fp, "Integral")
    assert prec == pytest.approx([1, 0.5, 2 / 3.0, 0.5])
    assert rec == pytest.approx([1 / 3.0, 1 / 3.0, 2 / 3.0, 2 / 3.0])
    assert ap == pytest.approx(1 / 3.0 + 2 / 9.0, rel=1e-6)
    assert bu.compute_ap(tp, 3, fp, "MaxIntegral")[2] == pytest.approx(1 / 3.0 + 2 / 9.0, rel=1e-6)
    assert bu.compute_ap(tp, 3, fp, "11point")[2] == pytest.approx(6 / 11.0, rel=1e-6)
    # unsorted input is sorted by score first
    shuffled = [tp[2], tp[0], tp[3], tp[1]]
    assert bu.compute_ap(shuffled, 3, [(s, 1 - f) for s, f in shuffled])[2] == pytest.approx(ap)
    assert bu.compute_ap([], 3, [])[2] == 0
    assert bu.compute_ap(tp, 0, fp)[2] == 0
    with pytest.raises(CaffeError, match="ap_version"):
        bu.compute_ap(tp, 3, fp, "VOC")


def test_compute_ap_max_integral_differs_from_integral():
    # precision rises after a false positive: MaxIntegral uses the envelope
    tp = [(0.9, 0), (0.8, 1), (0.7, 1)]
    fp = [(s, 1 - f) for s, f in tp]
    integral = bu.compute_ap(tp, 2, fp, "Integral")[2]
    maxint = bu.compute_ap(tp, 2, fp, "MaxIntegral")[2]
    assert integral == pytest.approx(0.5 * 0.5 + (2 / 3.0) * 0.5)
    assert maxint == pytest.approx(2 / 3.0)


# ============================================================================ DetectionOutput
def _priors_blob(boxes, var=(0.1, 0.1, 0.2, 0.2)):
    boxes = np.asarray(boxes, np.float32)
    v = np.tile(np.asarray(var, np.float32), len(boxes))
    return torch.from_numpy(np.stack([boxes.reshape(-1), v])[None])


def test_detection_output_rows_keep_top_k_and_empty():
    priors = _priors_blob([[0.1, 0.1, 0.3, 0.3], [0.12, 0.1, 0.32, 0.3], [0.6, 0.6, 0.9, 0.9]])
    loc = torch.zeros(2, 12)
    conf = torch.tensor([[0.1, 0.8, 0.1, 0.2, 0.7, 0.1, 0.5, 0.1, 0.4],
                         [0.9, 0.05, 0.05, 0.9, 0.05, 0.05, 0.9, 0.05, 0.05]])
    fields = {"num_classes": 3, "background_label_id": 0, "code_type": bu.CENTER_SIZE,
              "nms_param": {"nms_threshold": 0.45}, "confidence_threshold": 0.3}
    layer = make("DetectionOutput", [(2, 12), (2, 9), (1, 2, 12)], "TEST",
                 detection_output_param=fields)
    assert layer.top_shapes() == [(1, 1, 1, 7)]
    rows = layer(loc, conf, priors).numpy()[0, 0]
    # image 0: class 1 -> prior 0 (0.8; prior 1 suppressed); class 2 -> prior 2 (0.4)
    assert np.allclose(rows[:, :3], [[0, 1, 0.8], [0, 2, 0.4]])
    assert rows[0, 3:].tolist() == pytest.approx([0.1, 0.1, 0.3, 0.3])
    fields["keep_top_k"] = 1
    layer = make("DetectionOutput", [(2, 12), (2, 9), (1, 2, 12)], "TEST",
                 detection_output_param=fields)
    rows = layer(loc, conf, priors).numpy()[0, 0]
    assert np.allclose(rows[:, :3], [[0, 1, 0.8]])
    # no detection at all: one row of -1 per image
    layer = make("DetectionOutput", [(2, 12), (2, 9), (1, 2, 12)], "TEST",
                 detection_output_param=dict(fields, confidence_threshold=0.95))
    rows = layer(loc, conf, priors).numpy()[0, 0]
    assert rows.tolist() == [[0] + [-1] * 6, [1] + [-1] * 6]


def test_detection_output_unshared_locations():
    priors = _priors_blob([[0.1, 0.1, 0.3, 0.3]])
    # per class (bg, 1, 2) offsets; class 2 moved right by 1 prior width (0.2/0.1 = 10 units)
    loc = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 0, 10.0, 0, 0, 0]])
    conf = torch.tensor([[0.0, 0.6, 0.7]])
    layer = make("DetectionOutput", [(1, 12), (1, 3), (1, 2, 4)], "TEST",
                 detection_output_param={"num_classes": 3, "share_location": False,
                                         "code_type": bu.CENTER_SIZE})
    rows = layer(loc, conf, priors).numpy()[0, 0]
    assert rows[0, 3:].tolist() == pytest.approx([0.1, 0.1, 0.3, 0.3])
    assert rows[1, 3:].tolist() == pytest.approx([0.3, 0.1, 0.5, 0.3])


def test_detection_output_checks():
    with pytest.raises(CaffeError, match="num_classes"):
        make("DetectionOutput", [(1, 4), (1, 2), (1, 2, 4)], "TEST", detection_output_param={})
    with pytest.raises(CaffeError, match="location predictions"):
        make("DetectionOutput", [(1, 8), (1, 2), (1, 2, 4)], "TEST",
             detection_output_param={"num_classes": 2})


# ============================================================================ DetectionEvaluate
def test_detection_evaluate_rows_and_map():
    gt = torch.tensor([[[[0, 1, 0, 0.1, 0.1, 0.4, 0.4, 0],
                         [0, 1, 1, 0.5, 0.5, 0.9, 0.9, 1],      # difficult
                         [1, 2, 0, 0.2, 0.2, 0.6, 0.6, 0]]]])
    det = torch.tensor([[[[0, 1, 0.9, 0.1, 0.1, 0.4, 0.4],        # tp
                          [0, 1, 0.8, 0.12, 0.1, 0.4, 0.4],       # duplicate -> fp
                          [0, 1, 0.7, 0.5, 0.5, 0.9, 0.9],        # difficult -> 0, 0
                          [0, 2, 0.6, 0.2, 0.2, 0.6, 0.6],        # no gt of label 2 in image 0
                          [1, 2, 0.5, 0.21, 0.2, 0.6, 0.6],       # tp
                          [1, 2, 0.4, 0.7, 0.7, 0.9, 0.9]]]])     # fp (no overlap)
    layer = make("DetectionEvaluate", [(1, 1, 6, 7), (1, 1, 3, 8)], "TEST",
                 detection_evaluate_param={"num_classes": 3, "background_label_id": 0,
                                           "overlap_threshold": 0.5,
                                           "evaluate_difficult_gt": False})
    assert layer.top_shapes() == [(1, 1, 8, 5)]
    rows = layer(det, gt).numpy()[0, 0]
    expect = [[-1, 1, 1, -1, -1], [-1, 2, 1, -1, -1],
              [0, 1, 0.9, 1, 0], [0, 1, 0.8, 0, 1], [0, 1, 0.7, 0, 0],
              [0, 2, 0.6, 0, 1], [1, 2, 0.5, 1, 0], [1, 2, 0.4, 0, 1]]
    assert np.allclose(rows, expect)
    mAP, aps, warnings = bu.detection_map([rows], "Integral")
    assert aps[1] == pytest.approx(1.0)
    # label 2: sorted 0.6 fp, 0.5 tp, 0.4 fp, 1 gt: prec [0, .5, 1/3], rec [0, 1, 1]
    assert aps[2] == pytest.approx(0.5)
    assert mAP == pytest.approx(0.75)
    assert warnings == []


def test_detection_map_counts_labels_without_detections():
    rows = np.array([[-1, 1, 2, -1, -1], [-1, 2, 1, -1, -1], [0, 1, 0.9, 1, 0]], np.float32)
    mAP, aps, warnings = bu.detection_map([rows], "11point")
    assert aps == {1: pytest.approx(6 / 11.0)}
    assert mAP == pytest.approx(3 / 11.0)
    assert warnings == ["Missing true_pos for label: 2"]


# ============================================================================ MultiBoxLoss
class RefMultiBox:
    """SSD-Caffe's MultiBoxLoss transcribed loop by loop (numpy float32), forward and Caffe's
    Backward formulas, independent of the vectorised layer."""

    def __init__(self, **cfg):
        self.c = cfg

    @staticmethod
    def iou(a, b):
        f = np.float32
        if b[0] > a[2] or b[2] < a[0] or b[1] > a[3] or b[3] < a[1]:
            return f(0)
        iw = f(min(a[2], b[2]) - max(a[0], b[0]))
        ih = f(min(a[3], b[3]) - max(a[1], b[1]))
        if iw <= 0 or ih <= 0:
            return f(0)

        def size(x):
            return f(0) if x[2] < x[0] or x[3] < x[1] else f(f(x[2] - x[0]) * f(x[3] - x[1]))
        inter = f(iw * ih)
        return f(inter / f(f(size(a) + size(b)) - inter))

    def match(self, gts, gidx, preds):
        c = self.c
        P = len(preds)
        idx, ovl, overlaps = [-1] * P, [0.0] * P, {}
        for i in range(P):
            if c["ignore_cross"] and (np.any(preds[i] < 0) or np.any(preds[i] > 1)):
                idx[i] = -2
                continue
            for j, box in enumerate(gts):
                o = self.iou(preds[i], box)
                if o > 1e-6:
                    ovl[i] = max(ovl[i], o)
                    overlaps.setdefault(i, {})[j] = o
        pool = list(range(len(gts)))
        while pool:
            bi, bj, bo = -1, -1, -1.0
            for i in sorted(overlaps):
                if idx[i] != -1:
                    continue
                for j in pool:
                    if j in overlaps[i] and overlaps[i][j] > bo:
                        bi, bj, bo = i, j, overlaps[i][j]
            if bi == -1:
                break
            idx[bi], ovl[bi] = gidx[bj], bo
            pool.remove(bj)
        if c["match_type"] == bu.PER_PREDICTION:
            for i in sorted(overlaps):
                if idx[i] != -1:
                    continue
                bj, bo = -1, -1.0
                for j in range(len(gts)):
                    o = overlaps[i].get(j)
                    if o is not None and o >= np.float32(c["overlap"]) and o > bo:
                        bj, bo = j, o
                if bj != -1:
                    idx[i], ovl[i] = gidx[bj], bo
        return idx, ovl

    def conf_label(self, label):
        return self.c["bg"] + 1 if self.c["agnostic"] else label

    def encode(self, p, v, g):
        c = self.c
        f = np.float32
        t = c["code_type"]
        vin = c["evit"]
        if t == bu.CORNER:
            e = [g[0] - p[0], g[1] - p[1], g[2] - p[2], g[3] - p[3]]
            return [f(e[k]) if vin else f(e[k] / v[k]) for k in range(4)]
        pw, ph = f(p[2] - p[0]), f(p[3] - p[1])
        if t == bu.CENTER_SIZE:
            pcx, pcy = f((p[0] + p[2]) / 2), f((p[1] + p[3]) / 2)
            gw, gh = f(g[2] - g[0]), f(g[3] - g[1])
            gcx, gcy = f((g[0] + g[2]) / 2), f((g[1] + g[3]) / 2)
            e = [(gcx - pcx) / pw, (gcy - pcy) / ph, np.log(gw / pw), np.log(gh / ph)]
        else:
            e = [(g[0] - p[0]) / pw, (g[1] - p[1]) / ph, (g[2] - p[2]) / pw, (g[3] - p[3]) / ph]
        return [f(e[k]) if vin else f(e[k] / v[k]) for k in range(4)]

    def decode(self, p, v, l):
        t = torch.tensor
        return bu.decode_bboxes(t(p), t(v), self.c["code_type"], self.c["evit"], t(l)).numpy()

    def run(self, loc, conf, prior, gt):
        c = self.c
        N = loc.shape[0]
        P = prior.shape[2] // 4
        C = c["num_classes"]
        share = c["share"]
        L = 1 if share else C
        bg = c["bg"]
        pri = prior.reshape(-1)[:P * 4].reshape(P, 4)
        var = prior.reshape(-1)[P * 4:P * 8].reshape(P, 4)
        locp = loc.reshape(N, P, L, 4)
        confp = conf.reshape(N, P, C)
        gts = {}
        for r in gt.reshape(-1, 8):
            if int(r[0]) == -1:
                continue
            if not c["use_difficult"] and r[7]:
                continue
            gts.setdefault(int(r[0]), []).append((int(r[1]), r[3:7]))
        # FindMatches
        all_idx, all_ovl = [], []
        for i in range(N):
            mi, mo = {}, {}
            if i in gts:
                boxes = [b for _, b in gts[i]]
                labels = [lab for lab, _ in gts[i]]
                if not c["prior_match"]:
                    for k in range(L):
                        label = -1 if share else k
                        if not share and label == bg:
                            continue
                        dec = self.decode(pri, var, locp[i, :, k])
                        sub = [g for g in range(len(boxes)) if label == -1 or labels[g] == label]
                        mi[label], mo[label] = self.match([boxes[g] for g in sub], sub, dec)
                else:
                    idx, ov = self.match(boxes, list(range(len(boxes))), pri)
                    if share:
                        mi[-1], mo[-1] = idx, ov
                    else:
                        for k in range(L):
                            if k == bg:
                                continue
                            mi[k] = [m if m > -1 and labels[m] == k else -1 for m in idx]
                            mo[k] = ov
            all_idx.append(mi)
            all_ovl.append(mo)
        # MineHardExamples
        negs = [[] for _ in range(N)]
        if c["mining"] != 0:
            for i in range(N):
                lab_of = [bg] * P
                for p in range(P):
                    for label in sorted(all_idx[i]):
                        m = all_idx[i][label][p]
                        if m > -1:
                            lab_of[p] = gts[i][m][0]
                            break
                loss = []
                for p in range(P):
                    x = confp[i, p].astype(np.float32)
                    if c["conf_type"] == 0:
                        e = np.exp(x - x.max())
                        loss.append(-np.log(max(e[lab_of[p]] / e.sum(), bu.FLT_MIN)))
                    else:
                        t = (np.arange(C) == lab_of[p]).astype(np.float32)
                        pos = (x >= 0).astype(np.float32)
                        loss.append(-np.sum(x * (t - pos) - np.log1p(np.exp(x - 2 * x * pos))))
                if c["mining"] == 2:
                    for label in sorted(all_idx[i]):
                        for p, m in enumerate(all_idx[i][label]):
                            if m > -1:
                                e = self.encode(pri[p], var[p], gts[i][m][1])
                                pr = locp[i, p, 0]
                                if c["evit"]:
                                    pr = pr / var[p]
                                    e = [e[k] / var[p][k] for k in range(4)]
                                d = pr - np.asarray(e, np.float32)
                                loss[p] += float(np.sum(np.where(np.abs(d) < 1, 0.5 * d * d,
                                                                 np.abs(d) - 0.5)))
                for label in sorted(all_idx[i]):
                    mi, mo = all_idx[i][label], all_ovl[i][label]
                    if c["mining"] == 1:
                        elig = [p for p in range(P) if mi[p] == -1 and mo[p] < c["neg_overlap"]]
                        npos = sum(1 for m in mi if m > -1)
                        nsel = min(int(np.float32(npos) * np.float32(c["ratio"])), len(elig))
                    else:
                        elig = list(range(P))
                        nsel = min(c["sample_size"], len(elig))
                    order = sorted(elig, key=lambda p: (-loss[p], p))
                    sel = set(order[:nsel])
                    for p in range(P):
                        if mi[p] > -1:
                            if c["mining"] == 2 and p not in sel:
                                mi[p] = -1
                        elif mi[p] == -1 and p in sel:
                            negs[i].append(p)
        num_matches = sum(1 for i in range(N) for mi in all_idx[i].values() for m in mi if m > -1)
        norm = {0: N * P, 1: num_matches, 2: N, 3: 1}[c["norm"]]
        norm = max(1.0, float(norm))
        dloc = np.zeros_like(locp)
        dconf = np.zeros_like(confp)
        loc_loss = 0.0
        for i in range(N):
            for label in sorted(all_idx[i]):
                col = 0 if share else label
                for p, m in enumerate(all_idx[i][label]):
                    if m <= -1:
                        continue
                    e = np.asarray(self.encode(pri[p], var[p], gts[i][m][1]), np.float32)
                    pr = locp[i, p, col].copy()
                    inside = np.ones(4, bool)
                    if c["bp_inside"]:
                        mb = pri[p] if c["prior_match"] else self.decode(
                            pri[p:p + 1], var[p:p + 1], locp[i, p:p + 1, col])[0]
                        inside = (mb >= 0) & (mb <= 1)
                        pr = np.where(inside, pr, e)
                    if c["evit"]:
                        pr, e = pr / var[p], e / var[p]
                    d = pr - e
                    if c["loc_type"] == 1:
                        loc_loss += np.sum(np.where(np.abs(d) < 1, 0.5 * d * d, np.abs(d) - 0.5))
                        g = np.where(np.abs(d) < 1, d, np.sign(d))
                    else:
                        loc_loss += np.sum(0.5 * d * d)
                        g = d
                    dloc[i, p, col] = np.where(inside, g, 0) * c["loc_weight"] / norm
        conf_loss = 0.0
        rows = []     # (i, p, target vector or label)
        for i in range(N):
            if c["mining"] != 0:
                if i not in gts:
                    continue
                for label in sorted(all_idx[i]):
                    for p, m in enumerate(all_idx[i][label]):
                        if m > -1:
                            rows.append((i, p, self.conf_label(gts[i][m][0]), True))
                for p in negs[i]:
                    rows.append((i, p, bg, False))
        if c["conf_type"] == 0:
            if c["mining"] == 0:
                target = np.full((N, P), bg)
                for i in range(N):
                    if i in gts:
                        for label in sorted(all_idx[i]):
                            for p, m in enumerate(all_idx[i][label]):
                                if m > -1:
                                    target[i, p] = self.conf_label(gts[i][m][0])
                rows = [(i, p, target[i, p], None) for i in range(N) for p in range(P)]
            for i, p, t, _ in rows:
                x = confp[i, p]
                e = np.exp(x - x.max())
                prob = e / e.sum()
                conf_loss += -np.log(max(prob[t], bu.FLT_MIN))
                onehot = np.eye(C)[t]
                dconf[i, p] = (prob - onehot) / norm
        else:
            if c["mining"] == 0:
                T = np.full(N * P * C, float(bg), np.float32)
                for i in range(N):
                    if i in gts:
                        for label in sorted(all_idx[i]):
                            for p, m in enumerate(all_idx[i][label]):
                                if m > -1:
                                    T[i * P + p * C + self.conf_label(gts[i][m][0])] = 1
                T = T.reshape(N, P, C)
                rows = [(i, p, T[i, p], None) for i in range(N) for p in range(P)]
            else:
                new = []
                for i, p, t, is_pos in rows:
                    vec = np.full(C, float(bg), np.float32)
                    if is_pos:
                        vec[t] = 1
                    elif 0 <= bg < C:
                        vec[bg] = 1
                    new.append((i, p, vec, None))
                rows = new
            for i, p, t, _ in rows:
                x = confp[i, p]
                pos = (x >= 0).astype(np.float32)
                conf_loss += -np.sum(x * (t - pos) - np.log1p(np.exp(x - 2 * x * pos)))
                dconf[i, p] = (1 / (1 + np.exp(-x)) - t) / norm
        total = c["loc_weight"] * loc_loss / norm + conf_loss / norm
        return total, dloc.reshape(N, -1), dconf.reshape(N, -1), num_matches


def _random_case(seed, N=2, P_side=4, C=3, share=True, num_gt=5, cross=False):
    rng = np.random.RandomState(seed)
    # priors on a P_side x P_side grid, two sizes per cell
    boxes = []
    for y in range(P_side):
        for x in range(P_side):
            cx, cy = (x + 0.5) / P_side, (y + 0.5) / P_side
            for s in (0.3, 0.5):
                boxes.append([cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2])
    boxes = np.asarray(boxes, np.float32)
    if not cross:
        boxes = np.clip(boxes, 0, 1)
    P = len(boxes)
    prior = np.stack([boxes.reshape(-1), np.tile(np.float32([0.1, 0.1, 0.2, 0.2]), P)])[None]
    L = 1 if share else C
    loc = (rng.randn(N, P * L * 4) * 0.5).astype(np.float32)
    conf = rng.randn(N, P * C).astype(np.float32)
    rows = []
    for g in range(num_gt):
        item = g % N if g < num_gt - 1 else 0
        x0, y0 = rng.uniform(0, 0.6, 2)
        w, h = rng.uniform(0.15, 0.4, 2)
        rows.append([item, rng.randint(1, C), g, x0, y0, min(x0 + w, 1), min(y0 + h, 1),
                     float(g == 2)])
    gt = np.asarray(rows, np.float32)[None, None]
    return loc, conf, prior.astype(np.float32), gt


CONFIGS = [
    dict(),
    dict(match_type=bu.BIPARTITE),
    dict(mining=0),
    dict(mining=0, conf_type=1),
    dict(conf_type=1),
    dict(loc_type=0, loc_weight=2.0),
    dict(code_type=bu.CORNER),
    dict(code_type=bu.CORNER_SIZE, evit=True),
    dict(code_type=bu.CENTER_SIZE, evit=True),
    dict(prior_match=False),
    dict(use_difficult=False, norm=0),
    dict(norm=2, ratio=1.5, neg_overlap=0.3),
    dict(norm=3, overlap=0.3),
    dict(mining=2, sample_size=12),
    dict(mining=0, share=False),
    dict(mining=0, share=False, prior_match=False),
    dict(mining=0, share=False, conf_type=1),
    dict(ignore_cross=True, cross=True),
    dict(bp_inside=True, cross=True),
    dict(bp_inside=True, cross=True, prior_match=False, mining=0),
    dict(agnostic=True, num_classes=2),
    dict(agnostic=True, num_classes=2, mining=0),
    dict(agnostic=True, num_classes=2, mining=0, conf_type=1),
    dict(mining=2, sample_size=20, conf_type=1, loc_type=0),
]


@pytest.mark.parametrize("idx", range(len(CONFIGS)))
def test_multibox_loss_matches_reference(idx):
    cfg = dict(num_classes=3, share=True, match_type=bu.PER_PREDICTION, overlap=0.5,
               prior_match=True, bg=0, use_difficult=True, mining=1, ratio=3.0, neg_overlap=0.5,
               code_type=bu.CENTER_SIZE, evit=False, ignore_cross=False, sample_size=64,
               loc_type=1, conf_type=0, loc_weight=1.0, norm=1, cross=False, bp_inside=False,
               agnostic=False)
    cfg.update(CONFIGS[idx])
    loc, conf, prior, gt = _random_case(idx, C=cfg["num_classes"], share=cfg["share"],
                                        cross=cfg["cross"])
    if cfg["agnostic"] and cfg["mining"] == 0:   # any object label (not used by the loss)
        gt[..., 1] = np.where(np.arange(gt.shape[2]) % 2, 3, 4)
    fields = {"num_classes": cfg["num_classes"], "share_location": cfg["share"],
              "match_type": cfg["match_type"], "bp_inside": cfg["bp_inside"],
              "map_object_to_agnostic": cfg["agnostic"],
              "overlap_threshold": cfg["overlap"], "use_prior_for_matching": cfg["prior_match"],
              "background_label_id": cfg["bg"], "use_difficult_gt": cfg["use_difficult"],
              "mining_type": cfg["mining"], "neg_pos_ratio": cfg["ratio"],
              "neg_overlap": cfg["neg_overlap"], "code_type": cfg["code_type"],
              "encode_variance_in_target": cfg["evit"],
              "ignore_cross_boundary_bbox": cfg["ignore_cross"], "sample_size": cfg["sample_size"],
              "loc_loss_type": cfg["loc_type"], "conf_loss_type": cfg["conf_type"],
              "loc_weight": cfg["loc_weight"]}
    shapes = [loc.shape, conf.shape, prior.shape, gt.shape]
    layer = make("MultiBoxLoss", shapes, multibox_loss_param=fields,
                 loss_param={"normalization": cfg["norm"]})
    lt = torch.tensor(loc, requires_grad=True)
    ct = torch.tensor(conf, requires_grad=True)
    loss = layer(lt, ct, torch.tensor(prior), torch.tensor(gt))
    loss.backward()
    ref = RefMultiBox(**cfg)
    total, dloc, dconf, num_matches = ref.run(loc, conf, prior, gt)
    assert num_matches > 0
    assert int(layer.last_num_matches) == num_matches
    assert float(loss.detach()) == pytest.approx(float(total), rel=1e-5)
    assert np.allclose(lt.grad.numpy(), dloc, rtol=1e-4, atol=1e-6)
    assert np.allclose(ct.grad.numpy(), dconf, rtol=1e-4, atol=1e-6)


def test_multibox_propagate_down_and_no_gt():
    loc, conf, prior, gt = _random_case(3)
    shapes = [loc.shape, conf.shape, prior.shape, gt.shape]
    fields = {"num_classes": 3}
    full = make("MultiBoxLoss", shapes, multibox_loss_param=fields)
    lp = caffe_pb2.LayerParameter(name="L", type="MultiBoxLoss")
    lp.multibox_loss_param.num_classes = 3
    lp.propagate_down.extend([False, True, False, False])
    conf_only = registry.get("MultiBoxLoss")(lp, shapes, "TRAIN")
    args = [torch.tensor(a) for a in (loc, conf, prior, gt)]
    # with propagate_down false for loc the loc term is not in the loss value (SSD-Caffe)
    assert float(conf_only(*args)) < float(full(*args))
    # no ground truth at all (-1 rows): no matches, no negatives, zero loss
    empty = np.full((1, 1, 1, 8), -1, np.float32)
    layer = make("MultiBoxLoss", [loc.shape, conf.shape, prior.shape, empty.shape],
                 multibox_loss_param=fields)
    lt = torch.tensor(loc, requires_grad=True)
    loss = layer(lt, torch.tensor(conf), torch.tensor(prior), torch.tensor(empty))
    assert float(loss.detach()) == 0
    loss.backward()
    assert float(lt.grad.abs().sum()) == 0


@pytest.mark.parametrize("fields,message", [
    ({}, "Must provide num_classes"),
    ({"num_classes": 3, "background_label_id": 3}, "background_label_id should be within"),
    ({"num_classes": 3, "share_location": False}, "negative mining if share_location"),
    ({"num_classes": 2}, "confidence predictions"),
    ({"num_classes": 3, "map_object_to_agnostic": True}, "num_classes_ == 2"),
])
def test_multibox_setup_errors(fields, message):
    loc, conf, prior, gt = _random_case(0)
    with pytest.raises(CaffeError, match=message):
        make("MultiBoxLoss", [loc.shape, conf.shape, prior.shape, gt.shape],
             multibox_loss_param=fields)


def test_multibox_top_shape_and_label_bottoms():
    loc, conf, prior, gt = _random_case(0)
    layer = make("MultiBoxLoss", [loc.shape, conf.shape, prior.shape, gt.shape],
                 multibox_loss_param={"num_classes": 3})
    assert layer.top_shapes() == [()]
    assert layer.is_loss and layer.label_bottoms == (2, 3)


def test_multibox_label_outside_classes_is_an_error():
    loc, conf, prior, gt = _random_case(0)
    gt[0, 0, 0, 1] = 7
    layer = make("MultiBoxLoss", [loc.shape, conf.shape, prior.shape, gt.shape],
                 multibox_loss_param={"num_classes": 3})
    with pytest.raises(CaffeError, match="label < num_classes"):
        layer(*[torch.tensor(a) for a in (loc, conf, prior, gt)])


@pytest.mark.parametrize("use_prior", [True, False])
def test_multibox_hard_example_with_nms(use_prior):
    loc, conf, prior, gt = _random_case(5)
    fields = {"num_classes": 3, "mining_type": 2, "sample_size": 10, "use_prior_for_nms": use_prior,
              "nms_param": {"nms_threshold": 0.3, "top_k": 40}}
    layer = make("MultiBoxLoss", [loc.shape, conf.shape, prior.shape, gt.shape],
                 multibox_loss_param=fields)
    lt = torch.tensor(loc, requires_grad=True)
    ct = torch.tensor(conf, requires_grad=True)
    loss = layer(lt, ct, torch.tensor(prior), torch.tensor(gt))
    loss.backward()
    # at most sample_size examples (positives and negatives) per image get conf gradients
    per_image = (ct.grad.reshape(2, -1, 3).abs().sum(2) > 0).sum(1)
    assert int(per_image.max()) <= 10
    assert int(layer.last_num_matches) + int(layer.last_num_negs) == int(per_image.sum())
    # the chosen examples do not overlap each other by more than the NMS threshold
    rows = torch.nonzero(ct.grad.reshape(2, -1, 3).abs().sum(2)[0] > 0).reshape(-1)
    if use_prior:
        boxes = torch.tensor(prior[0, 0].reshape(-1, 4))[rows]
        ov = bu.jaccard_overlap(boxes, boxes)
        ov.fill_diagonal_(0)
        assert float(ov.max()) <= 0.3 + 1e-6
