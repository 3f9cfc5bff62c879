"""`kolora models`, `kolora inspect MODEL`, `kolora doctor`: what is available and what this
machine can do. Nothing here trains or changes anything."""

from __future__ import annotations

import os
from pathlib import Path

from .models import inspect_model


def add_models_arguments(p) -> None:
    pass


def run_models(args) -> int:
    from .models import HUB_SUGGESTIONS, PRESETS, cache_root, hub_cached, preset_status

    print(f"offline presets (cache: {cache_root()}):")
    for name, preset in PRESETS.items():
        print(f"  {name:<14} {preset_status(name):<44} {preset.description}")
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    print("hub models (need the network once, then the local Hugging Face cache):")
    for short, repo in HUB_SUGGESTIONS.items():
        state = "cached" if hub_cached(repo) else ("not cached (offline)" if offline else "not cached (downloads on first use)")
        print(f"  {repo:<36} {state}")
    print("configs: " + ", ".join(sorted(f.name[:-5] for f in _configs_dir().glob("*.yaml"))) if _configs_dir() else "")
    return 0


def _configs_dir():
    from pathlib import Path

    here = Path(__file__).resolve().parents[2] / "configs"
    return here if here.is_dir() else None


def add_inspect_arguments(p) -> None:
    p.add_argument("model")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--trust-remote-code", action="store_true")


def run_inspect(args) -> int:
    print(inspect_model(args.model, args.r, args.trust_remote_code))
    return 0


def add_doctor_arguments(p) -> None:
    pass


def run_doctor(args) -> int:
    import importlib.metadata as md
    import platform

    import torch

    from .device import cpu_has_bf16
    from .models import cache_root

    for pkg in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "safetensors", "gguf", "datasets"):
        try:
            version = md.version(pkg)
        except md.PackageNotFoundError:
            version = "not installed"
        print(f"{pkg:<13} {version}")
    print(f"python        {platform.python_version()} ({platform.machine()})")
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    print(f"cpu           {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}, "
          f"ISA {torch.backends.cpu.get_cpu_capability()}")
    print(f"bf16 on cpu   {'yes' if cpu_has_bf16() else 'no'} (avx512_bf16 {'avx512_bf16' in flags}, "
          f"AMX-BF16 {'amx_bf16' in flags})")
    mem_kb = next((int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0) \
        if os.path.exists("/proc/meminfo") else 0
    print(f"RAM           {mem_kb / 2**20:.1f} GiB")
    try:  # the bracketed word is the active mode
        thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        thp = "unknown"
    print(f"huge pages    torch allocator THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}, "
          f"system transparent_hugepage {thp}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            prop = torch.cuda.get_device_properties(i)
            print(f"cuda:{i}        {prop.name}, {prop.total_memory / 2**30:.1f} GiB, bf16 {torch.cuda.is_bf16_supported()}")
    else:
        print("CUDA          not available (CPU training: bf16 autocast where supported)")
    print(f"model cache   {cache_root()} (KOLORA_CACHE)")
    return 0


VERBS = {
    "models": ("list model presets and whether they are available", add_models_arguments, run_models),
    "inspect": ("module summary and suggested LoRA targets of a model", add_inspect_arguments, run_inspect),
    "doctor": ("versions, CPU/GPU features, memory", add_doctor_arguments, run_doctor),
}
