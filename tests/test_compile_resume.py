"""Reliability with torch.compile on: a run killed inside an accumulation window and resumed
reproduces the uninterrupted compiled run (the compiled decoder layers keep their parameter
names, so checkpoints, adapters and resume work as in eager mode)."""

import signal

import pytest
from conftest import run_cli
from test_reliability import RUN_FLAGS, max_adapter_diff, train_losses, unusable_complete_checkpoints

COMPILED = [*RUN_FLAGS, "--train.compile", "true", "--train.max_steps", "4", "--train.eval_every", "2",
            "--train.save_every", "2"]


@pytest.mark.slow
def test_compiled_run_killed_and_resumed_matches_the_uninterrupted_one(tiny_models, small_csv, tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    r = run_cli("train", "--model", str(tiny_models["llama"]), "--data", str(small_csv), "--out", str(ref), *COMPILED)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "torch.compile of the decoder layers: on (train.compile)" in r.stdout
    r = run_cli("train", "--model", str(tiny_models["llama"]), "--data", str(small_csv), "--out", str(run), *COMPILED,
                env={"KOLORA_FAULTS": "kill-at-micro=5"})
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-2000:])
    assert unusable_complete_checkpoints(run) == []
    r = run_cli("train", "--resume", str(run))
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = train_losses(ref), train_losses(run)
    assert a.keys() == b.keys()
    assert max(abs(a[s] - b[s]) for s in a) <= 1e-5 and max_adapter_diff(ref, run) <= 1e-5
