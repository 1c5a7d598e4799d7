"""What every benchmark needs first: the repository on sys.path, CUDA synchronisation, the
machine's name (timing itself: harness.py)."""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def machine():
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return "CPU, %d threads (torch %s)" % (torch.get_num_threads(), torch.__version__)
