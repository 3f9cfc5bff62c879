"""`--force` replaces only what kolora wrote: a folder marked as a run (run.json), a merged model
(kolora-merge.json) or an export (kolora-export.json, only the files it lists). Any other
non-empty folder is refused in one line that names it, and nothing in it is touched."""

import json
import shutil
from pathlib import Path

import pytest
from conftest import TINY_TRAIN, run_cli

from kolora import runs
from kolora.errors import KoloraError


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_line_refusal(r, *fragments):
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("kolora:")]
    assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    for frag in fragments:
        assert frag in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_run(tiny_models, small_csv, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("own") / "run"
    r = run_cli("train", "--model", str(tiny_models["llama"]), "--data", str(small_csv), "--out", str(run),
                *TINY_TRAIN, "--train.max_steps", "2", "--train.health_check", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    return run


# --------------------------------------------------------------------------- the shared rule
def test_claim_new_or_empty_folder_needs_no_force(tmp_path):
    assert runs.claim_output_dir(tmp_path / "new", "merge", force=False) == []
    (tmp_path / "empty").mkdir()
    assert runs.claim_output_dir(tmp_path / "empty", "export", force=False) == []


@pytest.mark.parametrize("kind", ["run", "merge", "export"])
def test_claim_refuses_a_folder_kolora_did_not_write(tmp_path, kind):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(KoloraError) as caught:
        runs.claim_output_dir(out, kind, force=True)
    assert str(out) in str(caught.value) and "empty or new" in caught.value.one_line()
    assert (out / "thesis.tex").read_text() == "years of work"


def test_claim_of_a_marked_folder_lists_only_what_kolora_wrote(tmp_path):
    out = tmp_path / "gguf"
    out.mkdir()
    for name in ("run-q8_0.gguf", "Modelfile", "notes.txt"):
        (out / name).write_text(name)
    (out / "kolora-export.json").write_text(json.dumps(
        {"gguf": "run-q8_0.gguf", "files": ["run-q8_0.gguf", "Modelfile", "kolora-export.json", "../escape"]}))
    with pytest.raises(KoloraError, match="not empty"):
        runs.claim_output_dir(out, "export", force=False)
    owned = runs.claim_output_dir(out, "export", force=True)
    assert sorted(p.name for p in owned) == ["Modelfile", "kolora-export.json", "run-q8_0.gguf"]
    # a file of the user's where the new export would write is never overwritten
    with pytest.raises(KoloraError, match="notes.txt"):
        runs.claim_output_dir(out, "export", force=True, writes=["notes.txt"])


# --------------------------------------------------------------------------- train
def test_train_force_refuses_a_folder_of_runs(tiny_models, small_csv, tmp_path):
    """`--out runs --force` used to delete every run in runs/."""
    parent = tmp_path / "runs"
    for name in ("demo", "other"):
        (parent / name).mkdir(parents=True)
        (parent / name / "run.json").write_text("{}")
        (parent / name / "config.yaml").write_text("model: {}\n")
    before = snapshot(parent)
    r = run_cli("train", "--model", str(tiny_models["llama"]), "--data", str(small_csv), "--out", str(parent),
                "--force", *TINY_TRAIN)
    assert_one_line_refusal(r, str(parent), "run.json", "empty or new")
    assert snapshot(parent) == before


def test_train_force_replaces_a_kolora_run(tiny_run, tiny_models, small_csv, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "checkpoints" / "step-000099").mkdir()
    r = run_cli("train", "--model", str(tiny_models["llama"]), "--data", str(small_csv), "--out", str(run),
                "--force", *TINY_TRAIN, "--train.max_steps", "1", "--train.health_check", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (run / "checkpoints" / "step-000099").exists()
    assert json.loads((run / "run.json").read_text())["summary"]["steps"] == 1


# --------------------------------------------------------------------------- merge
def test_merge_force_refuses_a_folder_it_did_not_write(tiny_run, tmp_path):
    """`kolora merge runs/demo --out ~/models --force` used to wipe ~/models."""
    models = tmp_path / "models"
    (models / "someone-elses-model").mkdir(parents=True)
    (models / "someone-elses-model" / "config.json").write_text("{}")
    before = snapshot(models)
    r = run_cli("merge", str(tiny_run), "--out", str(models), "--force")
    assert_one_line_refusal(r, str(models), "kolora-merge.json")
    assert snapshot(models) == before


def test_merge_force_replaces_only_its_previous_merge(tiny_run, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()  # an existing empty folder is fine without --force
    r = run_cli("merge", str(tiny_run), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    written = json.loads((out / "kolora-merge.json").read_text())["files"]
    assert "model.safetensors" in written and "kolora-merge.json" in written
    (out / "README.md").write_text("my notes")  # the user's, added later
    (out / "model.safetensors").write_bytes(b"stale")
    r = run_cli("merge", str(tiny_run), "--out", str(out))
    assert_one_line_refusal(r, "not empty", "--force")
    r = run_cli("merge", str(tiny_run), "--out", str(out), "--force")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "README.md").read_text() == "my notes"
    assert (out / "model.safetensors").stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temp folder left beside it
