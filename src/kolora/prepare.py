"""`kolora prepare [PATH]`: check a dataset and show its statistics before training: rows read
and kept (and why not), the split per category, difficulty, token lengths with the model's
tokenizer, Korean characters per token, and rows over data.max_length."""

from __future__ import annotations

from . import grounding
from .config import add_config_flags, build_config
from .data import category_table, count_hangul, difficulty_counts, load_splits
from .models import load_tokenizer, resolve
from .prompt import IGNORE, encode_example
from .retrieval import recall_ks

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
    if grounding.corpus_paths(cfg):
        examples = ground(cfg, splits, tokenizer)
    tokenized = [encode_example(tokenizer, ex, cfg.data.system_prompt, cfg.data.template) for ex in examples]
    too_long = [ex.line for ex, (ids, _) in zip(examples, tokenized) if len(ids) > cfg.data.max_length]
    lengths = sorted(len(ids) for ids, _ in tokenized)
    answer_tok = sum(sum(1 for x in labels if x != IGNORE) - 1 for _, labels in tokenized)  # minus the EOS
    hangul = sum(count_hangul(ex.answer) for ex in examples)
    p95 = lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))]
    print(f"tokens per example with {cfg.model.name} (prompt{' with passages' if examples and examples[0].context else ''} + answer + EOS): p50 {statistics.median(lengths):.0f}, "
          f"p95 {p95}, max {lengths[-1]}")
    print(f"Korean characters per answer token: {hangul / max(answer_tok, 1):.2f}")
    print(f"rows over data.max_length={cfg.data.max_length}: {len(too_long)}"
          + (f" (lines {', '.join(map(str, too_long[:10]))}) — they would be dropped; raise data.max_length to keep them"
             if too_long else ""))
    return 0


def ground(cfg, splits, tokenizer) -> list:
    """Retrieval as training will do it: the index built from the training split, recall of
    the cited article on the held-out questions, and the rows with their passages."""
    g = grounding.build(cfg, splits["train"], splits["validation"] + splits["test"])
    for line in g.corpus.report + g.index.report:
        print(line)
    train, counts = grounding.ground_training(g, cfg, splits["train"], tokenizer)
    held_out = splits["validation"] + splits["test"]
    rec = g.recall(held_out)
    r = cfg.retrieval
    print(f"retrieval: {len(g.corpus)} passages ({r.tokenizer}, expansion {'on' if r.expand else 'off'}); "
          f"validation+test questions citing an article: {rec['questions']}, recall of the cited article "
          + ", ".join(f"@{k} {rec[f'recall@{k}']:.2f}" for k in recall_ks(rec) if rec[f"recall@{k}"] is not None))
    print(f"training rows: {counts['citing']} of {counts['rows']} cite an article; retrieval found it for "
          f"{counts['retrieved']}, the oracle was inserted for {counts['inserted']} (retrieval.oracle_p {r.oracle_p:g}), "
          f"{counts['missed']} keep distractors only")
    grounded, _ = g.ground(held_out, tokenizer)
    return train + grounded

