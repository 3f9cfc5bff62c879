"""What kolora and the TRL peer share in the benchmark: the exact micro-batch plan, token
counts per step, the FLOPs formula and the peak-RSS measurement.

The plan is rebuilt from the run directory kolora wrote (config.yaml, data/train.jsonl) with
kolora's own functions, so both trainers see the same token ids in the same micro-batches."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

FLOPS_FORMULA = (
    "FLOPs per trained token = 4·N_body (frozen base: forward 2N + activation gradients 2N, no weight "
    "gradients; N_body = parameters without the embedding) + 6·N_lora (adapters also get weight gradients) "
    "+ 12·layers·seq·heads·head_dim (attention scores and values: 4·L·s·d forward, twice that backward, s = "
    "mean training sequence length); plus 4·V·d per answer token for the output layer (forward + input "
    "gradient, computed at answer positions only). kolora.device.train_flops; the same token counts for "
    "both trainers, so MFU differs only by time."
)


@dataclass
class Plan:
    """Micro-batches (lists of row indices into `rows`) in the order kolora's loop consumes them."""

    rows: list  # kolora.batching.Tokenized, in train.jsonl order
    batches: list[list[int]]
    batch_size: int
    grad_accum: int

    def step_batches(self, step: int) -> list[list[int]]:
        """The micro-batches of optimizer step `step` (1-based)."""
        return self.batches[(step - 1) * self.grad_accum: step * self.grad_accum]

    def step_tokens(self, step: int) -> tuple[int, int]:
        """(non-pad tokens, supervised answer tokens) of one optimizer step."""
        tokens = answers = 0
        for batch in self.step_batches(step):
            for i in batch:
                tokens += len(self.rows[i].input_ids)
                answers += self.rows[i].answer_tokens
        return tokens, answers

    def mean_length(self) -> float:
        """Mean train-row length: the seq term of the FLOPs formula (as kolora logs MFU)."""
        return sum(len(r.input_ids) for r in self.rows) / len(self.rows)


def load_plan(run_dir: Path, steps: int) -> tuple[Plan, object, object]:
    """Rebuild kolora's training rows and micro-batch order from its run directory.

    Returns (plan, run config, tokenizer)."""
    from kolora import grounding
    from kolora.batching import LengthGroupedBatches, tokenize_split
    from kolora.data import read_jsonl
    from kolora.models import load_tokenizer, resolve
    from kolora.runs import Run

    run = Run(Path(run_dir))
    cfg = run.config()
    tokenizer = load_tokenizer(resolve(cfg.model.name), cfg.model.trust_remote_code)
    examples = read_jsonl(run.split("train"))  # the rows as the user wrote them (no passages)
    if grounding.corpus_paths(cfg):
        # A grounded run trained on its rows with retrieved passages: rebuild them as kolora's
        # train.ground_splits does (same index, same per-row oracle draws), or both trainers
        # would be timed on prompts a third as long as kolora's.
        held_out = [ex for name in ("validation", "test") if run.split(name).is_file() for ex in read_jsonl(run.split(name))]
        examples, _ = grounding.ground_training(grounding.build(cfg, examples, held_out), cfg, examples, tokenizer)
    rows, _, _ = tokenize_split(tokenizer, examples, cfg)  # drops over-long rows, as kolora did
    sampler = LengthGroupedBatches([len(r.input_ids) for r in rows], cfg.train.batch_size, cfg.train.seed)
    needed = steps * cfg.train.grad_accum
    batches, epoch = [], 0
    while len(batches) < needed:  # kolora's loop streams epoch after epoch
        batches += sampler.batches(epoch)
        epoch += 1
    return Plan(rows, batches[:needed], cfg.train.batch_size, cfg.train.grad_accum), cfg, tokenizer


def measured_window(step_end_times: dict[int, float], plan: Plan, warmup_steps: int) -> dict:
    """Throughput over steps warmup+1 … last, from the wall time at the end of each step."""
    last = max(step_end_times)
    first = min(warmup_steps, last - 1)
    seconds = step_end_times[last] - step_end_times[first]  # step 0 = the start of the loop
    tokens = answers = 0
    for step in range(first + 1, last + 1):
        t, a = plan.step_tokens(step)
        tokens, answers = tokens + t, answers + a
    return {"measured_steps": last - first, "measured_s": round(seconds, 3), "tokens": tokens, "answer_tokens": answers,
            "tokens_per_s": tokens / seconds, "answer_tokens_per_s": answers / seconds}


def meta_model(model_path: str):
    """The model's parameter layout without weights (for the FLOPs formula)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))


def run_measured(cmd: list[str], log_path: Path, env: dict | None = None) -> dict:
    """Run `cmd` as a child; its own peak RSS (ru_maxrss from wait4), wall time, load averages.

    wait4 on the one pid gives that process tree's peak, not the maximum over every child this
    orchestrator ever had (RUSAGE_CHILDREN would). A sampled RSS timeline (every 0.25 s) goes
    next to the log, to see whether the peak falls in loading, training or evaluation."""
    load_start = os.getloadavg()
    cpu_start = cpu_busy_seconds()
    t0 = time.time()
    timeline: list[tuple[float, float]] = []
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        done = threading.Event()
        sampler = threading.Thread(target=_sample_rss, args=(proc.pid, t0, timeline, done), daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        done.set()
        sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - t0
    # CPU time the whole machine spent busy during the run, minus this child's own: what other
    # processes took from the cores while we measured (0 on a quiet machine)
    others = cpu_busy_seconds() - cpu_start - (usage.ru_utime + usage.ru_stime)
    log_path.with_suffix(".rss.json").write_text(json.dumps(timeline))
    peak_at = max(timeline, key=lambda x: x[1])[0] if timeline else None
    return {"returncode": proc.returncode, "wall_s": round(wall, 1),
            "child_cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "other_processes_cpu_share": round(max(others, 0) / (wall * (os.cpu_count() or 1)), 3),
            "peak_rss_mb": round(usage.ru_maxrss / 1024), "peak_rss_at_s": peak_at,
            "loadavg_start": [round(x, 2) for x in load_start],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()], "command": " ".join(cmd)}


def cpu_name() -> str:
    """The CPU model, as /proc/cpuinfo names it: every figure says which machine it is from."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")),
                platform.processor())


def cpu_busy_seconds() -> float:
    """Busy CPU seconds of the whole machine since boot (all cores, /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def wait_until_quiet(max_busy: float, max_wait_s: float, say=print) -> float:
    """Wait until the machine's CPUs are mostly idle (busy share over 5 s below `max_busy`).

    Returns the last busy share seen; gives up after `max_wait_s` (the results then say how
    busy the machine was)."""
    deadline = time.time() + max_wait_s
    warned = False
    while True:
        b0, t0 = cpu_busy_seconds(), time.time()
        time.sleep(5)
        busy = (cpu_busy_seconds() - b0) / ((time.time() - t0) * (os.cpu_count() or 1))
        if busy < max_busy or time.time() > deadline:
            return busy
        if not warned:
            say(f"[bench] waiting for a quiet machine (CPU {100 * busy:.0f}% busy; up to {max_wait_s / 60:.0f} min)")
            warned = True


def _sample_rss(pid: int, t0: float, out: list, done: threading.Event) -> None:
    status = Path(f"/proc/{pid}/status")
    while not done.wait(0.25):
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out.append((round(time.time() - t0, 2), round(int(line.split()[1]) / 1024)))
                    break
        except (OSError, ValueError):
            return


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))
