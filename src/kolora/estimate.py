"""Rough plan for `kolora train --dry-run`: memory and time before any training step.

Memory: base weights in their dtype + LoRA weights, gradients and AdamW moments (fp32, 16
bytes per parameter) + activations (~34·hidden bytes per token per layer in 16-bit, the
Megatron rule of thumb) + answer-position logits. Time: `train_flops` per token (the same
formula the training loop logs MFU with), at an assumed MFU (calibrated on the demo) of a matmul peak measured here in the compute dtype."""

from __future__ import annotations

import time


# Calibrated on the demo run (Gemma-3 270M, 2 cores, bf16): measured MFU ~12%, RSS 4.6 GB.
MFU_ASSUMED = 0.12
RUNTIME_BYTES = 1.2e9


def matmul_peak_gflops(dtype_name: str, seconds: float = 0.3) -> float:
    import torch

    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    n = 1024
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def train_flops(model, tokens: int, answer_tokens: int, seq_len: float, lora_params: int) -> float:
    """FLOPs of one training pass over `tokens` (frozen base, LoRA trained).

    Per token: 4·N for the frozen body (forward 2N + activation gradients 2N; no weight
    gradients), 6·N_lora for the adapters (they also get weight gradients), and attention
    4·layers·seq·d_attn forward, twice that backward. The output layer (2·V·d forward +
    2·V·d backward) runs only at answer positions."""
    config = model.config
    emb = model.get_input_embeddings().weight
    vocab, hidden = emb.shape
    n_body = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n) - emb.numel()
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1)
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    attention = 3 * 4 * layers * seq_len * heads * head_dim
    return tokens * (4 * n_body + 6 * lora_params + attention) + answer_tokens * 4 * vocab * hidden


def plan_lines(cfg, src, train_data, total_steps: int, precision: str) -> list[str]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(src.path, trust_remote_code=cfg.model.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    from .models import lora_param_count, target_modules

    n_params = sum(p.numel() for p in model.parameters())
    hidden = model.get_input_embeddings().weight.shape[1]
    vocab = config.vocab_size
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 12)
    lora = lora_param_count(model, target_modules(model, cfg.lora.target_modules), cfg.lora.r)
    bytes_w = {"4bit": 0.56, "8bit": 1.0}.get(cfg.model.quantization, 2 if precision in ("bf16", "fp16") else 4)
    seq = max(len(t.input_ids) for t in train_data)
    tok_step = cfg.train.batch_size * seq
    all_tokens = sum(len(t.input_ids) for t in train_data)
    ans_frac = sum(t.answer_tokens for t in train_data) / max(1, all_tokens)
    act = tok_step * layers * hidden * 34 * (1 if precision in ("bf16", "fp16") else 2)
    if cfg.train.gradient_checkpointing:
        act /= 8  # only layer inputs are kept
    logits = tok_step * ans_frac * vocab * 10
    # Loading casts from the float32 checkpoint, so float32 weights exist for a moment; the
    # runtime (python, torch, tokenizer, oneDNN caches) is ~1.2 GB on CPU, measured on the demo.
    load = n_params * 4 if bytes_w < 4 else 0
    mem = n_params * bytes_w + lora * 16 + act + logits + load + RUNTIME_BYTES
    mean_len = all_tokens / max(len(train_data), 1)
    tokens_total = total_steps * cfg.train.grad_accum * cfg.train.batch_size * mean_len
    flops_tok = train_flops(model, 1, ans_frac, mean_len, lora)  # the formula MFU is logged with
    peak = matmul_peak_gflops(precision)
    seconds = tokens_total * flops_tok / (MFU_ASSUMED * peak * 1e9)
    return [
        f"estimate: {n_params / 1e6:.0f} M base parameters ({bytes_w:g} bytes each), {lora / 1e6:.2f} M LoRA",
        f"estimate: peak memory ≈ {mem / 2**30:.1f} GiB (weights {n_params * bytes_w / 2**30:.2f}, activations {act / 2**30:.2f}, "
        f"logits {logits / 2**30:.2f}, load {load / 2**30:.2f}, runtime {RUNTIME_BYTES / 2**30:.2f})",
        f"estimate: ≈ {tokens_total:,.0f} tokens, {flops_tok / 1e9:.2f} GFLOP/token, matmul peak here {peak:.0f} GFLOP/s "
        f"at ~{100 * MFU_ASSUMED:.0f}% MFU → roughly {seconds / 60:.1f} min of training",
        "dry run: nothing was trained",
    ]
