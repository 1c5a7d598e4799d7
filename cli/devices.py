"""Caffe's device selection: ``--gpu`` (N, 0,1 or all), solver_mode / device_id.

Without CUDA a GPU request falls back to the CPU with one warning line.
"""
import torch

from converters import glog
from converters.errors import CaffeError


def parse_gpus(flag):
    """Caffe's get_gpus: '' -> [], 'all' -> every device, '0,1' -> [0, 1]."""
    if not flag:
        return []
    if flag == "all":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return list(range(n)) if n else [0]
    try:
        return [int(x) for x in flag.split(",") if x.strip() != ""]
    except ValueError:
        raise CaffeError("--gpu must be 'all' or a comma-separated list of device ids, got '%s'"
                         % flag, where="caffe.cpp:93")


def select(gpus, where_cpu="caffe.cpp:197"):
    """Log Caffe's device line and return (torch.device, gpu list actually used)."""
    if gpus and not torch.cuda.is_available():
        glog.warning("GPU %s requested but CUDA is not available (torch %s without CUDA or no "
                     "device): running on the CPU." % (",".join(map(str, gpus)),
                                                        torch.__version__), where="caffe.cpp:105")
        gpus = []
    if not gpus:
        glog.info("Use CPU.", where=where_cpu)
        return torch.device("cpu"), []
    count = torch.cuda.device_count()
    for g in gpus:
        if g < 0 or g >= count:
            raise CaffeError("Check failed: error == cudaSuccess (101 vs. 0) invalid device "
                             "ordinal: GPU %d requested, %d available" % (g, count),
                             where="common.cpp:152")
    from solvers.speed import configure_tf32
    configure_tf32(False)       # Caffe's float32 in every command; `train --tf32` opts in
    glog.info("Using GPUs " + ", ".join(map(str, gpus)), where="caffe.cpp:213")
    for g in gpus:
        props = torch.cuda.get_device_properties(g)
        glog.info("GPU %d: %s" % (g, props.name), where="caffe.cpp:218")
    torch.cuda.set_device(gpus[0])
    return torch.device("cuda", gpus[0]), gpus
