"""The one exception type of trainer.

Caffe answers a mistake with ``CHECK`` failures (an ``F`` glog line and an abort). We raise
:class:`CaffeError` instead; the CLI turns it into exactly one glog line (``F`` by default) that
names the culprit, and a non-zero exit, without a Python traceback.
"""


class CaffeError(Exception):
    """A user-facing error.

    ``where`` is the Caffe source tag printed in the glog prefix (e.g. ``"net.cpp:497"``) when the
    error corresponds to one of Caffe's own checks; otherwise our module name is used.
    ``severity`` is ``"F"`` (fatal, as Caffe's CHECKs) or ``"E"``.
    """

    def __init__(self, message, where=None, severity="F"):
        super().__init__(message)
        self.message = message
        self.where = where
        self.severity = severity

    def __str__(self):
        return self.message
