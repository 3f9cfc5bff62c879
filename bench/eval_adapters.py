"""Validation loss of several adapters on the same rows with the same code.

    python bench/eval_adapters.py --kolora-run RUN --adapter kolora=RUN/adapter --adapter trl=DIR/adapter --out F

Every adapter is scored by kolora's own answer-only loss (`kolora.loss.answer_loss_module`:
mean cross entropy over answer tokens + EOS) on the validation split kolora wrote (`--split test`: its test split), one row at
a time (no padding), with float32 base weights and no autocast, so the numbers do not depend
on either trainer's precision choices. Also scores the base model (adapters disabled) and the
paired standard error of each adapter's difference from the first one (per-row means), as the
noise level for "no worse than"."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kolora-run", required=True)
    ap.add_argument("--adapter", action="append", required=True, help="name=path (PEFT adapter directory)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--split", default="validation", choices=["validation", "test"], help="which of kolora's splits")
    args = ap.parse_args()

    import torch
    from peft import PeftModel

    from kolora.batching import Tokenized, collate
    from kolora.data import read_jsonl
    from kolora.loss import answer_loss_module
    from kolora.models import load_model, resolve
    from kolora.prompt import encode_example
    from kolora.runs import Run

    run = Run(Path(args.kolora_run))
    cfg = run.config()
    src = resolve(cfg.model.name)
    from kolora.models import load_tokenizer

    tokenizer = load_tokenizer(src, cfg.model.trust_remote_code)
    rows = [Tokenized(*encode_example(tokenizer, ex, cfg.data.system_prompt, cfg.data.template))
            for ex in read_jsonl(run.split(args.split))]
    adapters = [a.split("=", 1) for a in args.adapter]
    model = load_model(src, "float32")
    model = PeftModel.from_pretrained(model, adapters[0][1], adapter_name=adapters[0][0])
    for name, path in adapters[1:]:
        model.load_adapter(path, adapter_name=name)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # same float32 numbers, only faster on a GPU
    loss_model = answer_loss_module(model).to(device).eval()

    def per_row() -> list[tuple[float, int]]:
        out = []
        with torch.no_grad():
            for r in rows:
                batch = {k: v.to(device) for k, v in collate([r], tokenizer.pad_token_id, multiple=1).items()}
                loss_sum, n = loss_model(**batch)
                out.append((float(loss_sum), int(n)))
        return out

    scores = {}
    for name, _ in adapters:
        model.set_adapter(name)
        scores[name] = per_row()
    with model.disable_adapter():
        scores["base"] = per_row()

    def mean(s):
        return sum(x for x, _ in s) / sum(n for _, n in s)

    result = {"rows": len(rows), "tokens": sum(n for _, n in scores["base"]), "loss": {k: mean(v) for k, v in scores.items()}}
    ref = adapters[0][0]
    for name, _ in adapters[1:]:
        diffs = [a / n - b / n for (a, n), (b, _) in zip(scores[ref], scores[name])]
        m = sum(diffs) / len(diffs)
        sd = math.sqrt(sum((d - m) ** 2 for d in diffs) / max(len(diffs) - 1, 1))
        result[f"paired_se_{ref}_minus_{name}"] = sd / math.sqrt(len(diffs))
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
