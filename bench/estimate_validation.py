"""`kolora estimate` against measured peaks: predicted vs measured peak RSS and time per step.

Not part of the test suite (each case is a real short training). Usage:

    .venv/bin/python bench/estimate_validation.py              # measure every case, then compare
    .venv/bin/python bench/estimate_validation.py --reuse      # compare against the cached measurements
    .venv/bin/python bench/estimate_validation.py --only gemma3-270m/preset

A case runs `kolora train --config … --max-steps 4` in a subprocess (niced) while a sampler
reads its VmRSS every 20 ms; the lines kolora prints split the run into phases (model
load, step-0 evaluation, training, test evaluation), so a miss can be traced to its phase.
The measured peak is the process's own ru_maxrss (`peak_rss_mb` in run.json, the figure
users see) raised by any later phase the sampler saw; time per step is the median of the
per-step times in metrics.jsonl after two warm-up steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "runs" / "estimate-validation.json"  # runs/ is not tracked
STEPS = 4  # the memory peak settles within the first steps; the estimate is asked for the same steps

# (name, preset, overrides). The presets as shipped, then other max_length / batch / precision shapes.
CASES = [
    ("gemma3-270m/preset", "configs/gemma3-270m.yaml", []),
    ("smollm2-135m/preset", "configs/smollm2-135m.yaml", []),
    ("gemma3-270m/bs8-len256", "configs/gemma3-270m.yaml", ["--train.batch_size", "8", "--data.max_length", "256"]),
    ("smollm2-135m/bs2-ckpt", "configs/smollm2-135m.yaml", ["--train.batch_size", "2",
                                                            "--train.gradient_checkpointing", "true"]),
    ("gemma3-270m/bs2-fp32", "configs/gemma3-270m.yaml", ["--train.batch_size", "2", "--train.mixed_precision", "no"]),
    # added 2026-12-07 (session 33) after the estimator was refitted on the five above: shapes the fit did not see
    ("gemma3-270m/bs6-r8", "configs/gemma3-270m.yaml", ["--train.batch_size", "6", "--lora.r", "8"]),
    ("smollm2-135m/bs4-len1024", "configs/smollm2-135m.yaml", ["--train.batch_size", "4", "--data.max_length", "1024"]),
]
# stdout line prefix → the phase that starts after it
PHASE_MARKS = [("model ", "eval0"), ("step 0 validation", "train"), ("evaluating the test split", "test"),
               ("done:", "end")]


def vm_rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def measure(name: str, config: str, overrides: list[str], steps: int) -> dict:
    out = Path("/tmp/kolora-estimate-validation") / name.replace("/", "-")
    cmd = ["nice", "-n", "5", str(ROOT / ".venv/bin/kolora"), "train", "--config", config, "--max-steps", str(steps),
           "--out", str(out), "--force", "--train.log_every", "1", "--train.save_every", "0",
           "--train.tensorboard", "false", *overrides]
    print(f"[{name}] {' '.join(cmd[3:])}", flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    phase = {"now": "load"}
    peaks: dict[str, float] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss = vm_rss_mb(proc.pid)
            peaks[phase["now"]] = max(peaks.get(phase["now"], 0.0), rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for line in proc.stdout:
        for mark, nxt in PHASE_MARKS:
            if line.startswith(mark):
                phase["now"] = nxt
    proc.wait()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"[{name}] training failed (exit {proc.returncode}); run the command by hand")
    info = json.loads((out / "run.json").read_text())
    events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e["kind"] == "train"]
    dts = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(train, train[1:])][2:]
    return {"command": " ".join(cmd), "run": str(out), "steps": steps, "peak_rss_mb": info["summary"]["peak_rss_mb"],
            "load_avg": round(os.getloadavg()[1], 1),
            "phase_peak_mb": {k: round(v) for k, v in peaks.items()},
            "step_s": statistics.median(dts) if dts else None,
            "mfu": statistics.median(e["mfu"] for e in train[2:]) if len(train) > 2 and train[0].get("mfu") else None}


def predict(config: str, overrides: list[str], steps: int) -> dict:
    """`kolora estimate --json` in a fresh process, as a user runs it (its runtime term is
    that process's own memory, so it must not share one with earlier predictions)."""
    cmd = [str(ROOT / ".venv/bin/kolora"), "estimate", "--config", config, "--max-steps", str(steps), *overrides, "--json"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"kolora estimate failed: {done.stderr[-2000:]}")
    est = json.loads(done.stdout)
    return {"peak_mb": est["peak_gib"] * 1024, "step_s": est["step_seconds"], "mfu_assumed": est["mfu"],
            "phases_mb": {k: v * 1024 for k, v in est["phases_gib"].items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reuse", action="store_true", help="use cached measurements; measure only missing cases")
    ap.add_argument("--only", nargs="*", help="case names")
    ap.add_argument("--steps", type=int, default=STEPS, help="optimizer steps per measured run")
    args = ap.parse_args()
    os.chdir(ROOT)
    cache = json.loads(CACHE.read_text()) if CACHE.is_file() else {}
    cases = [c for c in CASES if not args.only or c[0] in args.only]
    for name, config, overrides in cases:  # one real training at a time
        if args.reuse and name in cache:
            continue
        cache[name] = measure(name, config, overrides, args.steps)
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        CACHE.write_text(json.dumps(cache, indent=2))
        print(f"[{name}] measured {json.dumps(cache[name]['phase_peak_mb'])}, peak {cache[name]['peak_rss_mb']} MB, "
              f"step {cache[name]['step_s']}", flush=True)

    # Time: the estimate predicts flops / (matmul peak × the MFU of this kind of CPU, CPU_MFU) and training logs
    # mfu = flops / time / (the peak it measured at its start), so at the same peak the
    # predicted/measured step-time ratio is measured MFU / assumed MFU.
    print("\n| case | predicted peak | measured peak | error | measured MFU | assumed MFU | time error | load avg |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    errors_mem, errors_time, predictions = [], [], {}
    for name, config, overrides in cases:
        m = cache[name]
        p = predictions[name] = predict(config, overrides, m.get("steps", 8))
        measured = max(m["peak_rss_mb"], *m["phase_peak_mb"].values())
        e_mem = (p["peak_mb"] - measured) / measured
        e_t = m["mfu"] / p["mfu_assumed"] - 1 if m.get("mfu") else float("nan")
        errors_mem.append(e_mem)
        errors_time.append(e_t)
        print(f"| {name} | {p['peak_mb'] / 1024:.2f} GiB | {measured / 1024:.2f} GiB | {100 * e_mem:+.0f}% "
              f"| {m['mfu'] or 0:.3f} | {p['mfu_assumed']:.3f} | {100 * e_t:+.0f}% | {m.get('load_avg', '?')} |")
    for name, config, overrides in cases:
        m, p = cache[name], predictions[name]
        print(f"{name}: phases predicted {json.dumps({k: round(v) for k, v in p['phases_mb'].items()})} MB, "
              f"measured {json.dumps(m['phase_peak_mb'])} MB; {m['step_s']:.1f} s/step measured")
    print(f"\nmemory: mean |error| {100 * statistics.mean(map(abs, errors_mem)):.0f}%, "
          f"max {100 * max(map(abs, errors_mem)):.0f}% over {len(errors_mem)} cases")
    print(f"time:   mean |error| {100 * statistics.mean(map(abs, errors_time)):.0f}%, "
          f"max {100 * max(map(abs, errors_time)):.0f}% (meaningful only when load avg ≲ 2: other jobs on the "
          "cores slow training far more than a 0.3 s matmul)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
