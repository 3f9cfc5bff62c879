"""GPU memory cap for every Python process of bench/gpu_check.sh (kolora train, TRL, the evaluation).

bench/gpu_check.sh puts this folder first on PYTHONPATH and sets KOLORA_GPU_CAP_GB, so each
process that can see a GPU gets `torch.cuda.set_per_process_memory_fraction(cap / total)` before
it allocates anything: a run that would not fit an 8 GB card fails with an out-of-memory error on
a bigger one instead of passing. Without the variable, or without a GPU, it does nothing."""

import os

_cap = os.environ.get("KOLORA_GPU_CAP_GB")
if _cap:
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None and torch.cuda.is_available():
        _total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, float(_cap) * 2**30 / _total))
