"""``trainer time``: Caffe's ``caffe time``: per-layer forward/backward times, averaged.

Timing is synchronised on CUDA. The backward time of a layer that needs no backward (frozen,
below the first trainable layer) is what it costs: nothing.
"""
import time

import click

from cli import devices
from cli.main import caffe_option, main, report_errors
from cli.train import stages_from
from converters import glog
from converters.errors import CaffeError


def _fmt(x):
    return glog.format_number(x)


@main.command("time")
@caffe_option("model", default="", help="The model definition protocol buffer text file.")
@caffe_option("weights", default="", help="Optional .caffemodel to load.")
@caffe_option("iterations", default=50, type=int, help="The number of iterations to time.")
@caffe_option("gpu", default="", help="GPU id to use.")
@caffe_option("phase", default="TRAIN", type=click.Choice(["TRAIN", "TEST"]),
              help="Network phase (TRAIN or TEST).")
@caffe_option("level", default=0, type=int, help="The NetState level.")
@caffe_option("stage", default="", help="Comma-separated NetState stages.")
@click.option("--explain-backward/--no-explain-backward", default=True, show_default=True,
              help="Print why each layer runs backward and what it costs (FLOP estimates before "
              "the benchmark, measured savings after it).")
@click.option("--debug", is_flag=True, help="Show Python tracebacks on errors.")
@report_errors
def time_command(model, weights, iterations, gpu, phase, level, stage, explain_backward, debug):
    """Benchmark model execution time (caffe time)."""
    from layers.net import Net
    from layers.profile import LayerwiseRunner, _sync
    if not model:
        raise CaffeError("Need a model definition to time.", where="caffe.cpp:345")
    if iterations < 1:
        raise CaffeError("--iterations must be at least 1", where="caffe.cpp:345")
    device, _ = devices.select(devices.parse_gpus(gpu), where_cpu="caffe.cpp:356")
    net = Net(model, phase, level=level, stages=stages_from(stage))
    if weights:
        net.copy_from(weights)
    net.to(device)
    runner = LayerwiseRunner(net)
    if explain_backward:
        from layers.explain import log_table
        log_table(net)
    glog.info("Performing Forward", where="caffe.cpp:364")
    data, graphs = runner.forward()
    glog.info("Initial loss: %s" % _fmt(runner.loss(data)), where="caffe.cpp:367")
    glog.info("Performing Backward", where="caffe.cpp:368")
    runner.backward(graphs)
    n = len(net.layer_modules)
    fwd, bwd = [0.0] * n, [0.0] * n
    forward_time = backward_time = 0.0
    glog.info("*** Benchmark begins ***", where="caffe.cpp:380")
    glog.info("Testing for %d iterations." % iterations, where="caffe.cpp:381")
    _sync(device)
    total_start = time.perf_counter()
    for j in range(iterations):
        for p in net.parameters():
            p.grad = None
        it_start = time.perf_counter()
        data, graphs = runner.forward(fwd)
        t1 = time.perf_counter()
        runner.backward(graphs, bwd)
        _sync(device)
        t2 = time.perf_counter()
        forward_time += t1 - it_start
        backward_time += t2 - t1
        glog.info("Iteration: %d forward-backward time: %s ms." % (
            j + 1, _fmt(int((t2 - it_start) * 1000))), where="caffe.cpp:399")
    total_ms = (time.perf_counter() - total_start) * 1000
    glog.info("Average time per layer: ", where="caffe.cpp:402")
    for li, name in enumerate(net.layer_names):
        glog.info("%10s\tforward: %s ms." % (name, _fmt(fwd[li] * 1000 / iterations)),
                  where="caffe.cpp:405")
        glog.info("%10s\tbackward: %s ms." % (name, _fmt(bwd[li] * 1000 / iterations)),
                  where="caffe.cpp:408")
    glog.info("Average Forward pass: %s ms." % _fmt(forward_time * 1000 / iterations),
              where="caffe.cpp:411")
    glog.info("Average Backward pass: %s ms." % _fmt(backward_time * 1000 / iterations),
              where="caffe.cpp:413")
    glog.info("Average Forward-Backward: %s ms." % _fmt(total_ms / iterations),
              where="caffe.cpp:415")
    glog.info("Total Time: %s ms." % _fmt(total_ms), where="caffe.cpp:417")
    glog.info("*** Benchmark ends ***", where="caffe.cpp:418")
    if explain_backward:
        log_table(net, [t / iterations for t in bwd], summary_only=True)
