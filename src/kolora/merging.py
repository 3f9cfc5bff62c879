"""Merging an adapter into its base: a standalone model that stock transformers loads.

The adapter is merged into a full-precision (float32) base — merging into a quantized or
16-bit base is where peers' merged models get worse than their adapters. Then the saved
model is loaded back with plain `AutoModelForCausalLM` and its logits are compared with the
adapter model's on a few prompts. It is written beside --out and renamed in only when done."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .data import Example, read_jsonl
from .errors import KoloraError
from .models import load_model, resolve
from .prompt import encode_prompt
from .runs import claim_output_dir, open_run, swap_in, temp_dir_beside

TOLERANCE = 1e-3  # max |logit difference| in float32
MARKER = "kolora-merge.json"  # marks the folder as a kolora merge and lists what it wrote


def _logits(model, prompts):
    import torch

    with torch.no_grad():
        return [model(input_ids=torch.tensor([p])).logits[0].float() for p in prompts]


def merge(run_path: str, out: str, force: bool = False) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = open_run(run_path)
    out_dir = Path(os.path.abspath(Path(out).expanduser()))
    # --force replaces only a merged model kolora wrote there (kolora-merge.json lists its files)
    replaced = claim_output_dir(out_dir, "merge", force)
    cfg = run.config()
    if cfg.model.quantization != "none":
        print("[kolora] the run trained on a quantized base; merging into the float32 base instead (never into 4/8-bit)")
    tokenizer = AutoTokenizer.from_pretrained(run.tokenizer)
    base = load_model(resolve(cfg.model.name), "float32", "none", cfg.model.trust_remote_code)
    model = PeftModel.from_pretrained(base, run.adapter)
    model.eval()

    questions = [ex.question for ex in read_jsonl(run.split("test"))[:3]] if run.split("test").is_file() else []
    questions = questions or ["전세권의 존속기간은 얼마인가요?"]
    prompts = [encode_prompt(tokenizer, Example(q, ""), cfg.data.system_prompt, cfg.data.template) for q in questions]
    adapter_logits = _logits(model, prompts)

    merged = model.merge_and_unload()
    # Written and checked beside --out, then renamed in: a full disk or a crash leaves the previous
    # merge whole and no half-written float32 model behind.
    work = temp_dir_beside(out_dir)
    try:
        merged.save_pretrained(work)  # safetensors
        tokenizer.save_pretrained(work)
        reloaded = AutoModelForCausalLM.from_pretrained(work, dtype="float32")
        reloaded.eval()
        diffs = [float((a - b).abs().max()) for a, b in zip(adapter_logits, _logits(reloaded, prompts))]
        result = {"run": str(run.path), "base": cfg.model.name, "max_logit_diff": max(diffs),
                  "prompts_checked": len(prompts), "tolerance": TOLERANCE, "ok": max(diffs) <= TOLERANCE,
                  "files": sorted([p.name for p in work.iterdir()] + [MARKER])}
        (work / MARKER).write_text(json.dumps(result, indent=2, ensure_ascii=False))
        swap_in(work, out_dir, replaced, MARKER)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if not result["ok"]:
        raise KoloraError(f"merged model differs from the adapter model: max logit difference {max(diffs):.2e} "
                          f"> {TOLERANCE:g} on {len(prompts)} prompts", "report this with the run's config.yaml")
    print(f"merged model written to {out_dir}: logits equal the adapter model's within {TOLERANCE:g} "
          f"(max difference {max(diffs):.2e} over {len(prompts)} prompts)")
    return result
