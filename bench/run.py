"""`make bench`: kolora vs TRL SFTTrainer + peft on this CPU, same model, data, steps, batch.

    .venv/bin/python bench/run.py [--models gemma3-270m,smollm2-135m] [--steps 20] [--warmup-steps 2]

Per model, one after the other, each trainer in its own child process (so peak RSS is that
process's own): 1. `kolora train` with the model's preset (configs/<model>.yaml) and its
defaults; 2. bench/trl_peer.py on kolora's split, token ids and micro-batches; 3.
bench/eval_adapters.py scores both adapters on the validation split with the same code.
Throughput counts the optimizer steps after the first `--warmup-steps` (model loading,
conversion and the first steps' one-off costs excluded on both sides). MFU = achieved FLOP/s ÷
a bf16 (or fp32) matmul peak measured in this run. Writes bench/results/latest.json, appends
bench/results/history.jsonl (with the git commit) and prints a table."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

from common import FLOPS_FORMULA, cpu_name, load_plan, measured_window, meta_model, read_json, run_measured, wait_until_quiet  # noqa: E402

TARGETS = {"answer_speedup": 2.0, "rss_ratio": 0.7, "mfu": 0.5}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="kolora vs TRL on this CPU (see bench/README.md)")
    ap.add_argument("--models", default="gemma3-270m,smollm2-135m", help="comma-separated presets")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per trainer (default 20)")
    ap.add_argument("--warmup-steps", type=int, default=2, help="first steps left out of the throughput (both sides)")
    ap.add_argument("--batch-size", type=int, default=0, help="micro-batch (0 = the preset's)")
    ap.add_argument("--grad-accum", type=int, default=0, help="micro-batches per step (0 = the preset's)")
    ap.add_argument("--only", choices=["kolora", "trl", "both"], default="both",
                    help="trl needs an existing kolora run in --work (its split and batches)")
    ap.add_argument("--kolora-args", default="", help="extra flags for `kolora train` (lever experiments)")
    ap.add_argument("--kolora-fact-weight", default="1",
                    help="kolora's train.fact_weight (default 1: TRL's plain cross entropy, so the validation losses "
                         "compare one objective; 'preset' keeps the preset's, e.g. the demo's 3.0)")
    ap.add_argument("--kolora-patch", default="", help="levers from bench/experiments/levers.py applied to kolora")
    ap.add_argument("--kolora-env", action="append", default=[], help="KEY=VALUE for kolora's process only")
    ap.add_argument("--no-eval", action="store_true", help="skip the validation-loss step")
    ap.add_argument("--retries", type=int, default=0,
                    help="re-run a trainer when other processes took more than --max-others of the CPU meanwhile")
    ap.add_argument("--max-others", type=float, default=0.1, help="see --retries (share of all cores)")
    ap.add_argument("--quiet-wait", type=float, default=5, help="minutes to wait for idle CPUs before each trainer (0 = don't)")
    ap.add_argument("--trl-gradient-checkpointing", action="store_true", help="TRL's own default (slower); off = like kolora")
    ap.add_argument("--trl-dtype", default="float32", help="TRL base weights dtype (its default: float32)")
    ap.add_argument("--trl-quantization", default="none", choices=["none", "4bit", "8bit"],
                    help="TRL's base through bitsandbytes (pair with --kolora-args '--model.quantization 4bit')")
    ap.add_argument("--eval-split", default="validation", choices=["validation", "test"],
                    help="the split bench/eval_adapters.py scores both adapters on")
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench"), help="run directories (git-ignored)")
    ap.add_argument("--results", default=str(BENCH / "results"), help="where latest.json / history.jsonl go")
    ap.add_argument("--no-history", action="store_true", help="do not append to history.jsonl")
    ap.add_argument("--tag", default="", help="label stored with the results (e.g. a lever name)")
    return ap.parse_args(argv)


def git_state() -> dict:
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--", "src", "bench", "configs"))}


def machine() -> dict:
    import torch
    import transformers

    cpu = cpu_name()
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    if torch.cuda.is_available():
        versions["gpu"] = torch.cuda.get_device_name(0)
        versions["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    for mod in ("trl", "peft", "accelerate"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), **versions}


# --------------------------------------------------------------------------- one trainer each
def kolora_cmd(model: str, run_dir: Path, args) -> list[str]:
    preset = ROOT / "configs" / f"{model}.yaml"
    cmd = [sys.executable, "-m", "kolora", "train"]
    if args.kolora_patch:
        cmd = [sys.executable, str(BENCH / "experiments" / "patched_kolora.py"), args.kolora_patch, "--", "train"]
    cmd += ["--config", str(preset)] if preset.is_file() else ["--model", model]
    cmd += ["--out", str(run_dir), "--force", "--train.max_steps", str(args.steps),
            "--train.eval_every", "0", "--train.save_every", "0", "--train.log_every", "1"]
    if args.batch_size:
        cmd += ["--train.batch_size", str(args.batch_size)]
    if args.grad_accum:
        cmd += ["--train.grad_accum", str(args.grad_accum)]
    if args.kolora_fact_weight != "preset":
        # The presets weight fact tokens 3x (train.fact_weight), an objective TRL does not train and the plain
        # validation loss does not reward: measured +0.0175 against TRL with 3.0, +0.0029 with 1 (HISTORY, stop 31).
        cmd += ["--train.fact_weight", args.kolora_fact_weight]
    return cmd + args.kolora_args.split()


def kolora_step_times(run_dir: Path) -> tuple[dict[int, float], list[dict]]:
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [e for e in events if e["kind"] == "train"]
    return {0: 0.0, **{e["step"]: e["elapsed_s"] for e in train}}, train


def kolora_log_matches_plan(train_events: list[dict], plan) -> bool:
    """kolora logs tokens/s per step; tokens/s × the step's seconds must give the plan's tokens."""
    prev = 0.0
    for e in train_events:
        dt = e["elapsed_s"] - prev
        prev = e["elapsed_s"]
        tokens, _ = plan.step_tokens(e["step"])
        if abs(e["tokens_per_s"] * dt - tokens) > max(2, 0.01 * tokens):
            return False
    return True


WAITED = [0.0]  # seconds spent waiting for a quiet machine (not part of the benchmark's own runtime)


def quiet(args) -> None:
    if args.quiet_wait > 0:
        t0 = time.time()
        wait_until_quiet(0.25, args.quiet_wait * 60)
        WAITED[0] += time.time() - t0


def measure(what: str, cmd: list[str], log: Path, args, env=None) -> dict:
    """Run one trainer; again (up to --retries times) when other processes shared the CPU."""
    attempts = []
    for attempt in range(1 + args.retries):
        quiet(args)
        print(f"[bench] {what} …", flush=True)
        result = run_measured(cmd, log, env)
        check(result, what, log)
        attempts.append(result["other_processes_cpu_share"])
        if result["other_processes_cpu_share"] <= args.max_others:
            break
        print(f"[bench] other processes took {100 * result['other_processes_cpu_share']:.0f}% of the CPU during the run"
              + ("; running it again" if attempt < args.retries else ""), flush=True)
    result["others_cpu_share_per_attempt"] = attempts
    return result


def check(result: dict, what: str, log: Path) -> None:
    if result["returncode"] != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise SystemExit(f"{what} failed (exit {result['returncode']}); log {log}:\n{tail}")


def bench_model(model: str, args, peaks: dict) -> dict:
    from kolora.device import train_flops

    work = Path(args.work) / model
    work.mkdir(parents=True, exist_ok=True)
    kolora_dir, trl_dir = work / "kolora", work / "trl"
    out: dict = {}

    if args.only in ("kolora", "both"):
        cmd = kolora_cmd(model, kolora_dir, args)
        env = {**os.environ, **dict(kv.split("=", 1) for kv in args.kolora_env)}
        out["kolora"] = measure(f"{model}: kolora ({' '.join(cmd[1:])})", cmd, work / "kolora.log", args, env)
        out["kolora"].update(env_overrides=args.kolora_env, patch=args.kolora_patch)
    info = read_json(kolora_dir / "run.json")
    plan, cfg, _ = load_plan(kolora_dir, args.steps)
    if "kolora" in out:
        times, events = kolora_step_times(kolora_dir)
        out["kolora"].update(measured_window(times, plan, args.warmup_steps))
        out["kolora"].update(internal_peak_rss_mb=info["summary"]["peak_rss_mb"],
                             peak_gpu_mb=info["summary"].get("peak_gpu_mb"),
                             internal_mfu_last_step=events[-1].get("mfu"), plan_matches_log=kolora_log_matches_plan(events, plan),
                             losses=[e["loss"] for e in events], precision=info["precision"], base_dtype=info["base_dtype"])

    if args.only in ("trl", "both"):
        cmd = [sys.executable, str(BENCH / "trl_peer.py"), "--kolora-run", str(kolora_dir), "--out", str(trl_dir),
               "--steps", str(args.steps), "--dtype", args.trl_dtype, "--quantization", args.trl_quantization]
        if args.trl_gradient_checkpointing:
            cmd.append("--gradient-checkpointing")
        out["trl"] = measure(f"{model}: TRL SFTTrainer", cmd, work / "trl.log", args)
        timing = read_json(trl_dir / "timing.json")
        out["trl"].update(measured_window({int(k): v for k, v in timing["step_end_s"].items()}, plan, args.warmup_steps))
        out["trl"].update(internal_peak_rss_mb=timing["internal_peak_rss_mb"], batches_match_plan=timing["batches_match_plan"],
                          losses=timing["losses"], precision=timing["precision"], base_dtype=timing["base_dtype"],
                          gradient_checkpointing=timing["gradient_checkpointing"], peak_gpu_mb=timing.get("peak_gpu_mb"),
                          quantization=timing.get("quantization", "none"))

    adapters = [f"{k}={d / 'adapter'}" for k, d in (("kolora", kolora_dir), ("trl", trl_dir)) if k in out]
    if adapters and not args.no_eval:
        print(f"[bench] {model}: {args.eval_split}-split loss of {', '.join(a.split('=')[0] for a in adapters)} …", flush=True)
        cmd = [sys.executable, str(BENCH / "eval_adapters.py"), "--kolora-run", str(kolora_dir), "--out", str(work / "eval.json"),
               "--split", args.eval_split]
        for a in adapters:
            cmd += ["--adapter", a]
        ev = run_measured(cmd, work / "eval.log")
        check(ev, "evaluation", work / "eval.log")
        scores = read_json(work / "eval.json")
        for k in out:
            out[k]["eval_loss"] = scores["loss"][k]
        out["base_eval_loss"] = scores["loss"]["base"]
        out["eval_rows"], out["eval_tokens"], out["eval_split"] = scores["rows"], scores["tokens"], args.eval_split
        out["eval_loss_paired_se"] = scores.get("paired_se_kolora_minus_trl")

    precision = info["precision"]
    peak = peaks["bf16" if precision == "bf16" else "fp32"]
    shape = meta_model(info["model_path"])
    for k in ("kolora", "trl"):
        if k in out:
            r = out[k]
            flops = train_flops(shape, r["tokens"], r["answer_tokens"], plan.mean_length(), info["trainable_params"])
            r["flops"] = flops
            r["achieved_gflops"] = flops / r["measured_s"] / 1e9
            r["mfu"] = r["achieved_gflops"] / peak
            # TRL's collator pads to the longest row; kolora's to a multiple of PAD_MULTIPLE
            r["padding_share"] = padding_share(plan, r["measured_steps"], args.steps, None if k == "kolora" else 1)
    out["setup"] = {"model_path": info["model_path"], "max_length": cfg.data.max_length, "batch_size": cfg.train.batch_size,
                    "grad_accum": cfg.train.grad_accum, "steps": args.steps, "warmup_steps_excluded": args.warmup_steps,
                    "lr": cfg.train.lr, "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "dropout": cfg.lora.dropout,
                                                 "targets": info["lora_targets"]}, "trainable_params": info["trainable_params"],
                    "train_rows": len(plan.rows), "mean_train_length": round(plan.mean_length(), 1),
                    "compute_dtype": precision, "matmul_peak_gflops": peak,
                    "flops_per_token_body": train_flops(shape, 1, 0, plan.mean_length(), info["trainable_params"]),
                    "flops_per_answer_token_head": train_flops(shape, 0, 1, plan.mean_length(), 0)}
    if "kolora" in out and "trl" in out:
        k, t = out["kolora"], out["trl"]
        out["ratios"] = {"answer_tokens_per_s": k["answer_tokens_per_s"] / t["answer_tokens_per_s"],
                         "tokens_per_s": k["tokens_per_s"] / t["tokens_per_s"],
                         "peak_rss": k["peak_rss_mb"] / t["peak_rss_mb"],
                         "eval_loss_diff": k.get("eval_loss", float("nan")) - t.get("eval_loss", float("nan"))}
        noise = 2 * (out.get("eval_loss_paired_se") or 0.0)
        out["targets_met"] = {"answer_speedup_2x": out["ratios"]["answer_tokens_per_s"] >= TARGETS["answer_speedup"],
                              "rss_le_0.7x": out["ratios"]["peak_rss"] <= TARGETS["rss_ratio"],
                              "eval_loss_no_worse": out["ratios"]["eval_loss_diff"] <= noise,
                              "mfu_ge_50pct": k["mfu"] >= TARGETS["mfu"]}
    return out


def padding_share(plan, measured_steps: int, steps: int, multiple: int | None) -> float:
    """Share of the padded micro-batch positions that are padding, over the measured steps."""
    from kolora.batching import PAD_MULTIPLE

    multiple = multiple or PAD_MULTIPLE
    padded = real = 0
    for step in range(steps - measured_steps + 1, steps + 1):
        for batch in plan.step_batches(step):
            lengths = [len(plan.rows[i].input_ids) for i in batch]
            padded += len(lengths) * -(-max(lengths) // multiple) * multiple
            real += sum(lengths)
    return 1 - real / padded


# --------------------------------------------------------------------------- report
def table(results: dict) -> list[str]:
    head = (f"{'model':<14} {'trainer':<7} {'tok/s':>8} {'answer tok/s':>13} {'peak RSS MB':>12} {'eval loss':>10} "
            f"{'MFU':>7} {'others CPU':>11}")
    lines = [head, "-" * len(head)]
    for model, r in results["models"].items():
        for k in ("kolora", "trl"):
            if k in r:
                x = r[k]
                lines.append(f"{model:<14} {k:<7} {x['tokens_per_s']:>8.0f} {x['answer_tokens_per_s']:>13.0f} "
                             f"{x['peak_rss_mb']:>12,} {x.get('eval_loss', float('nan')):>10.4f} {100 * x['mfu']:>6.1f}% "
                             f"{100 * x['other_processes_cpu_share']:>10.0f}%"
                             + (f"  peak GPU {x['peak_gpu_mb']:,} MB" if x.get("peak_gpu_mb") is not None else ""))
        if "ratios" in r:
            q = r["ratios"]
            lines.append(f"{model:<14} {'ratio':<7} {q['tokens_per_s']:>7.2f}× {q['answer_tokens_per_s']:>12.2f}× "
                         f"{q['peak_rss']:>11.2f}× {q['eval_loss_diff']:>+10.4f}  (base {r['base_eval_loss']:.4f}, "
                         f"±{2 * (r['eval_loss_paired_se'] or 0):.4f} noise)")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    os.chdir(ROOT)
    from kolora.device import matmul_peak_gflops

    t0 = time.time()
    results = {"timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"), **git_state(), "tag": args.tag,
               "args": {k: v for k, v in vars(args).items() if k not in ("work", "results")},
               "machine": machine(), "flops_formula": FLOPS_FORMULA,
               "mfu_definition": "achieved FLOP/s (formula above, measured steps only) ÷ matmul peak measured in this run "
                                 "in the compute dtype (kolora.device.matmul_peak_gflops: 1024×1024 matmuls for 1 s)",
               "timing_definition": f"wall time from the end of optimizer step {args.warmup_steps} to the end of the last "
                                    "step; tokens = non-pad tokens of those steps, answer tokens = supervised (label) tokens",
               "models": {}}
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        quiet(args)
        load = os.getloadavg()
        device = "cuda" if results["machine"].get("gpu") else "cpu"  # both trainers take the GPU where there is one
        peaks = {"bf16": matmul_peak_gflops("bf16", 1.0, device), "fp32": matmul_peak_gflops("fp32", 1.0, device)}
        print(f"[bench] {model}: matmul peak bf16 {peaks['bf16']:.0f} GFLOP/s, fp32 {peaks['fp32']:.0f} GFLOP/s "
              f"(load average {load[0]:.2f})", flush=True)
        results["models"][model] = bench_model(model, args, peaks)
        results["models"][model]["matmul_peak_gflops_measured"] = peaks
    results["total_wall_s"] = round(time.time() - t0, 1)
    results["waited_for_quiet_s"] = round(WAITED[0], 1)

    for line in table(results):
        print(line)
    print(f"[bench] FLOPs: {FLOPS_FORMULA}")
    print(f"[bench] total {results['total_wall_s']:.0f} s ({results['waited_for_quiet_s']:.0f} s of it waiting for idle CPUs)")
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    if not args.no_history:
        summary = {m: {k: {f: r[k][f] for f in ("tokens_per_s", "answer_tokens_per_s", "peak_rss_mb", "eval_loss", "mfu")
                           if f in r[k]} for k in ("kolora", "trl") if k in r} | {"ratios": r.get("ratios")}
                   for m, r in results["models"].items()}
        entry = {"timestamp": results["timestamp"], "commit": results["commit"], "dirty": results["dirty"],
                 "tag": args.tag, "steps": args.steps, "total_wall_s": results["total_wall_s"], "models": summary}
        with open(out / "history.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
    print(f"[bench] wrote {out / 'latest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
