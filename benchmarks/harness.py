"""What the trainer-vs-hand-written benchmarks share: flags, nets from prototxt text, Caffe's SGD
for hand-written params, and the report lines."""
import argparse
import os
import statistics
import time

import torch

import common  # noqa: F401  (puts the repository root on sys.path)
from common import machine, sync
from converters import caffe_pb2
from converters.prototxt import parse_text

ROOT_SEEDS = os.environ.get("TRAINER_SEEDS") or os.path.join(
    os.path.dirname(common.ROOT), "shared", "seeds")

SGD = 'base_lr: 0.01 momentum: 0.9 weight_decay: 0.0005 lr_policy: "fixed" type: "SGD"'


def parser(doc, batch_cpu, batch_gpu, iters_cpu=5, iters_gpu=50):
    ap = argparse.ArgumentParser(description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None,
                    help="batch size (default %d on the CPU, %d on CUDA)" % (batch_cpu, batch_gpu))
    ap.add_argument("--iters", type=int, default=None,
                    help="iterations per trial (default %d on the CPU, %d on CUDA)"
                    % (iters_cpu, iters_gpu))
    ap.add_argument("--trials", type=int, default=None,
                    help="interleaved trials, median (default 3 on the CPU, 5 on CUDA)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed steps first (default 1 on the CPU, 5 on CUDA)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.set_defaults(_defaults=(batch_cpu, batch_gpu, iters_cpu, iters_gpu))
    return ap


def finish_args(args):
    batch_cpu, batch_gpu, iters_cpu, iters_gpu = args._defaults
    cuda = torch.device(args.device).type == "cuda"
    if args.batch is None:
        args.batch = batch_gpu if cuda else batch_cpu
    if args.iters is None:
        args.iters = iters_gpu if cuda else iters_cpu
    if args.trials is None:
        args.trials = 5 if cuda else 3
    if args.warmup is None:
        args.warmup = 5 if cuda else 1
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = torch.device(args.device)
    return args


def net_from_text(text, phase="TRAIN"):
    from layers.net import Net
    return Net(parse_text(text, caffe_pb2.NetParameter(), "bench"), phase, log=False)


def trainer_step(net, feed, solver_text=SGD, lr=0.01):
    """Net.run + Caffe's SGD update (solvers/updates.py), as the Solver's inner loop does."""
    from solvers.updates import make_update
    update = make_update(parse_text(solver_text, caffe_pb2.SolverParameter(), "solver"),
                         net.learnable_params)
    params = [p.tensor for p in net.learnable_params]

    def step():
        for p in params:
            p.grad = None
        loss = net.run(inputs=feed)
        loss.backward()
        update.apply(lr, 0)
    return step


def forward_only(net, feed):
    def step():
        with torch.no_grad():
            net.run(inputs=feed)
    return step


def caffe_sgd(params_mults, lr=0.01, momentum=0.9, weight_decay=0.0005):
    """Caffe's SGD for hand-written params: v = m v + lr*mult*(g + wd*decay_mult*w); w -= v.
    ``params_mults``: [(param, lr_mult, decay_mult)]; params without grad are skipped. Written
    as a good torch user would: a few ``torch._foreach_*`` launches per group of equal
    multipliers (as torch.optim.SGD's default), not a Python loop per param."""
    groups = {}
    for p, m, d in params_mults:
        if p.requires_grad and m:
            groups.setdefault((m, d), []).append(p)
    groups = [(m, d, ps, [torch.zeros_like(p) for p in ps]) for (m, d), ps in groups.items()]

    def update():
        with torch.no_grad():
            for m, d, ps, history in groups:
                grads = [p.grad for p in ps]
                if d:
                    step = torch._foreach_mul(ps, weight_decay * d)
                    torch._foreach_add_(step, grads)
                else:
                    step = grads
                torch._foreach_mul_(history, momentum)
                torch._foreach_add_(history, step, alpha=lr * m)
                torch._foreach_sub_(ps, history)
    return update


def hand_step(module_loss, params_mults, lr=0.01):
    update = caffe_sgd(params_mults, lr)
    params = [p for p, _, _ in params_mults]

    def step():
        for p in params:
            p.grad = None
        loss = module_loss()
        loss.backward()
        update()
    return step


def count_ops(step):
    """Top-level aten ops (each a kernel launch or more on a GPU) of one call of ``step``: a
    figure that, unlike time on a shared machine, does not move between runs."""
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and (
        e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def compare(named_steps, iters, trials, warmup, device):
    """Interleaved trials; {name: (median wall s/iter, median process CPU s/iter)}. On a busy
    machine the CPU time (with --threads 1) is the steadier figure of the two."""
    for _, step in named_steps:
        for _ in range(warmup):
            step()
    wall = {name: [] for name, _ in named_steps}
    cpu = {name: [] for name, _ in named_steps}
    for _ in range(trials):
        for name, step in named_steps:
            sync(device)
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(iters):
                step()
            sync(device)
            wall[name].append((time.perf_counter() - w0) / iters)
            cpu[name].append((time.process_time() - c0) / iters)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name]))
            for name, _ in named_steps}


def report(title, results, batch, baseline=None, out=print):
    out("%s on %s" % (title, machine()))
    cuda = torch.cuda.is_available()
    for name, (sec, cpu) in results.items():
        extra = "" if cuda else "  (CPU time %9.3f ms/iter)" % (cpu * 1000)
        out("  %-34s %9.3f ms/iter  %9.1f images/s%s" % (name, sec * 1000, batch / sec, extra))
    if baseline:
        for name, ref in baseline:
            line = "  ratio %s / %s: %.3f" % (name, ref, results[name][0] / results[ref][0])
            if not cuda:
                line += " (CPU time: %.3f)" % (results[name][1] / results[ref][1])
            out(line)


def run(named_steps, args):
    return compare(named_steps, iters=args.iters, trials=args.trials, warmup=args.warmup,
                   device=args.device)
