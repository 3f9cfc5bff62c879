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


@pytest.fixture
def fake_gpu(monkeypatch):
    """A machine with a GPU, as far as loading can tell; from_pretrained records what it was asked."""
    import peft  # noqa: F401 - imports bitsandbytes, which must see the real (CUDA-less) torch
    import torch
    from transformers import AutoModelForCausalLM

    from kolora import models

    calls = []

    class Loaded(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(2, 2)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(models, "bnb_config", lambda quantization, dtype: f"bnb-{quantization}")
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda path, **kwargs: calls.append(kwargs) or Loaded())
    return calls


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_a_quantized_model_loads_on_the_gpu_when_there_is_one(tiny_models, fake_gpu, bits):
    from kolora.models import ModelSource, load_model

    load_model(ModelSource("tiny", str(tiny_models["llama"]), "local"), "float32", bits)
    assert fake_gpu[-1]["quantization_config"] == f"bnb-{bits}"
    assert str(fake_gpu[-1]["device_map"][""]) == "cuda:0"


def test_qlora_chat_eval_and_serve_load_the_tuned_model_on_the_gpu(tiny_models, fake_gpu, tmp_path, monkeypatch):
    """generation.load_tuned, which chat, eval and serve load a run with."""
    import peft

    from kolora.config import RunConfig, save_yaml
    from kolora.generation import load_tuned
    from kolora.runs import Run

    run = Run(tmp_path / "run")
    cfg = RunConfig()
    cfg.model.name, cfg.model.quantization = str(tiny_models["llama"]), "4bit"
    run.path.mkdir()
    save_yaml(cfg, run.config_file)
    shutil.copytree(tiny_models["llama"], run.tokenizer, ignore=shutil.ignore_patterns("*.safetensors"))
    monkeypatch.setattr(peft.PeftModel, "from_pretrained", lambda base, path: base)
    monkeypatch.setattr("kolora.generation.inference_dtype", lambda: "float32")
    load_tuned(run)
    assert str(fake_gpu[-1]["device_map"][""]) == "cuda:0"


def test_tests_have_their_own_cache_and_share_only_the_converted_models():
    import os
    from pathlib import Path

    import conftest

    from kolora.models import _converted, cache_root

    cache, home = Path(os.environ["KOLORA_CACHE"]), Path.home() / ".cache" / "kolora"
    assert cache_root() == cache and not cache.resolve().is_relative_to(home.resolve())
    USER_CACHE = conftest.USER_CACHE  # noqa: N806
    assert not cache.resolve().is_relative_to(USER_CACHE.resolve())
    assert (cache / "models").resolve() == (USER_CACHE / "models").resolve()
    for name, preset in PRESETS.items():  # converted once in the user's cache: found, not converted again
        if _converted(USER_CACHE / "models" / name, preset.sha256):
            assert _converted(cache / "models" / name, preset.sha256)
