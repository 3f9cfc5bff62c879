import json
import shutil

import pytest
from conftest import TINY_TRAIN, run_cli

from kolora.errors import KoloraError
from kolora.models import PRESETS, resolve


def fake_hub_cache(root, repo_id: str, model_dir):
    """Lay a local model out as the Hugging Face cache does (what a past download leaves)."""
    org, name = repo_id.split("/")
    repo = root / f"models--{org}--{name}"
    snap = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(model_dir, snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(snap.name)
    return root


def test_hub_id_works_offline_from_the_local_cache(tiny_models, small_csv, tmp_path):
    cache = fake_hub_cache(tmp_path / "hub", "kolora-test/tiny-llama", tiny_models["llama"])
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    r = run_cli("train", "--model", "kolora-test/tiny-llama", "--data", str(small_csv), "--out", str(tmp_path / "run"),
                *TINY_TRAIN, "--max-steps", "2", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "run" / "run.json").read_text())["model_source"] == "hub"
    r = run_cli("chat", str(tmp_path / "run"), "-q", "전세란?", "--max-new-tokens", "3", env=env)
    assert r.returncode == 0, r.stderr


def test_unreachable_hub_id_is_one_line_naming_presets(tmp_path):
    r = run_cli("inspect", "skt/kogpt2-base-v2", env={"HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2
    assert "cannot load 'skt/kogpt2-base-v2' from the Hugging Face hub" in r.stderr
    assert "gemma3-270m" in r.stderr and "Traceback" not in r.stderr


def test_resolve_errors():
    with pytest.raises(KoloraError) as e:
        resolve("smollm2")
    assert "did you mean 'smollm2-135m'" in e.value.one_line()
    with pytest.raises(KoloraError, match="GGUF file not found"):
        resolve("/no/such/model.gguf")


def test_local_directory_without_config(tmp_path):
    with pytest.raises(KoloraError, match="without config.json"):
        resolve(str(tmp_path))


def test_preset_checksums_match_the_bundled_files():
    """Each preset's pinned sha256 is the hash of the GGUF its package ships (make install
    installs both), so a corrupted or swapped file cannot pass as the preset."""
    from kolora.models import _sha256

    for preset in PRESETS.values():
        path = preset.locate()
        assert _sha256(path) == preset.sha256, f"{preset.name}: {path} does not hash to the pinned sha256"
