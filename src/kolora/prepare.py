"""`kolora prepare [PATH]`: check a dataset and show its statistics before training: rows read
and kept (and why not), the split per category, difficulty, token lengths with the model's
tokenizer, Korean characters per token, and rows over data.max_length."""

from __future__ import annotations

from .config import add_config_flags, build_config
from .data import category_table, count_hangul, difficulty_counts, load_splits
from .models import load_tokenizer, resolve
from .prompt import IGNORE, encode_example

HELP = "check a dataset and show its statistics"


def add_arguments(p) -> None:
    p.add_argument("path", nargs="?", help="data file (default: data.path of the config)")
    add_config_flags(p)


def run(args) -> int:
    import statistics

    cfg = build_config(args)
    if args.path:
        cfg.data.path = args.path
    splits, report = load_splits(cfg)
    for line in report:
        print(line)
    examples = [ex for name in ("train", "validation", "test") for ex in splits[name]]
    print(f"split {cfg.data.split} (seed {cfg.data.seed}, stratified by category):")
    for line in category_table(splits):
        print("  " + line)
    diff = difficulty_counts(examples)
    print("difficulty: " + ", ".join(f"{k} {v}" for k, v in sorted(diff.items())))
    tokenizer = load_tokenizer(resolve(cfg.model.name), cfg.model.trust_remote_code)
    tokenized = [encode_example(tokenizer, ex, cfg.data.system_prompt, cfg.data.template) for ex in examples]
    too_long = [ex.line for ex, (ids, _) in zip(examples, tokenized) if len(ids) > cfg.data.max_length]
    lengths = sorted(len(ids) for ids, _ in tokenized)
    answer_tok = sum(sum(1 for x in labels if x != IGNORE) - 1 for _, labels in tokenized)  # minus the EOS
    hangul = sum(count_hangul(ex.answer) for ex in examples)
    p95 = lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))]
    print(f"tokens per example with {cfg.model.name} (prompt + answer + EOS): p50 {statistics.median(lengths):.0f}, "
          f"p95 {p95}, max {lengths[-1]}")
    print(f"Korean characters per answer token: {hangul / max(answer_tok, 1):.2f}")
    print(f"rows over data.max_length={cfg.data.max_length}: {len(too_long)}"
          + (f" (lines {', '.join(map(str, too_long[:10]))}) — they would be dropped; raise data.max_length to keep them"
             if too_long else ""))
    return 0
