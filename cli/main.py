"""``trainer``: the command line of Caffe's ``caffe`` tool (train, test, time, device_query).

No training logic lives here: commands parse flags the way ``caffe.cpp`` does, configure the glog
logger, and call layers/ and solvers/. Every error a user can cause ends as one glog ``F`` line
naming the culprit and a non-zero exit; a Python traceback is shown only with ``--debug``.
"""
import functools
import signal
import sys
import traceback

import click

from converters import glog
from converters.errors import CaffeError

EXIT_FATAL = 1
EXIT_INTERNAL = 2


def caffe_option(name, **kwargs):
    """An option spelled ``--name`` and, as Caffe's gflags also accept, ``-name``."""
    return click.option("--" + name, "-" + name, name.replace("-", "_"), **kwargs)


def report_errors(func):
    """Turn errors into Caffe-style fatal lines (and exit codes) instead of tracebacks."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        debug = kwargs.get("debug", False)
        try:
            return func(*args, **kwargs)
        except CaffeError as exc:
            if debug:
                traceback.print_exc()
            glog.log(exc.severity, exc.message, where=exc.where)
            sys.exit(EXIT_FATAL)
        except KeyboardInterrupt:
            glog.log("F", "Interrupted.")
            sys.exit(130)
        except (click.exceptions.Exit, click.exceptions.Abort, SystemExit):
            raise
        except MemoryError:
            glog.log("F", "Out of memory (host). Reduce batch_size.")
            sys.exit(EXIT_FATAL)
        except Exception as exc:  # an internal bug: still one line unless --debug
            if debug:
                traceback.print_exc()
            text = str(exc).strip().splitlines()
            if "out of memory" in str(exc).lower() or "can't allocate memory" in str(exc):
                glog.log("F", "Out of memory on the device: %s. Reduce batch_size." %
                         (text[0] if text else ""))
                sys.exit(EXIT_FATAL)
            glog.log("F", "Internal error (%s: %s). Run again with --debug for the traceback "
                     "and report it." % (type(exc).__name__, text[0] if text else ""))
            sys.exit(EXIT_INTERNAL)
    return wrapper


class CaffeGroup(click.Group):
    """The command group: a command-line mistake (unknown flag, bad flag value, unknown command)
    is one glog ``F`` line and a non-zero exit, like the other user errors (gflags prints one
    ``ERROR: ...`` line for Caffe), instead of click's usage block."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.UsageError as exc:
            if not standalone_mode:
                raise
            no_args = getattr(click.exceptions, "NoArgsIsHelpError", ())
            if no_args and isinstance(exc, no_args):   # bare `trainer`: the help, as caffe does
                exc.show()
                sys.exit(exc.exit_code)
            command = exc.ctx.command_path if exc.ctx is not None else (prog_name or "trainer")
            glog.log("F", "%s (run '%s --help' for the flags)" % (exc.format_message(), command))
            sys.exit(exc.exit_code)
        except click.exceptions.ClickException as exc:
            if not standalone_mode:
                raise
            glog.log("F", exc.format_message())
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            if not standalone_mode:
                raise
            glog.log("F", "Aborted.")
            sys.exit(130)


@click.group(cls=CaffeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="trainer", message="trainer %(version)s")
def main():
    """Train and test Caffe models on PyTorch (a drop-in for the `caffe` tool).

    \b
    commands:
      train           train or finetune a model
      test            score a model
      time            benchmark model execution time
      device_query    show GPU diagnostic information
    """
    glog.configure()


def _register():
    from cli import train, test, timing, device  # noqa: F401  (commands register themselves)
    from cli import annoset  # noqa: F401
    from cli import export  # noqa: F401


def entry():
    """The process entry. Ctrl-C while torch and the layers import, and while the interpreter
    shuts down (atexit hooks of torch and of the data threads), ends the process quietly, as
    it ends Caffe; in between it is a KeyboardInterrupt, which the commands turn into their
    --sigint_effect or one ``F`` line."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    glog.capture_warnings()
    try:
        _register()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        main(prog_name="trainer")
    except KeyboardInterrupt:
        glog.log("F", "Interrupted.")
        sys.exit(130)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL)


if __name__ == "__main__":
    entry()
