"""Speed / memory levers tried on kolora without editing src/: each is a small patch of one
kolora function or constant, applied before `kolora train` runs (see patched_kolora.py).

    python bench/experiments/patched_kolora.py LEVER[,LEVER…] -- train --config … (kolora train flags)

Levers that are plain config flags or environment variables (threads, dtype, batch shape,
gradient checkpointing, allocator) need no patch; bench/experiments/sweep.py lists them all."""

from __future__ import annotations


def _pad_multiple(n: int):
    def patch():
        import kolora.train as t

        # collate's `multiple` default was bound when the function was defined
        t.collate.__defaults__ = (n,)
        t.PAD_MULTIPLE = n
    return patch


def _head_chunk_rows(n: int):
    """Output layer + cross entropy in chunks of n answer rows, the gradient w.r.t. the hidden
    states computed in forward: kolora's default since it paid here (`kolora.train._head_ce`,
    256 rows); this lever changes the chunk size."""
    def patch():
        import kolora.loss as t

        t.HEAD_CHUNK_ROWS = n
    return patch


def _unchunked_head():
    """The plain path: the head's full (answer rows × vocabulary) logits, then cross entropy,
    with autograd keeping them for backward (what kolora did before the chunked head)."""

    def patch():
        import kolora.train as t

        original = t.answer_loss_module

        def answer_loss_module(peft_model):
            module = original(peft_model)
            module.chunked = False
            return module

        t.answer_loss_module = answer_loss_module
    return patch


def _compile(target: str):
    """torch.compile (inductor) of the backbone or of every decoder layer (regional)."""

    def patch():
        import torch

        import kolora.train as t

        original = t.answer_loss_module

        def answer_loss_module(peft_model):
            module = original(peft_model)
            if target == "backbone":
                module.backbone = torch.compile(module.backbone, dynamic=True)
            else:
                for layer in module.backbone.layers:
                    layer.compile(dynamic=True)
            return module

        t.answer_loss_module = answer_loss_module
    return patch


def _mkldnn_off():
    import torch

    torch.backends.mkldnn.enabled = False


def _no_tf32_like_bf16_fp32_matmul():
    """fp32 matmuls allowed to run in bf16 on oneDNN (only matters for float32 runs)."""
    import torch

    torch.backends.mkldnn.matmul.fp32_precision = "bf16"


def _sdpa_math():
    """Attention through the math path instead of the flash CPU kernel."""
    import torch

    torch.backends.cuda.enable_flash_sdp(False)  # has no effect on CPU; kept for symmetry
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sdpa_kernel(SDPBackend.MATH).__enter__()

def _trim_every(n: int):
    """malloc_trim after every n-th optimizer step instead of every one (0: never)."""
    def patch():
        import kolora.device as d
        import kolora.train as t

        if n:
            d.TRIM_EVERY = n
        else:
            t.heap_trimmer = lambda: (lambda: None)
    return patch


def _dropout_per_projection():
    """One LoRA dropout mask per projection (as before session 30): without kolora.models.SHARED_INPUT's grouping
    q/k/v and gate/up each get their own salt, so neither compiled nor eager layers share a mask between them."""
    def patch():
        import kolora.models as m

        m.SHARED_INPUT = {}
    return patch


def _torch_dropout():
    """nn.Dropout as before session 29 (one random number per element)."""
    def patch():
        import kolora.train as t

        t.cpu_lora_dropout = lambda model: 0
    return patch


def _profile_step(step: int = 4):
    """Not a lever: runs optimizer step `step` (1-based) of the real training loop (compiled layers and all) under
    torch.profiler and prints its op table to stderr (and KOLORA_PROFILE_OUT, a Chrome trace, when set)."""
    def patch():
        import os
        import sys

        import torch

        import kolora.train as t

        inner = t.accumulate

        def accumulate(tr, window):
            if tr.state["step"] + 1 != step:
                return inner(tr, window)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                out = inner(tr, window)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=45), file=sys.stderr)
            if os.environ.get("KOLORA_PROFILE_OUT"):
                prof.export_chrome_trace(os.environ["KOLORA_PROFILE_OUT"])
            return out
        t.accumulate = accumulate
    return patch


def _padding_mask():
    """The padding mask passed to the model in training and held-out losses (as before session 32), instead of
    none for right-padded batches (kolora.loss.causal_mask_only)."""
    def patch():
        import kolora.loss as lo

        lo.DROP_RIGHT_PADDING_MASK = False
    return patch


LEVERS = {
    "padding-mask": _padding_mask(),
    "profile-step-4": _profile_step(4),
    "dropout-per-projection": _dropout_per_projection(),
    "torch-dropout": _torch_dropout(),
    "pad1": _pad_multiple(1),
    "pad8": _pad_multiple(8),
    "pad64": _pad_multiple(64),
    "unchunked-head": _unchunked_head(),
    "fused-head-ce": _head_chunk_rows(256),
    "fused-head-ce-64": _head_chunk_rows(64),
    "compile-backbone": _compile("backbone"),
    "compile-layers": _compile("layers"),
    "mkldnn-off": _mkldnn_off,
    "fp32-matmul-as-bf16": _no_tf32_like_bf16_fp32_matmul,
    "sdpa-math": _sdpa_math,
    "trim-every-4": _trim_every(4),
    "trim-every-16": _trim_every(16),
    "no-trim": _trim_every(0),
}


def apply(names: str) -> None:
    for name in [n for n in names.split(",") if n]:
        if name not in LEVERS:
            raise SystemExit(f"unknown lever {name!r}; known: {', '.join(LEVERS)}")
        LEVERS[name]()
