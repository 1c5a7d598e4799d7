"""``trainer export``: a Caffe net + weights as a plain PyTorch module or as ONNX.

    trainer export --model deploy.prototxt --weights net.caffemodel --format torch -o net.py
        -> net.py (a torch.nn.Module using torch.nn.functional, no dependency on trainer)
           and net.pt (its state_dict)
    trainer export --model deploy.prototxt --weights net.caffemodel --format onnx -o net.onnx

The net is built in the TEST phase (the deploy net). The logic lives in layers/export.py.
"""
import os

import click

from cli.main import caffe_option, main, report_errors
from cli.train import stages_from
from converters import glog
from converters.errors import CaffeError


def _paths(output, fmt):
    if fmt == "onnx":
        return output, None
    root, ext = os.path.splitext(output)
    if ext in (".py", ".pt", ".pth"):
        return root + ".py", root + ".pt"
    return output + ".py", output + ".pt"


@main.command("export")
@caffe_option("model", default="", help="The deploy net (.prototxt) to export.")
@caffe_option("weights", default="", help="The .caffemodel with its weights (comma-separated "
              "for several; without it, the prototxt's fillers).")
@click.option("--format", "fmt", type=click.Choice(["torch", "onnx"]), default="torch",
              show_default=True, help="torch: a .py module + a .pt state_dict; onnx: an .onnx "
              "file (needs the onnx package: pip install 'trainer[onnx]').")
@click.option("-o", "--output", default="", help="Output path: for torch, OUT.py and OUT.pt are "
              "written (OUT may end in .py); for onnx, the .onnx file.")
@caffe_option("level", default=0, type=int, help="The NetState level.")
@caffe_option("stage", default="", help="Comma-separated NetState stages.")
@click.option("--opset", default=None, type=int, help="ONNX opset version (default: torch's).")
@click.option("--debug", is_flag=True, help="Show Python tracebacks on errors.")
@report_errors
def export_command(model, weights, fmt, output, level, stage, opset, debug):
    """Export a net and its weights as a PyTorch module or ONNX."""
    from layers import export
    from layers.net import Net
    if not model:
        raise CaffeError("Need a model definition to export (--model).")
    if not output:
        raise CaffeError("Need an output path (-o).")
    net = Net(model, "TEST", level=level, stages=stages_from(stage), log=False)
    sources = [w for w in (weights or "").split(",") if w]
    for w in sources:
        glog.info("Loading weights from " + w)
        net.copy_from(w)
    net.eval()
    provenance = os.path.basename(model) + (
        " + " + ", ".join(os.path.basename(w) for w in sources) if sources else "")
    first, second = _paths(output, fmt)
    for path in (first, second):
        if path and os.path.dirname(path) and not os.path.isdir(os.path.dirname(path)):
            raise CaffeError("Output directory %s does not exist" % os.path.dirname(path))
    if fmt == "torch":
        _, state = export.export_torch(net, first, second, provenance)
        glog.info("Exported %s as a torch module: %s (code), %s (state_dict, %d tensors)"
                  % (model, first, second, len(state)))
    else:
        export.export_onnx(net, first, opset)
        glog.info("Exported %s as ONNX: %s" % (model, first))
