"""Measure kolora levers one at a time against the default, same steps and batches.

    .venv/bin/python bench/experiments/sweep.py --model gemma3-270m [--steps 12] [--levers baseline,jemalloc,…]

Each lever is one `kolora train` child measured exactly like `make bench` measures kolora
(bench/run.py: tokens/s over the steps after the warm-up, peak RSS of the process from
wait4); the validation loss is kolora's own end-of-run value. A lever is a config flag, an
environment variable, or a patch from levers.py. Results: bench/results/levers-<model>.json
and a markdown table on stdout (what PROFILE.md quotes)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

EXP = Path(__file__).resolve().parent
BENCH = EXP.parent
sys.path.insert(0, str(BENCH))

import run as bench_run  # noqa: E402
from common import read_json  # noqa: E402

LIB = "/usr/lib/x86_64-linux-gnu"
# name: (kolora flags, patch from levers.py, environment)
LEVERS: dict[str, tuple[str, str, list[str]]] = {
    "baseline": ("", "", []),
    "threads-1": ("--train.threads 1", "", []),
    "omp-passive": ("", "", ["OMP_WAIT_POLICY=PASSIVE"]),
    "jemalloc": ("", "", [f"LD_PRELOAD={LIB}/libjemalloc.so.2"]),
    "tcmalloc": ("", "", [f"LD_PRELOAD={LIB}/libtcmalloc_minimal.so.4"]),
    "glibc-mmap-64k": ("", "", ["MALLOC_MMAP_THRESHOLD_=65536", "MALLOC_TRIM_THRESHOLD_=0"]),
    # torch's CPU allocator: 2 MB-aligned large blocks with madvise(MADV_HUGEPAGE) (THP "madvise" mode)
    "thp": ("", "", ["THP_MEM_ALLOC_ENABLE=1"]),
    "thp-no-trim": ("", "no-trim", ["THP_MEM_ALLOC_ENABLE=1"]),
    "thp-trim-every-16": ("", "trim-every-16", ["THP_MEM_ALLOC_ENABLE=1"]),
    "no-trim": ("", "no-trim", []),
    "fp32-base-weights": ("--model.dtype float32", "", []),
    "fp32-no-autocast": ("--train.mixed_precision no", "", []),
    "batch-8x1": ("--train.batch_size 8 --train.grad_accum 1", "", []),
    "batch-2x4": ("--train.batch_size 2 --train.grad_accum 4", "", []),
    "pad-1": ("", "pad1", []),
    "pad-8": ("", "pad8", []),
    "pad-64": ("", "pad64", []),
    "unchunked-head": ("", "unchunked-head", []),
    "fused-head-ce": ("", "fused-head-ce", []),
    "fused-head-ce-64": ("", "fused-head-ce-64", []),
    "compile-layers": ("", "compile-layers", []),
    "compile-backbone": ("", "compile-backbone", []),
    "lora-dropout-0": ("--lora.dropout 0", "", []),
    "dropout-per-projection": ("", "dropout-per-projection", []),
    "torch-dropout": ("", "torch-dropout", []),
    "grad-checkpointing": ("--train.gradient_checkpointing true", "", []),
    "no-tensorboard": ("--train.tensorboard false", "", []),
    "mkldnn-off": ("", "mkldnn-off", []),
}


def main() -> int:
    ap = argparse.ArgumentParser(description="one lever at a time")
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup-steps", type=int, default=2)
    ap.add_argument("--levers", default=",".join(LEVERS), help=f"comma-separated, from: {', '.join(LEVERS)}")
    ap.add_argument("--extra", default="", help="kolora flags added to every lever (e.g. a combination under test)")
    ap.add_argument("--patch", default="", help="levers.py patches added to every lever")
    ap.add_argument("--repeat", type=int, default=1, help="runs per lever (the median is reported)")
    ap.add_argument("--quiet-wait", type=float, default=20)
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    from kolora.device import matmul_peak_gflops

    out_path = Path(args.out or BENCH / "results" / f"levers-{args.model}.json")
    results = read_json(out_path) if out_path.is_file() else {}
    for name in [n for n in args.levers.split(",") if n]:
        flags, patch, env = LEVERS[name]
        patch = ",".join(p for p in (patch, args.patch) if p)
        runs = []
        for _ in range(args.repeat):
            argv = ["--models", args.model, "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps),
                    "--only", "kolora", "--no-eval", "--no-history", "--quiet-wait", str(args.quiet_wait),
                    "--work", str(BENCH.parent / "runs" / "levers"), "--kolora-args", f"{flags} {args.extra}".strip(),
                    "--kolora-patch", patch]
            for kv in env:
                argv += ["--kolora-env", kv]
            bargs = bench_run.parse_args(argv)
            bench_run.quiet(bargs)
            peaks = {"bf16": matmul_peak_gflops("bf16", 1.0), "fp32": matmul_peak_gflops("fp32", 1.0)}
            r = bench_run.bench_model(args.model, bargs, peaks)["kolora"]
            info = read_json(BENCH.parent / "runs" / "levers" / args.model / "kolora" / "run.json")
            runs.append({k: r[k] for k in ("tokens_per_s", "answer_tokens_per_s", "peak_rss_mb", "peak_rss_at_s", "mfu",
                                           "other_processes_cpu_share", "wall_s", "command")}
                        | {"val_loss": info["summary"].get("val_loss"), "peak_gflops": peaks,
                           "env": env, "patch": patch, "flags": f"{flags} {args.extra}".strip()})
            print(f"[sweep] {name}: {r['tokens_per_s']:.0f} tok/s, {r['answer_tokens_per_s']:.0f} answer tok/s, "
                  f"RSS {r['peak_rss_mb']} MB, val {runs[-1]['val_loss']:.4f}, others {100 * r['other_processes_cpu_share']:.0f}%",
                  flush=True)
        runs.sort(key=lambda x: x["tokens_per_s"])
        results[name] = {**runs[len(runs) // 2], "runs": runs, "steps": args.steps,
                         "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"), **bench_run.git_state()}
        out_path.write_text(json.dumps(results, indent=2))
    print_table(results)
    return 0


def print_table(results: dict) -> None:
    base = results.get("baseline")
    print("| lever | tokens/s | answer tokens/s | Δ speed | peak RSS MB | Δ RSS | val loss | others' CPU |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        ds = f"{100 * (r['tokens_per_s'] / base['tokens_per_s'] - 1):+.0f}%" if base else ""
        dr = f"{r['peak_rss_mb'] - base['peak_rss_mb']:+,}" if base else ""
        print(f"| {name} | {r['tokens_per_s']:.0f} | {r['answer_tokens_per_s']:.0f} | {ds} | {r['peak_rss_mb']:,} | {dr} | "
              f"{r['val_loss']:.4f} | {100 * r['other_processes_cpu_share']:.0f}% |")


if __name__ == "__main__":
    sys.exit(main())
