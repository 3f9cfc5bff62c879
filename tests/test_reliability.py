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
    # micro-batch 9 opens step 5's window: the stop re-saves step 4 inside it, and the kill lands
    # between moving the old step-4 aside and renaming the new one in
    "killed between the renames of a re-saved checkpoint (step 4)": (
        "term-at-micro=9,kill-ckpt-between-renames=4", -signal.SIGKILL),
    # micro-batch 8 ends step 4, a save step: the stop must not save step 4 a second time
    "SIGTERM on a save step (micro-batch 8)": ("term-at-micro=8,kill-ckpt-between-renames=4", 128 + signal.SIGTERM),
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
    if expected_rc == 128 + signal.SIGTERM:
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


# --------------------------------------------------------------------------- checkpoint atomicity
class FakeAdapter:
    """Stands in for the PEFT model: `save_pretrained` writes one safetensors file."""

    def __init__(self, value: float):
        self.value = value

    def save_pretrained(self, path: Path) -> None:
        import torch
        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        save_file({"w": torch.full((4,), float(self.value))}, path / "adapter_model.safetensors")


def save_step(root: Path, step: int, value: float, window_pos: int = 0, fault=None) -> Path:
    import torch

    param = torch.nn.Parameter(torch.zeros(4))
    optimizer = torch.optim.AdamW([param], lr=0.1)
    param.grad = torch.ones(4)
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return ckpt.save(root, step, adapter_model=FakeAdapter(value), optimizer=optimizer, scheduler=scheduler,
                     state={"step": step, "window_pos": window_pos, "value": value}, fingerprints={},
                     rng_by_rank=[ckpt.rng_state()], fault=fault)


def saved_value(ckpt_dir: Path) -> float:
    return json.loads((ckpt_dir / "trainer_state.json").read_text())["value"]


def test_a_resaved_checkpoint_is_complete_at_every_instant(tmp_path, monkeypatch):
    """Re-saving step N (a stop inside the window after the save_every save): after every rename
    and delete, a complete step-N or its .old- twin exists, so a kill at any instant loses nothing."""
    root = tmp_path / "checkpoints"
    save_step(root, 4, value=1.0)
    name = "step-000004"
    broken = []

    def check(op):
        def wrapped(*args, **kwargs):
            result = op(*args, **kwargs)
            if not any(ckpt.verify(p, deep=True) is None for p in (root / name, root / f".old-{name}") if p.is_dir()):
                broken.append(f"after {op.__name__}{tuple(str(a) for a in args)}")
            return result
        return wrapped

    monkeypatch.setattr(ckpt.os, "replace", check(ckpt.os.replace))
    monkeypatch.setattr(ckpt.shutil, "rmtree", check(ckpt.shutil.rmtree))
    save_step(root, 4, value=2.0, window_pos=1)
    assert broken == []
    assert saved_value(root / name) == 2.0 and not (root / f".old-{name}").exists()


@pytest.mark.parametrize("crash", ["second rename raises", "fault point"])
def test_killed_between_the_two_renames_resumes_from_the_old_twin(tmp_path, monkeypatch, crash):
    root = tmp_path / "checkpoints"
    save_step(root, 2, value=0.5)
    save_step(root, 4, value=1.0)

    class Killed(BaseException):
        pass

    fault = None
    if crash == "second rename raises":  # old → .old-step-N done, new tmp → step-N not yet
        real, calls = os.replace, []

        def replace(src, dst):
            calls.append(src)
            if len(calls) == 2:
                raise Killed
            return real(src, dst)

        monkeypatch.setattr(ckpt.os, "replace", replace)
    else:
        def fault(where, value):  # KOLORA_FAULTS=kill-ckpt-between-renames=4 does the same with SIGKILL
            if where == "ckpt-between-renames":
                raise Killed
    with pytest.raises(Killed):
        save_step(root, 4, value=2.0, window_pos=1, fault=fault)
    monkeypatch.undo()
    latest, skipped = ckpt.find_latest(root)
    assert latest == root / "step-000004", skipped
    assert ckpt.verify(latest, deep=True) is None and saved_value(latest) == 1.0


def test_the_same_state_is_never_saved_twice(tmp_path, monkeypatch):
    """SIGTERM on a save step asked for a second save of the very same step: rewriting it only
    opens a window for the SIGKILL that follows a pre-emption's SIGTERM."""
    root = tmp_path / "checkpoints"
    first = save_step(root, 4, value=1.0)
    manifest = (first / ckpt.MANIFEST).read_bytes()
    renames = []
    real = os.replace
    monkeypatch.setattr(ckpt.os, "replace", lambda a, b: (renames.append(a), real(a, b)))
    assert save_step(root, 4, value=1.0) == first
    assert renames == [] and (first / ckpt.MANIFEST).read_bytes() == manifest
    assert sorted(p.name for p in root.iterdir()) == ["step-000004"]
    save_step(root, 4, value=1.5, window_pos=1)  # another state of the same step is saved
    assert saved_value(first) == 1.5


def test_checkpoint_is_fsynced_before_and_after_the_rename(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    events = []
    real_fsync, real_replace = ckpt._fsync, os.replace
    monkeypatch.setattr(ckpt, "_fsync", lambda p: (events.append(("fsync", Path(p).name)), real_fsync(p)))
    monkeypatch.setattr(ckpt.os, "replace", lambda a, b: (events.append(("rename", Path(b).name)), real_replace(a, b)))
    save_step(root, 4, value=1.0)
    rename = events.index(("rename", "step-000004"))
    before, after = events[:rename], events[rename + 1:]
    assert ("fsync", ".tmp-step-000004") in before  # the folder's entries, not only its files
    assert ("fsync", "optimizer.safetensors") in before and ("fsync", "adapter") in before
    assert ("fsync", "checkpoints") in after


# --------------------------------------------------------------------------- run.json and metrics.jsonl
def test_run_json_is_replaced_atomically(tmp_path, monkeypatch):
    from kolora import runs

    run = runs.Run(tmp_path)
    run.update_info(model="tiny")
    before = run.info_file.read_bytes()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        run.update_info(summary={"steps": 8})
    assert run.info_file.read_bytes() == before  # never a half-written run.json
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_truncate_metrics_tolerates_a_torn_last_line(tmp_path):
    from kolora.runs import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"kind": "train", "step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    path.write_text("\n".join(lines) + '\n{"kind": "train", "st', encoding="utf-8")  # killed mid-write
    assert truncate_metrics(path, 2) == 2
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
