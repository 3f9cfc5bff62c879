"""The loss-changing levers must not change the loss: compare a patched AnswerLoss with the
original on a small random Gemma-3 (with and without final-logit softcapping).

    python bench/experiments/check_levers.py
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def loss_and_grads(lever: str, softcap, seed: int = 0):
    import levers
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    import kolora.train as t

    importlib.reload(t)
    if lever:
        levers.apply(lever)
    torch.manual_seed(seed)
    config = Gemma3TextConfig(vocab_size=3000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
                              sliding_window=64, final_logit_softcapping=softcap)
    model = Gemma3ForCausalLM(config)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                             target_modules=["q_proj", "v_proj", "down_proj"]))
    for n, p in model.named_parameters():  # LoRA B starts at zero; make the adapter matter
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    loss_model = t.answer_loss_module(model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 3000, (3, 40), generator=g)
    labels = ids.clone()
    labels[:, :15] = -100
    labels[2, 30:] = -100
    mask = torch.ones_like(ids)
    mask[2, 30:] = 0
    loss_sum, n = loss_model(input_ids=ids, attention_mask=mask, labels=labels)
    (loss_sum / n).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return float(loss_sum), grads


def main() -> int:
    ok = True
    for softcap in (None, 30.0):
        ref_loss, ref_grads = loss_and_grads("unchunked-head", softcap)
        for lever in ("", "fused-head-ce-64"):
            loss, grads = loss_and_grads(lever, softcap)
            worst = max(float((grads[k] - ref_grads[k]).abs().max() / (ref_grads[k].abs().max() + 1e-12)) for k in ref_grads)
            good = abs(loss - ref_loss) < 1e-4 * abs(ref_loss) and worst < 1e-3
            ok &= good
            print(f"softcap {softcap}: {lever or 'default (chunked)'}: loss {loss:.6f} vs {ref_loss:.6f}, worst relative grad diff {worst:.2e} "
                  f"{'OK' if good else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
