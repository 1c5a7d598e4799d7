"""``trainer test``: Caffe's ``caffe test`` (caffe.cpp test()): score a model over N batches."""
import click
import numpy as np
import torch

from cli import devices
from cli.main import caffe_option, main, report_errors
from cli.train import stages_from
from converters import glog
from converters.errors import CaffeError


def _fmt(x):
    return glog.format_number(x)


@main.command("test")
@caffe_option("model", default="", help="The model definition protocol buffer text file.")
@caffe_option("weights", default="", help="The trained .caffemodel to score.")
@caffe_option("iterations", default=50, type=int, help="The number of batches to score.")
@caffe_option("gpu", default="", help="GPU id to use.")
@caffe_option("level", default=0, type=int, help="The NetState level.")
@caffe_option("stage", default="", help="Comma-separated NetState stages.")
@click.option("--phase", default="TEST", type=click.Choice(["TRAIN", "TEST"]),
              help="Phase of the net (Caffe's test always uses TEST).")
@click.option("--debug", is_flag=True, help="Show Python tracebacks on errors.")
@report_errors
def test(model, weights, iterations, gpu, level, stage, phase, debug):
    """Score a model (caffe test)."""
    from layers.net import Net
    if not model:
        raise CaffeError("Need a model definition to score.", where="caffe.cpp:263")
    if not weights:
        raise CaffeError("Need model weights to score.", where="caffe.cpp:264")
    if iterations < 1:
        raise CaffeError("--iterations must be at least 1 (got %d)" % iterations)
    device, _ = devices.select(devices.parse_gpus(gpu), where_cpu="caffe.cpp:275")
    net = Net(model, phase, level=level, stages=stages_from(stage))
    net.copy_from(weights)
    net.to(device)
    glog.info("Running for %d iterations." % iterations, where="caffe.cpp:281")
    detection = [n for n in net.outputs if net.producer_type(n) == "DetectionEvaluate"]
    plain = [n for n in net.outputs if n not in detection]
    scores, names, loss = None, [], 0.0
    shapes = {}
    det_scores = None
    if detection:
        from solvers.detection_eval import DetectionScores
        det_scores = DetectionScores()
    with torch.no_grad():
        for i in range(iterations):
            total = net.run()
            loss += float(total) if total is not None else 0.0
            for j, name in enumerate(detection):
                det_scores.add(j, net._data[name].detach().reshape(-1, 5).cpu().numpy())
            values = []
            for name in plain:
                blob = net._data[name]
                if shapes.setdefault(name, tuple(blob.shape)) != tuple(blob.shape):
                    raise CaffeError(
                        "Output '%s' changed shape between batches (%s, then %s in batch %d): "
                        "caffe test averages outputs element by element, which needs a fixed "
                        "shape. Score detections with a DetectionEvaluate output (its mAP is "
                        "reported) or through the solver's test (eval_type: \"detection\")."
                        % (name, " ".join(map(str, shapes[name])),
                           " ".join(map(str, blob.shape)), i))
                for v in blob.detach().reshape(-1).cpu().numpy():
                    values.append(float(v))
                    if i == 0:
                        names.append(name)
                    glog.info("Batch %d, %s = %s" % (i, name, _fmt(np.float32(v))),
                              where="caffe.cpp:304")
            arr = np.array(values, dtype=np.float64)
            scores = arr if scores is None else scores + arr
    loss /= max(iterations, 1)
    glog.info("Loss: %s" % _fmt(np.float32(loss)), where="caffe.cpp:309")
    for name, total in zip(names, scores if scores is not None else []):
        mean = np.float32(total / iterations)
        weight = net.output_loss_weight(name)
        msg = "%s = %s" % (name, _fmt(mean))
        if weight:
            msg += " (* %s = %s loss)" % (_fmt(weight), _fmt(np.float32(weight * mean)))
        glog.info(msg, where="caffe.cpp:321")
    if det_scores is not None:
        # Caffe's test would sum DetectionEvaluate rows element by element (rows whose count
        # changes per batch); SSD-Caffe scores them in the solver's TestDetection: the same here.
        for j, mean, per_label in det_scores.results("Integral"):
            for label, ap in per_label:
                if ap is None:
                    glog.warning("Missing true_pos for label: %d" % label, where="solver.cpp:524")
            glog.info("%s = %s (mAP over %d iterations, ap_version Integral, as SSD-Caffe's "
                      "TestDetection)" % (detection[j], _fmt(np.float32(mean)), iterations))
