"""``trainer device_query``: Caffe's ``caffe device_query`` (Caffe::DeviceQuery's lines)."""
import torch

from cli import devices
from cli.main import caffe_option, main, report_errors
from converters import glog
from converters.errors import CaffeError


@main.command("device_query")
@caffe_option("gpu", default="", help="GPU id(s) to query ('0', '0,1' or 'all').")
@report_errors
def device_query(gpu, debug=False):
    """Show diagnostic information for GPUs (caffe device_query)."""
    if not gpu:
        raise CaffeError("Need a device ID to query.", where="caffe.cpp:129")
    if not torch.cuda.is_available():
        raise CaffeError("No CUDA device available: torch %s was built %s" % (
            torch.__version__, "without CUDA" if torch.version.cuda is None else
            "with CUDA %s but sees no GPU" % torch.version.cuda), where="common.cpp:152")
    for g in devices.parse_gpus(gpu):
        if g >= torch.cuda.device_count():
            raise CaffeError("invalid device ordinal %d (%d available)"
                             % (g, torch.cuda.device_count()), where="common.cpp:152")
        glog.info("Querying GPUs %d" % g, where="caffe.cpp:133")
        p = torch.cuda.get_device_properties(g)
        rows = [
            ("Device id:                     ", g),
            ("Major revision number:         ", p.major),
            ("Minor revision number:         ", p.minor),
            ("Name:                          ", p.name),
            ("Total global memory:           ", p.total_memory),
            ("Total shared memory per block: ", getattr(p, "shared_memory_per_block", "n/a")),
            ("Total registers per block:     ", getattr(p, "regs_per_multiprocessor", "n/a")),
            ("Warp size:                     ", getattr(p, "warp_size", 32)),
            ("Maximum threads per block:     ", getattr(p, "max_threads_per_block", "n/a")),
            ("Number of multiprocessors:     ", p.multi_processor_count),
            ("L2 cache size:                 ", getattr(p, "L2_cache_size", "n/a")),
        ]
        for label, value in rows:
            glog.info("%s%s" % (label, value), where="common.cpp:185")
