"""What the hardware decides, decided once: the compute precision, torch.compile of the decoder
layers, heap trimming, memory readings, training FLOPs and the measured matmul peak that MFU
is taken against.

Precision is chosen in exactly one function, `choose_precision`; training, chat, eval, serve,
merge and the estimator all ask it, so a model is never trained in one dtype and evaluated as
if it were another.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from .errors import KoloraError

PRECISIONS = ("auto", "bf16", "fp16", "no")


def cpu_has_bf16() -> bool:
    return cpu_class() in ("amx", "avx512_bf16")


def cpu_class() -> str:
    """What bf16 matmuls run on: 'amx' (Intel AMX tiles), 'avx512_bf16' (AVX-512 BF16 without
    AMX, e.g. AMD EPYC Zen 4) or 'other' (no bf16 instructions, or no /proc/cpuinfo)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "other"
    return "amx" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else "other"


@dataclass(frozen=True)
class Precision:
    mixed: str  # accelerate's mixed_precision: bf16, fp16 or no
    weights: str  # dtype the frozen base weights are held in: bfloat16, float16 or float32


def choose_precision(requested: str = "auto", weights: str = "auto", *, training: bool = True,
                     cuda: bool | None = None, cuda_bf16: bool | None = None) -> Precision:
    """The one place precision is chosen.

    `requested` is train.mixed_precision (auto picks bf16 where the CPU (AVX-512 BF16 / AMX) or
    GPU supports it, fp16 on an older GPU, else no); `weights` is model.dtype. `cuda` says which
    device it is for (default: whether this machine has one), `cuda_bf16` whether that GPU does
    bf16 (default: ask it; the estimator passes True for a GPU that is not here).

    Training holds frozen weights in bf16 under bf16 (half the memory, and autocast need not
    cast them every step) and in float32 otherwise (fp16 training keeps float32 weights for
    the grad scaler). Inference (chat, eval, serve) holds them in the compute dtype."""
    import torch

    if requested not in PRECISIONS:
        raise KoloraError(f"train.mixed_precision '{requested}' is not one of auto, bf16, fp16, no")
    if cuda is None:
        cuda = torch.cuda.is_available()
    if requested != "auto":
        mixed = requested
    elif cuda:
        if cuda_bf16 is None:
            cuda_bf16 = torch.cuda.is_bf16_supported()
        mixed = "bf16" if cuda_bf16 else "fp16"
    else:
        mixed = "bf16" if cpu_has_bf16() else "no"
    if weights == "auto":
        if training:
            weights = "bfloat16" if mixed == "bf16" else "float32"
        else:
            weights = {"bf16": "bfloat16", "fp16": "float16", "no": "float32"}[mixed]
    return Precision(mixed, weights)


def inference_dtype() -> str:
    """The dtype chat, eval and serve load a model in."""
    return choose_precision(training=False).weights


def autocast_for(model):
    """Autocast to the dtype the model's weights are held in (no-op in float32)."""
    import torch

    p = next(model.parameters())
    if p.dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(p.device.type, dtype=p.dtype)
    return nullcontext()


# --------------------------------------------------------------------------- memory readings
def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def meminfo() -> dict:
    try:
        with open("/proc/meminfo") as f:
            return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    except OSError:
        return {}


def current_rss() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def is_oom(e: BaseException) -> bool:
    import torch

    if isinstance(e, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def allocator_defaults() -> None:
    """Process-wide settings of torch's CPU allocator; they take effect only if set before torch
    allocates anything, so `kolora`'s entry point calls this first (a value the user set wins).

    THP_MEM_ALLOC_ENABLE=1: blocks of 2 MB or more are 2 MB-aligned and madvise()d for transparent
    huge pages (Linux THP in "madvise" or "always" mode; a no-op under "never" or elsewhere).
    Measured on the demo preset, 20 steps, two runs each (bench/HISTORY.md, Intel Xeon with AMX):
    peak RSS 3,945 / 3,794 MB → 3,286 / 3,303 MB at 383 / 383 → 377 / 394 tokens/s."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


TRIM_EVERY = 1  # optimizer steps between two malloc_trim calls (bench lever trim-every-N)


def heap_trimmer():
    """A function that hands freed heap memory back to the OS (glibc's malloc_trim) on every
    TRIM_EVERY-th call, or a no-op.

    Every micro-batch has another shape, so glibc's heap fills with free holes that no later
    request fits: on the gemma3-270m demo resident memory crept from 2.6 to 4.2 GB over 174
    steps while live memory stayed flat. Trimming once per optimizer step slows that creep (peak
    3.56 GB at step 175 and 3.67 GB at step 290 of a 5-epoch run, against 4.23 GB at step 174
    without). The call takes ~0.1 ms, but the next step faults its pages in again: steady-state
    tokens/s measured ~13% lower. Every 16 steps was measured on the grounded demo preset (AMD EPYC):
    +5.8% tokens/s but +536 MB peak RSS, so every step stays (bench/HISTORY.md)."""
    import ctypes
    import ctypes.util
    import itertools
    import sys

    if not sys.platform.startswith("linux"):
        return lambda: None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # musl and other libcs have no malloc_trim
        return lambda: None
    trim.argtypes = [ctypes.c_size_t]
    calls = itertools.count(1)
    return lambda: trim(0) if next(calls) % TRIM_EVERY == 0 else None


# --------------------------------------------------------------------------- torch.compile
def decoder_layers(model) -> list:
    """The repeated blocks of a causal LM (Llama/Gemma/Phi: model.layers, GPT-2: transformer.h)."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(causal, causal.base_model_prefix, causal)
    for name in ("layers", "h", "blocks"):
        layers = getattr(backbone, name, None)
        if layers is not None and len(layers):
            return list(layers)
    return []


COMPILE_MIN_PARAMS = 50e6  # below this the minute of compiling costs more than it saves


def resolve_compile(cfg, use_cuda: bool, n_params: int) -> tuple[bool, str]:
    """(compile?, why). auto compiles on a CPU with a C++ compiler (inductor writes C++) for an
    unquantized model of at least 50M parameters without gradient checkpointing; measured on
    gemma3-270m: +46% tokens/s and 0.8 GB less peak RSS, for about a minute of compiling."""
    value = str(cfg.train.compile).lower()
    if value in ("no", "false", "off", "0"):
        return False, "off (train.compile)"
    if value not in ("auto", "yes", "true", "on", "1"):
        raise KoloraError(f"train.compile '{cfg.train.compile}' is not one of auto, true, false")
    if value != "auto":
        return True, "on (train.compile)"
    if use_cuda:
        return False, "off (auto: not measured on GPUs yet; --train.compile true to try)"
    if cfg.model.quantization != "none" or cfg.train.gradient_checkpointing:
        return False, "off (auto: quantized or gradient checkpointing)"
    if n_params < COMPILE_MIN_PARAMS:
        return False, f"off (auto: a small model, {n_params / 1e6:.0f}M parameters)"
    if not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")):
        return False, "off (auto: no C++ compiler found; install g++ for faster CPU training)"
    return True, "on (auto)"


def resolve_attention(cfg) -> tuple[str | None, str]:
    """(attention implementation to set, or None to keep the model's; why).

    auto keeps the model's own (SDPA). transformers' eager attention, which inductor compiles into
    two batched matmuls and one fused softmax, was measured on the Gemma-3 demo preset (AMD EPYC,
    20 steps, bench/HISTORY.md session 32): +10% tokens/s in one pair of runs, −3% in another,
    and +240 MB of peak RSS in both (it saves the probabilities, which grow with the square of
    the length), so it is not the default; `train.attention eager` tries it."""
    value = str(cfg.train.attention).lower()
    if value in ("sdpa", "eager"):
        return value, f"{value} (train.attention)"
    if value != "auto":
        raise KoloraError(f"train.attention '{cfg.train.attention}' is not one of auto, sdpa, eager",
                          "set --train.attention auto, sdpa or eager")
    return None, "the model's own (auto)"


class CompiledLayers:
    """torch.compile each decoder layer in place (parameter names unchanged, so adapters and
    checkpoints look the same), with a switch back to eager: evaluation and generation would
    otherwise compile new graphs (no grad, KV cache) for a few forward passes."""

    def __init__(self, model):
        import torch

        # A layer inductor cannot compile runs eagerly instead of failing the run.
        torch._dynamo.config.suppress_errors = True
        self.layers = decoder_layers(model)
        for layer in self.layers:
            layer.compile(dynamic=True)

    @contextlib.contextmanager
    def eager(self):
        import torch

        with torch.compiler.set_stance("force_eager"):
            yield

    def off(self) -> None:
        import torch

        torch.compiler.set_stance("force_eager")


# --------------------------------------------------------------------------- FLOPs and the matmul peak
def matmul_peak_gflops(dtype_name: str, seconds: float = 0.3, device: str = "cpu") -> float:
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype_name, torch.float32)
    n = 1024 if device == "cpu" else 4096
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b  # warm-up
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    sync()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
        sync()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def train_flops(model, tokens: int, answer_tokens: int, seq_len: float, lora_params: int,
                backward_layers: int = 0) -> float:
    """FLOPs of one training pass over `tokens` (frozen base, LoRA trained).

    Per token: 4·N for the frozen body (forward 2N + activation gradients 2N; no weight
    gradients), 6·N_lora for the adapters (they also get weight gradients), and attention
    4·layers·seq·d_attn forward, twice that backward. The output layer (2·V·d forward +
    2·V·d backward) runs only at answer positions. With adapters on the top `backward_layers`
    only (lora.layers; 0 = all), the backward runs through those layers alone, so the body's
    activation gradients and the attention backward shrink by that share: MFU counts only the
    arithmetic that was done."""
    config = model.config
    emb = model.get_input_embeddings().weight
    vocab, hidden = emb.shape
    n_body = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n) - emb.numel()
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1)
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    share = min(backward_layers, layers) / layers if backward_layers and layers else 1.0
    attention = 4 * layers * seq_len * heads * head_dim * (1 + 2 * share)
    return tokens * (2 * n_body * (1 + share) + 6 * lora_params + attention) + answer_tokens * 4 * vocab * hidden
