"""``trainer train``: Caffe's ``caffe train`` (caffe.cpp train()), same flags and log lines."""
import signal

import click

from cli import devices
from cli.main import caffe_option, main, report_errors
from converters import glog
from converters.errors import CaffeError

EFFECTS = ("stop", "snapshot", "none")


def install_signal_handlers(solver, sigint_effect, sighup_effect):
    """Caffe's SignalHandler: SIGINT -> sigint_effect, SIGHUP -> sighup_effect; SIGTERM is
    treated like SIGINT. The request is acted on at the end of the current iteration."""
    def handler(effect):
        def on_signal(signum, frame):
            if effect != "none":
                solver.request(effect)
        return on_signal
    signal.signal(signal.SIGINT, handler(sigint_effect))
    signal.signal(signal.SIGTERM, handler(sigint_effect))
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, handler(sighup_effect))


def stages_from(stage):
    return [s for s in (stage or "").split(",") if s]


@main.command("train")
@caffe_option("solver", default="", help="The solver definition protocol buffer text file.")
@caffe_option("weights", default="", help="Comma-separated .caffemodel files to finetune from "
              "(cannot be given with --snapshot).")
@caffe_option("snapshot", default="", help="A .solverstate to resume training from.")
@caffe_option("gpu", default="", help="GPU ids to use ('0', '0,1' or 'all'); default: the "
              "solver's solver_mode / device_id, else the CPU.")
@caffe_option("level", default=0, type=int, help="The train net's NetState level.")
@caffe_option("stage", default="", help="Comma-separated NetState stages of the train net.")
@caffe_option("sigint_effect", default="stop", type=click.Choice(EFFECTS),
              help="What SIGINT (and SIGTERM) does: stop (after a snapshot), snapshot, none.")
@caffe_option("sighup_effect", default="snapshot", type=click.Choice(EFFECTS),
              help="What SIGHUP does: snapshot, stop, none.")
@caffe_option("iterations", default=None, type=int, help="Override the solver's max_iter.")
@click.option("--keep-sparsity", is_flag=True, help="Keep weights that are exactly zero in the "
              "loaded caffemodel at zero (pruned models): masks gradients and updates.")
@click.option("--debug", is_flag=True, help="Show Python tracebacks on errors.")
@report_errors
def train(solver, weights, snapshot, gpu, level, stage, sigint_effect, sighup_effect,
          iterations, keep_sparsity, debug):
    """Train or finetune a model (caffe train)."""
    from converters import caffe_pb2
    from converters.prototxt import read_solver
    from solvers.solver import Solver
    if not solver:
        raise CaffeError("Need a solver definition to train.", where="caffe.cpp:174")
    if snapshot and weights:
        raise CaffeError("Give a snapshot to resume training or weights to finetune but not both.",
                         where="caffe.cpp:176")
    param = read_solver(solver)
    param.train_state.level = level
    # caffe.cpp splits the --stage flag on ',' with boost::split, so no flag gives one empty
    # stage (visible in Caffe's logs as `stage: ""`); we keep that exactly.
    for s in (stage or "").split(","):
        param.train_state.stage.append(s)
    if iterations is not None:
        param.max_iter = iterations
    gpu_flag = gpu
    if not gpu_flag and param.HasField("solver_mode") and \
            param.solver_mode == caffe_pb2.SolverParameter.GPU:
        gpu_flag = str(param.device_id) if param.HasField("device_id") else "0"
    device, gpus = devices.select(devices.parse_gpus(gpu_flag))
    if gpus:
        param.device_id = gpus[0]
    if snapshot:
        del param.weights[:]
    elif weights:
        del param.weights[:]
        param.weights.append(weights)
    if len(gpus) > 1:
        from solvers.parallel import train_data_parallel
        return train_data_parallel(param, gpus, snapshot, keep_sparsity)
    trainer = Solver(param, device=device, keep_sparsity=keep_sparsity)
    install_signal_handlers(trainer, sigint_effect, sighup_effect)
    if snapshot:
        glog.info("Resuming from " + snapshot, where="caffe.cpp:235")
        trainer.restore(snapshot)
    glog.info("Starting Optimization", where="caffe.cpp:239")
    trainer.solve()
    glog.info("Optimization Done.", where="caffe.cpp:250")
