"""The one exception type of trainer.

Caffe answers a mistake with ``CHECK`` failures (an ``F`` glog line and an abort). We raise
:class:`CaffeError` instead; the CLI turns it into exactly one glog line (``F`` by default) that
names the culprit, and a non-zero exit, without a Python traceback.
"""


from converters import glog


def _raise_depth(cls):
    """Frames between CaffeError.__init__'s caller and the raise site: one per subclass that
    defines its own ``__init__`` (and calls ``super().__init__``)."""
    depth = 0
    for klass in cls.__mro__:
        if klass is CaffeError:
            break
        if "__init__" in vars(klass):
            depth += 1
    return depth


class CaffeError(Exception):
    """A user-facing error.

    ``where`` is the Caffe source tag printed in the glog prefix (e.g. ``"net.cpp:497"``) when the
    error corresponds to one of Caffe's own checks; otherwise (none given, or one without a line
    number) it is the ``file.py:line`` that raised the error.
    ``severity`` is ``"F"`` (fatal, as Caffe's CHECKs) or ``"E"``.
    """

    def __init__(self, message, where=None, severity="F"):
        super().__init__(message)
        self.message = message
        if not glog.has_line(where):
            where = glog.caller_tag(1 + _raise_depth(type(self)))
        self.where = where
        self.severity = severity

    def __str__(self):
        return self.message
