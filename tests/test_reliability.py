"""Reliability: a run killed at any point resumes to exactly the uninterrupted result; a wrong
resume is refused; NaN and OOM stop cleanly; pickles are refused. Faults are injected with
$KOLORA_FAULTS (see kolora/interrupts.py) so each kill lands at a known point, plus one real
`kill -9` from outside at an arbitrary moment."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, run_cli

from kolora import checkpoint as ckpt

# 8 steps of 2 micro-batches, a checkpoint every 2 steps, eval every 2: dropout on, so the
# RNG state matters; log_every 1 so every step's loss can be compared.
RUN_FLAGS = ["--train.max_steps", "8", "--train.batch_size", "4", "--train.grad_accum", "2", "--train.lr", "3e-3",
             "--train.eval_every", "2", "--train.save_every", "2", "--train.log_every", "1",
             "--train.keep_checkpoints", "2", "--train.tensorboard", "false", "--lora.r", "4", "--lora.alpha", "8",
             "--lora.dropout", "0.1", "--data.max_length", "512"]


def train_losses(run: Path) -> dict[int, float]:
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [e["step"] for e in events if e["kind"] == "train"]
    assert steps == sorted(set(steps)), f"duplicated or unordered steps in metrics.jsonl: {steps}"
    return {e["step"]: e["loss"] for e in events if e["kind"] == "train"}


def adapter_tensors(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


def max_adapter_diff(a: Path, b: Path) -> float:
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert ta.keys() == tb.keys()
    return max(float((ta[k] - tb[k]).abs().max()) for k in ta)


def unusable_complete_checkpoints(run: Path) -> list[str]:
    """Directories named like a finished checkpoint that fail verification: must never exist."""
    return [p.name for p in (run / "checkpoints").glob("step-*") if ckpt.verify(p, deep=True)]


@pytest.fixture(scope="module")
def reference(tiny_models, small_csv, tmp_path_factory):
    run = tmp_path_factory.mktemp("ref") / "run"
    r = run_cli("train", "--model", str(tiny_models["llama"]), "--data", str(small_csv), "--out", str(run), *RUN_FLAGS)
    assert r.returncode == 0, r.stderr
    return run


KILL_POINTS = {
    "before the first checkpoint (micro-batch 3)": ("kill-at-micro=3", -signal.SIGKILL),
    "inside an accumulation window (micro-batch 7)": ("kill-at-micro=7", -signal.SIGKILL),
    "during a checkpoint write (step 4)": ("kill-in-save=4", -signal.SIGKILL),
    "right after an optimizer step (step 5)": ("kill-at-step=5", -signal.SIGKILL),
    "during the final checkpoint write (step 8)": ("kill-in-save=8", -signal.SIGKILL),
    "SIGTERM inside a window (micro-batch 9)": ("term-at-micro=9", 128 + signal.SIGTERM),
    "SIGTERM at a step boundary (micro-batch 10)": ("term-at-micro=10", 128 + signal.SIGTERM),
    "double Ctrl-C (micro-batch 11)": ("int2-at-micro=11", 130),
}


@pytest.mark.slow
@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_killed_run_resumes_to_the_same_losses_and_adapter(point, reference, tiny_models, small_csv, tmp_path):
    fault, expected_rc = KILL_POINTS[point]
    run = tmp_path / "run"
    r = run_cli("train", "--model", str(tiny_models["llama"]), "--data", str(small_csv), "--out", str(run), *RUN_FLAGS,
                env={"KOLORA_FAULTS": fault})
    assert r.returncode == expected_rc, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    assert unusable_complete_checkpoints(run) == []
    if fault.startswith("term"):
        assert "checkpoint saved at step" in r.stderr and f"--resume {run}" in r.stderr
    if fault.startswith("int2"):
        assert "exiting now" in r.stderr
    r = run_cli("train", "--resume", str(run))
    assert r.returncode == 0, r.stderr[-2000:]
    ref, got = train_losses(reference), train_losses(run)
    assert got.keys() == ref.keys()
    diff = max(abs(ref[s] - got[s]) for s in ref)
    adapter_diff = max_adapter_diff(reference, run)
    print(f"\n{point}: max per-step loss diff {diff:.2e}, adapter diff {adapter_diff:.2e}")
    assert diff <= 1e-6 and adapter_diff <= 1e-6
    assert unusable_complete_checkpoints(run) == []


@pytest.mark.slow
def test_external_kill_9_at_an_arbitrary_moment(reference, tiny_models, small_csv, tmp_path):
    """A real SIGKILL from outside, as the OOM killer sends it: as soon as the first checkpoint exists."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "kolora", "train", "--model", str(tiny_models["llama"]), "--data", str(small_csv),
           "--out", str(run), *RUN_FLAGS]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list((run / "checkpoints").glob("step-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert unusable_complete_checkpoints(run) == []
    r = run_cli("train", "--resume", str(run))
    assert r.returncode == 0, r.stderr[-2000:]
    ref, got = train_losses(reference), train_losses(run)
    assert max(abs(ref[s] - got[s]) for s in ref) <= 1e-6
    assert max_adapter_diff(reference, run) <= 1e-6


def test_nan_step_is_skipped_and_counted(tiny_models, small_csv, tmp_path):
    run = tmp_path / "run"
    r = run_cli("train", "--model", str(tiny_models["llama"]), "--data", str(small_csv), "--out", str(run), *RUN_FLAGS,
                env={"KOLORA_FAULTS": "nan-at-step=3"})
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["kind"] == "skip"] == [3]
    assert json.loads((run / "run.json").read_text())["summary"]["skipped_steps"] == 1
    import torch

    assert all(torch.isfinite(t).all() for t in adapter_tensors(run).values())


def test_nan_beyond_the_limit_stops_and_keeps_the_last_good_checkpoint(tiny_models, small_csv, tmp_path):
    run = tmp_path / "run"
    r = run_cli("train", "--model", str(tiny_models["llama"]), "--data", str(small_csv), "--out", str(run), *RUN_FLAGS,
                "--train.max_nonfinite_steps", "0", env={"KOLORA_FAULTS": "nan-at-step=3"})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "not finite at step 3" in r.stderr and "last checkpoint is intact" in r.stderr
    names = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert names == ["step-000002"] and unusable_complete_checkpoints(run) == []


def test_out_of_memory_says_what_to_change(tiny_models, small_csv, tmp_path):
    run = tmp_path / "run"
    r = run_cli("train", "--model", str(tiny_models["llama"]), "--data", str(small_csv), "--out", str(run), *RUN_FLAGS,
                env={"KOLORA_FAULTS": "oom-at-step=2"})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "out of memory" in r.stderr
    assert "--train.batch_size 2 --train.grad_accum 4 (same effective batch of 8)" in r.stderr


@pytest.fixture(scope="module")
def finished(tiny_models, small_csv, tmp_path_factory):
    run = tmp_path_factory.mktemp("fin") / "run"
    r = run_cli("train", "--model", str(tiny_models["llama"]), "--data", str(small_csv), "--out", str(run),
                *RUN_FLAGS[:1], "4", *RUN_FLAGS[2:])  # 4 steps
    assert r.returncode == 0, r.stderr
    return run


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("change,expected", [
    ("lora", "LoRA r (checkpoint: 4, now: 8)"),
    ("data", "the training data"),
    ("model", "the model"),
    ("seed", "train.seed: 42 then, 7 now"),
    ("batch_size", "train.batch_size: 4 then, 2 now"),
])
def test_a_wrong_resume_is_refused_naming_what_differs(change, expected, finished, tiny_models, small_csv, tmp_path):
    import yaml

    run = copy_run(finished, tmp_path / "run")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["train"]["max_steps"] = 6
    if change == "lora":
        cfg["lora"]["r"] = 8
    elif change == "seed":
        cfg["train"]["seed"] = 7
    elif change == "batch_size":
        cfg["train"]["batch_size"] = 2
    elif change == "data":
        other = tmp_path / "other.csv"
        lines = small_csv.read_text(encoding="utf-8").splitlines()
        other.write_text("\n".join(lines[:-3]) + "\n", encoding="utf-8")
        cfg["data"]["path"] = str(other)
    else:
        cfg["model"]["name"] = str(tiny_models["gemma3"])
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True))
    before = (run / "checkpoints" / "step-000004" / ckpt.MANIFEST).read_text()
    r = run_cli("train", "--resume", str(run))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "cannot resume" in r.stderr and expected in r.stderr, r.stderr
    assert (run / "checkpoints" / "step-000004" / ckpt.MANIFEST).read_text() == before


def test_keep_last_n_never_deletes_the_newest_or_the_best(tmp_path):
    root = tmp_path / "checkpoints"
    for step in range(1, 6):
        d = root / f"step-{step:06d}"
        d.mkdir(parents=True)
        (d / ckpt.MANIFEST).write_text(json.dumps({"format": ckpt.FORMAT, "files": {}}))
    ckpt.prune(root, keep=2, protect={"step-000002"})
    assert sorted(p.name for p in root.iterdir()) == ["step-000002", "step-000004", "step-000005"]


def test_incomplete_truncated_corrupted_and_foreign_checkpoints_are_skipped(finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    good = run / "checkpoints" / "step-000004"
    assert ckpt.verify(good, deep=True) is None
    import shutil

    # a crash mid-save leaves .tmp-…; a newer "step" dir without manifest; a truncated and a corrupted file
    shutil.copytree(good, run / "checkpoints" / ".tmp-step-000006")
    (run / "checkpoints" / ".tmp-step-000006" / ckpt.MANIFEST).unlink()
    trunc = shutil.copytree(good, run / "checkpoints" / "step-000007")
    opt = trunc / "optimizer.safetensors"
    opt.write_bytes(opt.read_bytes()[:100])
    corrupt = shutil.copytree(good, run / "checkpoints" / "step-000008")
    data = bytearray((corrupt / "optimizer.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (corrupt / "optimizer.safetensors").write_bytes(bytes(data))
    foreign = run / "checkpoints" / "step-000009"
    foreign.mkdir()
    (foreign / "optimizer.pt").write_bytes(b"not ours")
    latest, skipped = ckpt.find_latest(run / "checkpoints")
    assert latest == good
    reasons = dict(skipped)
    assert "interrupted" in reasons[".tmp-step-000006"]
    assert "truncated" in reasons["step-000007"]
    assert "sha256" in reasons["step-000008"]
    assert "not written by kolora" in reasons["step-000009"]


class Exploit:
    """Unpickling this writes a marker file: what a malicious checkpoint would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).write_text, ("pwned",))


def test_pickle_based_files_are_refused(finished, tiny_models, tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(Exploit(str(marker)))
    # 1. a foreign checkpoint with a pickle optimizer state is never loaded on resume
    run = copy_run(finished, tmp_path / "run")
    foreign = run / "checkpoints" / "step-000099"
    foreign.mkdir()
    (foreign / "optimizer.pt").write_bytes(payload)
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["train"]["max_steps"] = 5
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True))
    r = run_cli("train", "--resume", str(run))
    assert r.returncode == 0, r.stderr
    assert "skipping checkpoint step-000099: not written by kolora" in r.stdout
    # 2. an adapter saved as a pickle
    run2 = copy_run(finished, tmp_path / "run2")
    (run2 / "adapter" / "adapter_model.safetensors").unlink()
    (run2 / "adapter" / "adapter_model.bin").write_bytes(payload)
    r = run_cli("chat", str(run2), "--question", "전세권이란?", "--max-new-tokens", "2")
    assert r.returncode == 2 and "pickle-based file" in r.stderr, r.stderr
    # 3. a model directory with only pytorch_model.bin
    model = tmp_path / "model"
    import shutil

    shutil.copytree(tiny_models["llama"], model)
    for f in model.glob("*.safetensors"):
        f.unlink()
    (model / "pytorch_model.bin").write_bytes(payload)
    r = run_cli("train", "--model", str(model), "--data", str(finished / "data" / "train.jsonl"), "--out",
                str(tmp_path / "r3"), *RUN_FLAGS)
    assert r.returncode == 2 and "pickle-based weights" in r.stderr, r.stderr
    assert not marker.exists()


def test_run_parts_cannot_point_outside_the_run(finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    import shutil

    elsewhere = shutil.move(str(run / "adapter"), str(tmp_path / "elsewhere"))
    os.symlink(elsewhere, run / "adapter")
    r = run_cli("chat", str(run), "--question", "전세권이란?", "--max-new-tokens", "2")
    assert r.returncode == 2 and "points outside the run directory" in r.stderr, r.stderr
