"""Where a kolora training step spends its time on this CPU.

    .venv/bin/python bench/profile_kolora.py --model gemma3-270m [--steps 3] [--warmup 2]

Builds kolora's training step from kolora's own pieces (preset config, tokenizer, split,
LengthGroupedBatches + collate, bf16 base + LoRA, answer_loss_module, fused AdamW, Accelerate
autocast and backward, clipping) and then:

1. times the phases of each optimizer step with a wall clock (collate, forward, backward,
   clip, optimizer, zero_grad) over `--steps` steps after `--warmup` steps;
2. runs the same steps under torch.profiler (record_shapes, with_flops) and sorts every op's
   self time into categories: base-weight matmuls, LoRA matmuls, output layer (matmuls whose
   shape has the vocabulary), attention (SDPA), cross entropy, dtype casts/copies, dropout,
   norms/activations/elementwise, the optimizer, and what no op accounts for (Python and
   framework overhead); matmul categories get their achieved GFLOP/s;
3. times each distinct base-matmul shape of the step alone (forward x·Wᵀ and the input
   gradient), the best MFU that kernel can reach;
4. with --onednn, runs one micro-batch with ONEDNN_VERBOSE=1 in a child and counts which
   oneDNN implementations ran (AMX shows as `avx512_core_amx`).

Writes bench/results/profile-<model>.json and prints the tables PROFILE.md quotes.
Patches from bench/experiments/levers.py can be applied first with --lever NAME."""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH / "experiments"))


def build(model: str, overrides: list[str]):
    """kolora's training objects for `model`, as `kolora train --config configs/<model>.yaml` makes them."""
    import torch
    from accelerate import Accelerator

    from kolora.batching import LengthGroupedBatches, tokenize_split
    from kolora.config import load_yaml, parse_scalar
    from kolora.data import load_examples, split_examples
    from kolora.device import choose_precision
    from kolora.loss import answer_loss_module
    from kolora.models import attach_lora, load_model, load_tokenizer, resolve

    cfg = load_yaml(ROOT / "configs" / f"{model}.yaml")
    for item in overrides:
        key, _, value = item.partition("=")
        cfg.set(key, parse_scalar(value))
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    chosen = choose_precision(cfg.train.mixed_precision, cfg.model.dtype, cuda=False)
    precision = chosen.mixed
    accelerator = Accelerator(mixed_precision=precision, cpu=True)
    torch.manual_seed(cfg.train.seed)
    src = resolve(cfg.model.name)
    tokenizer = load_tokenizer(src)
    examples, _ = load_examples(str(ROOT / cfg.data.path) if not Path(cfg.data.path).is_absolute() else cfg.data.path)
    train_rows, _, _ = tokenize_split(tokenizer, split_examples(examples, cfg.data.split, cfg.data.seed)["train"], cfg)
    model_ = load_model(src, chosen.weights)
    if cfg.train.gradient_checkpointing:
        model_.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model_.enable_input_require_grads()
    peft_model, targets = attach_lora(model_, cfg)
    loss_model = answer_loss_module(peft_model)
    params = [p for p in loss_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=True)
    loss_model, optimizer = accelerator.prepare(loss_model, optimizer)
    sampler = LengthGroupedBatches([len(t.input_ids) for t in train_rows], cfg.train.batch_size, cfg.train.seed)
    return dict(cfg=cfg, accelerator=accelerator, tokenizer=tokenizer, rows=train_rows, batches=sampler.batches(0),
                loss_model=loss_model, optimizer=optimizer, params=params, precision=precision, peft_model=peft_model,
                targets=targets)


def step_fn(env):
    """One optimizer step of kolora's loop, with a wall-clock split by phase."""

    from kolora.batching import collate
    from kolora.prompt import IGNORE

    acc, cfg, loss_model, optimizer = env["accelerator"], env["cfg"], env["loss_model"], env["optimizer"]
    batches = iter(env["batches"] * 10)

    def one_step(phases: dict):
        t = time.perf_counter()
        window = [collate([env["rows"][i] for i in next(batches)], env["tokenizer"].pad_token_id)
                  for _ in range(cfg.train.grad_accum)]
        n = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in window)
        phases["collate"] += time.perf_counter() - t
        tokens = sum(int(b["attention_mask"].sum()) for b in window)
        for batch in window:
            t = time.perf_counter()
            with acc.autocast():
                loss_sum, _ = loss_model(**batch)
                loss = loss_sum / n
            t2 = time.perf_counter()
            acc.backward(loss)
            t3 = time.perf_counter()
            phases["forward"] += t2 - t
            phases["backward"] += t3 - t2
        t = time.perf_counter()
        acc.clip_grad_norm_(env["params"], cfg.train.max_grad_norm)
        t2 = time.perf_counter()
        optimizer.step()
        t3 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        phases["clip"] += t2 - t
        phases["optimizer"] += t3 - t2
        phases["zero_grad"] += time.perf_counter() - t3
        return tokens, n, [tuple(b["input_ids"].shape) for b in window]

    return one_step


MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_mkldnn_matmul", "aten::linear"}


def categorize(name: str, shapes, vocab: int, r: int) -> str:
    dims = {d for s in (shapes or []) if isinstance(s, (list, tuple)) for d in s if isinstance(d, int)}
    if name in MATMUL_OPS:
        if vocab in dims:
            return "output layer (LM head) matmuls"
        if r in dims:
            return "LoRA matmuls"
        return "base-weight matmuls"
    low = name.lower()
    if "scaled_dot_product" in low or "flash_attention" in low or "_efficient_attention" in low:
        return "attention (SDPA kernels)"
    if any(k in low for k in ("log_softmax", "nll_loss", "cross_entropy", "softmax_backward")):
        return "cross entropy"
    if "adamw" in low or "_foreach" in low:
        return "optimizer (fused AdamW) + clip"
    if "norm" in low and "batch" not in low and "layer_norm" not in low:
        return "optimizer (fused AdamW) + clip" if "linalg_vector_norm" in low else "norms"
    if any(k in low for k in ("dropout", "bernoulli")):
        return "LoRA dropout"
    if any(k in low for k in ("copy_", "_to_copy", "::to", "clone", "contiguous", "cat")):
        return "dtype casts / copies"
    if any(k in low for k in ("gelu", "silu", "tanh")):
        return "activations"
    if "embedding" in low:
        return "embedding"
    if any(k in low for k in ("index", "masked", "nonzero", "where", "gather", "scatter")):
        return "answer-position gather / masks"
    return "other elementwise"


def profile(env, steps: int, one_step) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    config = env["peft_model"].get_base_model().config
    vocab = config.vocab_size
    r = env["cfg"].lora.r
    t0 = time.perf_counter()
    phases = collections.defaultdict(float)
    with tprofile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True) as prof:
        for _ in range(steps):
            one_step(phases)
    wall = time.perf_counter() - t0
    cats = collections.defaultdict(lambda: {"self_ms": 0.0, "flops": 0.0, "calls": 0})
    shapes_mm = collections.defaultdict(lambda: {"self_ms": 0.0, "flops": 0.0, "calls": 0})
    total_self = 0.0
    for evt in prof.key_averages(group_by_input_shape=True):
        self_ms = evt.self_cpu_time_total / 1000
        if self_ms <= 0:
            continue
        cat = categorize(evt.key, evt.input_shapes, vocab, r)
        c = cats[cat]
        c["self_ms"] += self_ms
        c["flops"] += evt.flops or 0
        c["calls"] += evt.count
        total_self += self_ms
        if evt.key in MATMUL_OPS:
            s = shapes_mm[f"{cat} | {evt.key} {evt.input_shapes}"]
            s["self_ms"] += self_ms
            s["flops"] += evt.flops or 0
            s["calls"] += evt.count
    wall_ms = wall * 1000
    cats["unattributed (Python, autograd engine, framework)"] = {"self_ms": max(wall_ms - total_self, 0), "flops": 0, "calls": 0}
    rows = []
    for name, c in sorted(cats.items(), key=lambda kv: -kv[1]["self_ms"]):
        rows.append({"category": name, "ms_per_step": c["self_ms"] / steps, "share": c["self_ms"] / wall_ms,
                     "gflop_per_step": c["flops"] / steps / 1e9,
                     "gflops": (c["flops"] / 1e9) / (c["self_ms"] / 1000) if c["flops"] and c["self_ms"] else None})
    top_mm = sorted(shapes_mm.items(), key=lambda kv: -kv[1]["self_ms"])[:15]
    return {"wall_ms_per_step": wall_ms / steps, "categories": rows,
            "top_matmul_shapes": [{"key": k, "ms_per_step": v["self_ms"] / steps, "calls_per_step": v["calls"] / steps,
                                   "gflops": (v["flops"] / 1e9) / (v["self_ms"] / 1000) if v["self_ms"] else None}
                                  for k, v in top_mm]}


def shape_roofline(env, token_rows: int) -> list[dict]:
    """Each distinct base linear shape alone, at the step's token count: the kernel's best."""
    import torch

    dtype = torch.bfloat16 if env["precision"] == "bf16" else torch.float32
    seen, out = set(), []
    for name, module in env["peft_model"].named_modules():
        base = getattr(module, "base_layer", None)
        if base is None or not hasattr(base, "weight"):
            continue
        n_out, n_in = base.weight.shape
        if (n_in, n_out) in seen:
            continue
        seen.add((n_in, n_out))
        x = torch.randn(token_rows, n_in, dtype=dtype)
        w = torch.randn(n_out, n_in, dtype=dtype)
        g = torch.randn(token_rows, n_out, dtype=dtype)
        res = {"in": n_in, "out": n_out, "tokens": token_rows}
        for label, fn in (("forward x·Wᵀ", lambda: x @ w.t()), ("input grad g·W", lambda: g @ w)):
            fn()
            reps, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 0.3:
                fn()
                reps += 1
            res[label] = 2 * token_rows * n_in * n_out * reps / (time.perf_counter() - t0) / 1e9
        out.append(res)
    head = env["peft_model"].get_base_model().get_output_embeddings().weight
    rows = 64 * max(1, token_rows // 256)  # answer rows are padded to multiples of 64
    x = torch.randn(rows, head.shape[1], dtype=dtype)
    w = head.detach().to(dtype)
    x @ w.t()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.3:
        x @ w.t()
        reps += 1
    out.append({"in": head.shape[1], "out": head.shape[0], "tokens": rows,
                "forward x·Wᵀ": 2 * rows * head.shape[0] * head.shape[1] * reps / (time.perf_counter() - t0) / 1e9,
                "note": "output layer"})
    return out


def onednn_summary(model: str, overrides: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--model", model, "--onednn-child", *sum((["--set", o] for o in overrides), [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "ONEDNN_VERBOSE": "1"})
    counts = collections.Counter()
    isa = None
    for line in proc.stdout.splitlines():
        if line.startswith("onednn_verbose") and ",exec," in line:
            parts = line.split(",")
            # onednn_verbose,v1,primitive,exec,cpu,<kind>,<impl>,... (layout varies a little by version)
            i = parts.index("exec")
            counts[f"{parts[i + 2]}:{parts[i + 3]}"] += 1
        elif "cpu,runtime" in line or "isa:" in line:
            m = re.search(r"isa:([^,]+)", line)
            isa = m.group(1) if m else isa
    return {"isa": isa, "primitive_counts": dict(counts.most_common(20)), "returncode": proc.returncode}


def main() -> int:
    ap = argparse.ArgumentParser(description="profile kolora's training step")
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], help="config override key=value (e.g. train.batch_size=8)")
    ap.add_argument("--lever", default="", help="apply a patch from bench/experiments/levers.py first")
    ap.add_argument("--onednn", action="store_true", help="also count oneDNN implementations (ONEDNN_VERBOSE=1)")
    ap.add_argument("--onednn-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-roofline", action="store_true")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.lever:
        import levers

        levers.apply(args.lever)
    env = build(args.model, args.set)
    one_step = step_fn(env)
    if args.onednn_child:
        one_step(collections.defaultdict(float))
        return 0
    import torch

    for _ in range(args.warmup):
        one_step(collections.defaultdict(float))
    phases = collections.defaultdict(float)
    t0 = time.perf_counter()
    tokens = answers = 0
    shapes = []
    for _ in range(args.steps):
        t, a, s = one_step(phases)
        tokens, answers = tokens + t, answers + a
        shapes += s
    wall = time.perf_counter() - t0
    timed = {"wall_s_per_step": wall / args.steps, "tokens_per_s": tokens / wall, "answer_tokens_per_s": answers / wall,
             "phases_s_per_step": {k: v / args.steps for k, v in phases.items()},
             "other_s_per_step": (wall - sum(phases.values())) / args.steps, "batch_shapes": shapes}
    result = {"model": args.model, "overrides": args.set, "lever": args.lever, "threads": torch.get_num_threads(),
              "precision": env["precision"], "timed": timed, "profile": profile(env, args.steps, one_step)}
    if not args.no_roofline:
        mean_rows = int(sum(a * b for a, b in shapes) / len(shapes))
        result["shape_roofline"] = shape_roofline(env, mean_rows)
    if args.onednn:
        result["onednn"] = onednn_summary(args.model, args.set)
    out = Path(args.out or BENCH / "results" / f"profile-{args.model}{'-' + args.lever if args.lever else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print_report(result)
    print(f"wrote {out}")
    return 0


def print_report(res: dict) -> None:
    t = res["timed"]
    print(f"## {res['model']} ({res['precision']}, {res['threads']} threads{', lever ' + res['lever'] if res['lever'] else ''})")
    print(f"step {t['wall_s_per_step']:.2f} s, {t['tokens_per_s']:.0f} tokens/s, {t['answer_tokens_per_s']:.0f} answer tokens/s")
    print("phase | s/step | share")
    for k, v in sorted(t["phases_s_per_step"].items(), key=lambda kv: -kv[1]):
        print(f"{k} | {v:.3f} | {100 * v / t['wall_s_per_step']:.1f}%")
    p = res["profile"]
    print(f"\nprofiled step {p['wall_ms_per_step']:.0f} ms (profiler on)\ncategory | ms/step | share | GFLOP/step | GFLOP/s")
    for row in p["categories"]:
        g = f"{row['gflops']:.0f}" if row["gflops"] else ""
        print(f"{row['category']} | {row['ms_per_step']:.0f} | {100 * row['share']:.1f}% | {row['gflop_per_step']:.2f} | {g}")
    print("\ntop matmul shapes | ms/step | calls/step | GFLOP/s")
    for row in p["top_matmul_shapes"]:
        g = f"{row['gflops']:.0f}" if row["gflops"] else ""
        print(f"{row['key']} | {row['ms_per_step']:.1f} | {row['calls_per_step']:.0f} | {g}")
    if "shape_roofline" in res:
        print("\nshape alone (in→out, tokens) | forward GFLOP/s | input-grad GFLOP/s")
        for row in res["shape_roofline"]:
            print(f"{row['in']}→{row['out']} ×{row['tokens']} | {row['forward x·Wᵀ']:.0f} | {row.get('input grad g·W', 0):.0f}")
    if "onednn" in res:
        print(f"\noneDNN: isa {res['onednn']['isa']}; {res['onednn']['primitive_counts']}")


if __name__ == "__main__":
    sys.exit(main())
