"""A tqdm progress bar for interactive runs: only when stderr is a terminal.

Logs stay glog lines: while the bar is shown, glog writes through ``tqdm.write`` so the bar is
redrawn below them instead of breaking them. Scripts and CI (stderr not a terminal) never see it.
"""
import contextlib
import sys

from converters import glog


class _TqdmStream:
    def __init__(self, bar):
        self.bar = bar

    def write(self, text):
        self.bar.write(text.rstrip("\n"), file=sys.stderr)

    def flush(self):
        sys.stderr.flush()


@contextlib.contextmanager
def progress_bar(solver, enabled=None):
    """Attach a bar to ``solver`` (via its ``iteration_done`` hook) if stderr is a terminal."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield None
        return
    from tqdm import tqdm
    bar = tqdm(total=solver.param.max_iter, initial=solver.iter, unit="iter", file=sys.stderr,
               dynamic_ncols=True, leave=False)
    previous = glog._State.stream
    glog._State.stream = _TqdmStream(bar)

    def advance(s):
        bar.n = s.iter
        bar.refresh()
    solver.hooks.setdefault("iteration_done", []).append(advance)
    try:
        yield bar
    finally:
        solver.hooks["iteration_done"].remove(advance)
        glog._State.stream = previous
        bar.close()
