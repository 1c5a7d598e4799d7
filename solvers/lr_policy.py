"""Learning-rate policies of Caffe's ``SGDSolver::GetLearningRate`` (and SSD-Caffe's ``plateau``).

Caffe computes the rate in ``Dtype`` (float32) from float32 solver fields, and which parts run in
float and which in double follows C++'s overload rules:

* ``pow(float, float)`` is ``powf`` (``inv``, ``poly``) and ``exp(float)`` is ``expf``
  (``sigmoid``); the surrounding arithmetic is float32.
* ``pow(float, int)`` promotes to ``double pow`` (``step``, ``exp``, ``multistep``, ``plateau``);
  ``base_lr * <double>`` is double, rounded to float when stored in ``rate``.

``powf``/``expf`` are taken from the C library (glibc, as the reference Caffe used) when it can be
loaded, because numpy's float32 ``exp`` differs from glibc's in the last bit often enough to flip
the 6th printed digit (``sgd_sigmoid`` iterations 2 and 37). Every ``lr =`` line of every
reference log is reproduced to the printed digit (tests/test_solvers_updates.py).

Checks happen where Caffe has them: inside ``GetLearningRate``, i.e. on the first ``rate()`` call
(Caffe aborts at iteration 0 after the first forward/backward, not at construction), with glog's
``Check failed: <expr> (<a> vs. <b>) `` text and Caffe's source tag.
"""
import ctypes
import ctypes.util
import math

import numpy as np

from converters import glog
from converters.errors import CaffeError

_f32 = np.float32
_FLT_MAX = float(np.finfo(np.float32).max)

# Source tags of BVLC Caffe 1.0 (commit 9b89154) src/caffe/solvers/sgd_solver.cpp.
_TAG_STEP_STEPSIZE = "sgd_solver.cpp:33"
_TAG_STEP_GAMMA = "sgd_solver.cpp:35"
_TAG_EXP_GAMMA = "sgd_solver.cpp:39"
_TAG_INV_GAMMA = "sgd_solver.cpp:42"
_TAG_MULTISTEP_LOG = "sgd_solver.cpp:50"
_TAG_MULTISTEP_GAMMA = "sgd_solver.cpp:53"
_TAG_SIGMOID_GAMMA = "sgd_solver.cpp:61"
_TAG_SIGMOID_STEPSIZE = "sgd_solver.cpp:62"
_TAG_UNKNOWN = "sgd_solver.cpp:67"
# SSD-Caffe's plateau branch (not in BVLC); tags estimated for SSD's sgd_solver.cpp.
_TAG_PLATEAU_STEP = "sgd_solver.cpp:83"
_TAG_PLATEAU_MIN = "sgd_solver.cpp:90"


def _load_libm():
    for name in (ctypes.util.find_library("m"), "libm.so.6"):
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
            powf, expf = lib.powf, lib.expf
        except (OSError, AttributeError):
            continue
        powf.restype, powf.argtypes = ctypes.c_float, [ctypes.c_float, ctypes.c_float]
        expf.restype, expf.argtypes = ctypes.c_float, [ctypes.c_float]
        return powf, expf
    return None, None


_powf_c, _expf_c = _load_libm()


def powf(x, y):
    """C ``powf`` on float32 values (falls back to double pow rounded to float)."""
    x, y = float(_f32(x)), float(_f32(y))
    if _powf_c is not None:
        return _f32(_powf_c(x, y))
    try:
        return _f32(math.pow(x, y))
    except (OverflowError, ValueError):
        with np.errstate(all="ignore"):
            return _f32(np.power(np.float64(x), np.float64(y)))


def expf(x):
    """C ``expf`` on a float32 value (falls back to double exp rounded to float)."""
    x = float(_f32(x))
    if _expf_c is not None:
        return _f32(_expf_c(x))
    try:
        return _f32(math.exp(x))
    except OverflowError:
        return _f32(np.inf)


def pow_double(x, n):
    """``pow(double(x), double(n))`` as C++ does for ``pow(float, int)`` (the C library's pow)."""
    try:
        return math.pow(float(x), float(n))
    except OverflowError:
        return math.inf
    except ValueError:
        return math.nan


def _cdiv(a, b):
    """C++ integer division (truncates toward zero)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def _fmt(x):
    return glog.format_number(x)


def check_failed(expr, a, b, where, message=""):
    """Raise glog's CHECK failure text: ``Check failed: <expr> (<a> vs. <b>) <message>``."""
    raise CaffeError("Check failed: %s (%s vs. %s) %s" % (expr, _fmt(a), _fmt(b), message),
                     where=where)


class LearningRate:
    """Caffe's SGDSolver::GetLearningRate, all policies: fixed, step, exp, inv, multistep, poly,
    sigmoid, and SSD-Caffe's plateau.

    ``rate(iteration, smoothed_loss)`` is called once per iteration, before the update, as Caffe's
    ``ApplyUpdate`` does (multistep and plateau keep state between calls, as Caffe's
    ``current_step_``). The returned value is a Python float holding Caffe's float32 ``rate``.
    """

    def __init__(self, solver_param):
        self.param = solver_param
        self.policy = solver_param.lr_policy
        self.base_lr = _f32(solver_param.base_lr)
        self.gamma = _f32(solver_param.gamma)
        self.power = _f32(solver_param.power)
        self.stepsize = int(solver_param.stepsize)
        self.stepvalue = [int(v) for v in solver_param.stepvalue]
        self.max_iter = int(solver_param.max_iter)
        self.display = int(solver_param.display)
        self.plateau_winsize = [int(v) for v in getattr(solver_param, "plateau_winsize", ())]
        # Caffe's Solver members saved in .solverstate (SSD adds the plateau ones).
        self.current_step = 0
        self.minimum_loss = _FLT_MAX          # SSD's PreSolve: numeric_limits<float>::max()
        self.iter_last_event = 0

    @property
    def uses_loss(self):
        """Whether ``rate`` reads the smoothed loss (SSD's plateau), so the solver must read the
        loss to the host every iteration."""
        return self.policy == "plateau"

    # -- state (for snapshot / resume) ----------------------------------------------------------
    def state_dict(self):
        return {"current_step": int(self.current_step),
                "minimum_loss": float(self.minimum_loss),
                "iter_last_event": int(self.iter_last_event)}

    def load_state_dict(self, d):
        if "current_step" in d:
            self.current_step = int(d["current_step"])
        if "minimum_loss" in d:
            self.minimum_loss = float(_f32(d["minimum_loss"]))
        if "iter_last_event" in d:
            self.iter_last_event = int(d["iter_last_event"])

    # -- checks ---------------------------------------------------------------------------------
    def _check_gamma(self, where):
        if not self.gamma >= 0:
            check_failed("this->param_.gamma() >= 0", float(self.gamma), 0, where)

    def _check_stepsize(self, where):
        if not self.stepsize > 0:
            check_failed("this->param_.stepsize() > 0", self.stepsize, 0, where)

    # -- the rate -------------------------------------------------------------------------------
    def rate(self, iteration, smoothed_loss=None):
        it = int(iteration)
        pol = self.policy
        b = self.base_lr
        if pol == "fixed":
            rate = b
        elif pol == "step":
            self._check_stepsize(_TAG_STEP_STEPSIZE)
            self.current_step = _cdiv(it, self.stepsize)
            self._check_gamma(_TAG_STEP_GAMMA)
            rate = _f32(float(b) * pow_double(self.gamma, self.current_step))
        elif pol == "exp":
            self._check_gamma(_TAG_EXP_GAMMA)
            rate = _f32(float(b) * pow_double(self.gamma, it))
        elif pol == "inv":
            self._check_gamma(_TAG_INV_GAMMA)
            base = _f32(1) + self.gamma * _f32(it)
            rate = b * powf(base, -self.power)
        elif pol == "multistep":
            if (self.current_step < len(self.stepvalue)
                    and it >= self.stepvalue[self.current_step]):
                self.current_step += 1
                glog.info("MultiStep Status: Iteration %d, step = %d" % (it, self.current_step),
                          where=_TAG_MULTISTEP_LOG)
            self._check_gamma(_TAG_MULTISTEP_GAMMA)
            rate = _f32(float(b) * pow_double(self.gamma, self.current_step))
        elif pol == "poly":
            with np.errstate(all="ignore"):
                base = _f32(1) - (_f32(it) / _f32(self.max_iter))
            rate = b * powf(base, self.power)
        elif pol == "sigmoid":
            self._check_gamma(_TAG_SIGMOID_GAMMA)
            self._check_stepsize(_TAG_SIGMOID_STEPSIZE)
            with np.errstate(all="ignore"):
                arg = -self.gamma * (_f32(it) - _f32(self.stepsize))
                rate = b * (_f32(1) / (_f32(1) + expf(arg)))
        elif pol == "plateau":
            rate = self._plateau(it, smoothed_loss)
        else:
            raise CaffeError("Unknown learning rate policy: %s" % pol, where=_TAG_UNKNOWN)
        return float(_f32(rate))

    def _plateau(self, it, smoothed_loss):
        # SSD-Caffe: an "event" is a new minimum of the smoothed loss or an lr drop; after
        # plateau_winsize[current_step] iterations without one, the lr drops by gamma.
        if smoothed_loss is not None:
            loss = _f32(smoothed_loss)
            if loss < _f32(self.minimum_loss):
                self.minimum_loss = float(loss)
                self.iter_last_event = it
        if self.current_step < len(self.plateau_winsize):
            iter_next_update = self.iter_last_event + self.plateau_winsize[self.current_step]
            if it >= iter_next_update:
                self.current_step += 1
                self.iter_last_event = it
                glog.info("Plateau Status: Iteration %d, step = %d" % (it, self.current_step),
                          where=_TAG_PLATEAU_STEP)
        if (self.display and it % self.display == 0
                and self.iter_last_event > it - self.display):
            glog.info("Plateau Status: Iteration %d, current minimum_loss = %s"
                      % (it, _fmt(float(_f32(self.minimum_loss)))), where=_TAG_PLATEAU_MIN)
        return _f32(float(self.base_lr) * pow_double(self.gamma, self.current_step))
