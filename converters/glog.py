"""glog-format logging, the log layout Caffe users' scripts parse.

Every line is ``<S><mmdd> <hh:mm:ss.uuuuuu> <tid> <file>:<line>] <text>`` with ``S`` one of
``I``, ``W``, ``E``, ``F``. Where we print the same fact as Caffe we pass Caffe's source tag
(``"solver.cpp:239"``) so a diff against a Caffe log lines up; elsewhere the tag is our own
``module.py:line``. A tag is always ``file:line``: one given without a line (``"caffe.cpp"``) is
replaced by the Python location that logs it, so scripts that split the prefix on ``:`` and
``]`` never meet a short one.

``GLOG_log_year_in_prefix=true`` adds the year as glog 0.6 does; the default is the classic
Caffe-era prefix without it, which is what Caffe users' log parsers expect.
"""
import datetime
import inspect
import os
import re
import sys
import threading

_SEVERITIES = "IWEF"


class _State:
    stream = None          # None -> sys.stderr at call time
    min_level = 0          # GLOG_minloglevel
    year = False
    lock = threading.Lock()


def configure(stream=None, min_level=None, year=None):
    """Set the destination and filtering (the CLI calls this once)."""
    if stream is not None:
        _State.stream = stream
    if min_level is None:       # glog reads it with strtol: a leading integer, else 0
        found = re.match(r"\s*([+-]?\d+)", os.environ.get("GLOG_minloglevel", ""))
        min_level = int(found.group(1)) if found else 0
    _State.min_level = min_level
    if year is None:
        year = os.environ.get("GLOG_log_year_in_prefix", "").lower() in ("1", "true", "yes")
    _State.year = year


_TAG = re.compile(r"^[^ \]:]+:\d+$")


def has_line(where):
    """True for a complete glog tag, ``file:line``."""
    return bool(where) and bool(_TAG.match(where))


def _caller_tag(depth):
    frame = inspect.currentframe()
    for _ in range(depth):
        frame = frame.f_back
    return "%s:%d" % (os.path.basename(frame.f_code.co_filename), frame.f_lineno)


def caller_tag(depth=1):
    """``file.py:line`` ``depth`` frames above the function that calls this (1: its caller)."""
    return _caller_tag(depth + 2)


def prefix(severity, where):
    now = datetime.datetime.now()
    date = now.strftime("%Y%m%d" if _State.year else "%m%d")
    return "%s%s %s.%06d %d %s] " % (severity, date, now.strftime("%H:%M:%S"), now.microsecond,
                                      threading.get_native_id(), where)


def log(severity, message, where=None, _depth=1):
    """Write one glog line per line of ``message`` (Caffe prints multi-line protos the same way)."""
    if _SEVERITIES.index(severity) < _State.min_level:
        return
    if not has_line(where):
        where = _caller_tag(_depth + 1)
    stream = _State.stream or sys.stderr
    head = prefix(severity, where)
    text = str(message)
    # Caffe prints multi-line messages (protos) with the prefix on the first line only.
    if not text.endswith("\n"):      # glog adds the newline only when the text lacks one
        text += "\n"
    with _State.lock:
        stream.write(head + text)
        stream.flush()


def info(message, where=None):
    log("I", message, where, _depth=2)


def warning(message, where=None):
    log("W", message, where, _depth=2)


def error(message, where=None):
    log("E", message, where, _depth=2)


def fatal(message, where=None):
    """Print the single ``F`` line; the caller decides how to exit."""
    log("F", message, where, _depth=2)


def format_number(x):
    """Format a number like C++ ``std::ostream << float`` (precision 6, %g-like), as Caffe prints."""
    if isinstance(x, bool):
        return "1" if x else "0"
    if isinstance(x, int):
        return str(x)
    x = float(x)
    if x != x:
        return "nan"
    if x in (float("inf"), float("-inf")):
        return "inf" if x > 0 else "-inf"
    return "%g" % x


def capture_warnings():
    """Python warnings (numpy's RuntimeWarning, torch's UserWarning) as glog ``W`` lines, tagged
    with the file:line that warned, instead of Python's own two-line format on stderr."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        text = " ".join(str(message).split())
        log("W", "%s: %s" % (category.__name__, text),
            where="%s:%d" % (os.path.basename(filename), lineno))
    warnings.showwarning = show
