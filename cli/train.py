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
    previous = {}
    for name, effect in (("SIGINT", sigint_effect), ("SIGTERM", sigint_effect),
                         ("SIGHUP", sighup_effect)):
        signum = getattr(signal, name, None)
        if signum is not None:
            previous[signum] = signal.signal(signum, handler(effect))
    return previous


def restore_signal_handlers(previous):
    for signum, old in (previous or {}).items():
        signal.signal(signum, old if old is not None else signal.SIG_DFL)


def stages_from(stage):
    """caffe.cpp's get_stages_from_flags: boost::split on ',', so no flag gives one empty stage
    (Caffe's logs show it as `stage: ""`); we keep that exactly so logs diff clean."""
    return (stage or "").split(",")


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
@click.option("--allow-python-layers", is_flag=True, help="Accept nets with Python layers "
              "(refused by default: they would import and run code named by the net file). "
              "Python layers are not implemented, so such nets still stop with a clear error.")
@click.option("--explain-backward", is_flag=True, help="Print, for each layer of the train net, "
              "whether it runs backward and why (which trainable layer below needs its "
              "gradient), and what freezing or moving a trainable layer would save; then train.")
@click.option("--cpu-procs", default=0, type=click.IntRange(min=0), help="Data-parallel "
              "training in N CPU processes (torch.distributed, gloo): each reads its own batch, "
              "so the effective batch is N x batch_size, as `--gpu 0,1,..` with N GPUs.")
@click.option("--amp", default="", type=click.Choice(["", "bf16", "fp16"]), help="Mixed "
              "precision forward (torch.autocast; fp16 with loss scaling on CUDA, bf16 on the "
              "CPU). Not Caffe's arithmetic: the losses are compared with fp32 at the end.")
@click.option("--channels-last", is_flag=True, help="NHWC memory format for 4-D weights and "
              "activations (faster convolutions on tensor cores / oneDNN).")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the layer graph "
              "(falls back to eager, with a W line, if compiling fails).")
@click.option("--tf32", is_flag=True, help="Allow TF32 tensor cores in CUDA convolutions and "
              "matrix products (Ampere and later). Off by default: not Caffe's float32.")
@click.option("--speed-check-iters", default=100, type=click.IntRange(min=0), help="With --amp, "
              "--channels-last, --compile or --tf32: after training, rerun this many first "
              "iterations in fp32 and log how far the losses strayed (0: skip).")
@click.option("--debug", is_flag=True, help="Show Python tracebacks on errors.")
@report_errors
def train(solver, weights, snapshot, gpu, level, stage, sigint_effect, sighup_effect,
          iterations, keep_sparsity, allow_python_layers, explain_backward, cpu_procs, amp,
          channels_last, compile_, tf32, speed_check_iters, debug):
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
    check_solver_early(param)
    param.train_state.level = level
    param.train_state.stage.extend(stages_from(stage))
    if iterations is not None:
        if iterations < 0:
            raise CaffeError("--iterations must be at least 0 (it replaces the solver's "
                             "max_iter; got %d)" % iterations)
        param.max_iter = iterations
    from solvers import parallel
    from solvers.speed import SpeedOptions
    speed = SpeedOptions(amp, channels_last, compile_, speed_check_iters, tf32)
    launched = parallel.env_world()          # under torchrun: RANK / WORLD_SIZE / LOCAL_RANK
    if launched:
        parallel.quiet_unless_root(launched[0])
    gpu_flag = gpu
    if not gpu_flag and param.HasField("solver_mode") and \
            param.solver_mode == caffe_pb2.SolverParameter.GPU:
        gpu_flag = str(param.device_id) if param.HasField("device_id") else "0"
    device, gpus = devices.select(devices.parse_gpus(gpu_flag))
    if gpus:
        param.device_id = gpus[0]
    if device.type == "cuda" or launched:
        from solvers.speed import configure_tf32
        configure_tf32(tf32)          # Caffe's float32: no TF32 unless asked for
    if snapshot:
        del param.weights[:]
    elif weights:
        del param.weights[:]
        param.weights.append(weights)
    if launched:
        return parallel.train_from_env(param, gpus, snapshot, keep_sparsity, speed,
                                       sigint_effect, sighup_effect, explain_backward)
    if len(gpus) > 1 or cpu_procs > 1:
        if len(gpus) > 1 and cpu_procs:
            raise CaffeError("Give either several GPUs (--gpu) or --cpu-procs, not both.")
        if cpu_procs > 1 and gpus:
            raise CaffeError("--cpu-procs trains on the CPU; leave out --gpu (and solver_mode: "
                             "GPU) or use --gpu 0,1,.. for one process per GPU.")
        return parallel.train_data_parallel(param, gpus, snapshot, keep_sparsity,
                                            cpu_procs=cpu_procs, speed=speed,
                                            sigint_effect=sigint_effect,
                                            sighup_effect=sighup_effect, debug=debug,
                                            explain_backward=explain_backward)
    if speed.active():
        from solvers import speed as speed_modes
        rng = speed_modes.capture_rng(device)
    from layers import net as net_module
    net_module.ALLOW_PYTHON_LAYERS = bool(allow_python_layers)
    try:
        # resuming: the masks come from the restored weights, not from the fillers
        trainer = Solver(param, device=device, keep_sparsity=keep_sparsity and not snapshot)
    finally:
        net_module.ALLOW_PYTHON_LAYERS = False
    if explain_backward:
        from layers.explain import log_table
        log_table(trainer.net)
    previous = install_signal_handlers(trainer, sigint_effect, sighup_effect)
    try:
        if snapshot:
            glog.info("Resuming from " + snapshot, where="caffe.cpp:235")
            trainer.restore(snapshot)
            if keep_sparsity:
                trainer.keep_zeros()
        if speed.active():
            speed_modes.apply(trainer, speed)
        glog.info("Starting Optimization", where="caffe.cpp:239")
        from cli.progress import progress_bar
        with progress_bar(trainer):
            trainer.solve()
    finally:
        restore_signal_handlers(previous)
    glog.info("Optimization Done.", where="caffe.cpp:250")
    if speed.active() and speed.check_iters and not trainer.requested_early_exit:
        state = trainer.speed_state
        speed_modes.release(trainer)
        del trainer
        speed_modes.report_after_training(state, param, device, rng, snapshot, keep_sparsity)


def check_solver_early(param):
    """Checks Caffe makes only once training runs (solver factory, first learning rate), done
    before any net is built, so that a typo does not cost the time of loading the nets."""
    from solvers.updates import _REGISTRY, solver_type
    kind = solver_type(param)
    if kind not in _REGISTRY:
        import difflib
        near = difflib.get_close_matches(kind, list(_REGISTRY), n=2, cutoff=0.5)
        raise CaffeError("Check failed: registry.count(type) == 1 (0 vs. 1) Unknown solver type: "
                         "%s%s (known types: %s)" % (
                             kind, (" (did you mean %s?)" % " or ".join(near)) if near else "",
                             ", ".join(sorted(_REGISTRY))), where="solver_factory.hpp:76")
    policies = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid", "plateau")
    if param.lr_policy not in policies:
        raise CaffeError("Unknown learning rate policy: %s (known policies: %s)"
                         % (param.lr_policy, ", ".join(policies)), where="sgd_solver.cpp:67")
