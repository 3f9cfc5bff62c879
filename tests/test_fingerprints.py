"""What a resume and the eval base-answer cache must match: the fingerprints."""

from __future__ import annotations

import pytest

from kolora import checkpoint as ckpt
from kolora.errors import KoloraError


def fingerprints(**changes) -> dict:
    fp = {"model": "m", "model_name": "tiny", "lora": {"r": 4}, "data": "d", "data_path": "x.csv", "train_rows": 10,
          "batching": [4, 2, 2], "seed": 42}
    fp.update(changes)
    return fp


@pytest.mark.parametrize("changes,expected", [
    ({"batching": [4, 2, 1]}, "2 processes then, 1 now"),
    ({"batching": [2, 2, 2]}, "train.batch_size: 4 then, 2 now"),
    ({"batching": [4, 4, 2]}, "train.grad_accum: 2 then, 4 now"),
    ({"seed": 7}, "train.seed: 42 then, 7 now"),
])
def test_resume_compares_batching_and_seed(changes, expected, tmp_path):
    with pytest.raises(KoloraError) as e:
        ckpt.compare_fingerprints(fingerprints(), fingerprints(**changes), tmp_path)
    line = e.value.one_line()
    assert "cannot resume" in line and expected in line and "\n" not in line


def test_a_checkpoint_from_before_the_seed_was_kept_still_resumes(tmp_path):
    old = fingerprints()
    del old["seed"]
    ckpt.compare_fingerprints(old, fingerprints(seed=7), tmp_path)
    ckpt.compare_fingerprints(fingerprints(), fingerprints(), tmp_path)


# --------------------------------------------------------------------------- the model, by content
def fake_model(folder, weights: bytes = b"\x01" * 64):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(weights)
    return folder


def test_same_size_new_bytes_change_the_model_fingerprint(tmp_path):
    model = fake_model(tmp_path / "m")
    before = ckpt.model_fingerprint(str(model))
    (model / "model.safetensors").write_bytes(b"\x02" * 64)  # same size: a re-conversion, another fine-tune
    assert ckpt.model_fingerprint(str(model)) != before


def test_each_weight_file_is_hashed_once(tmp_path, monkeypatch):
    monkeypatch.setenv("KOLORA_CACHE", str(tmp_path / "cache"))
    model = fake_model(tmp_path / "m")
    hashed = []
    real = ckpt.sha256_file
    monkeypatch.setattr(ckpt, "sha256_file", lambda f: hashed.append(f.name) or real(f))
    first = ckpt.model_fingerprint(str(model))
    assert hashed == ["model.safetensors"]
    assert ckpt.model_fingerprint(str(model)) == first and hashed == ["model.safetensors"]  # from the cache
    assert (tmp_path / "cache" / ckpt.HASH_CACHE).is_file()


def test_hub_models_are_fingerprinted_by_their_commit(tmp_path, monkeypatch):
    from test_models import fake_hub_cache

    model = fake_model(tmp_path / "m")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    fake_hub_cache(tmp_path / "hub", "org/tiny", model)
    commit = "0123456789abcdef0123456789abcdef01234567"
    assert ckpt.model_fingerprint("org/tiny") == f"hub:org/tiny@{commit}"
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / commit
    assert ckpt.model_fingerprint(str(snapshot)) == f"hub:models--org--tiny@{commit}"


def test_a_checkpoint_with_the_old_model_fingerprint_still_resumes(tmp_path):
    model = fake_model(tmp_path / "m")
    saved = fingerprints(model=ckpt.legacy_model_fingerprint(str(model)))
    ckpt.compare_fingerprints(saved, fingerprints(model=ckpt.model_fingerprint(str(model))), tmp_path, str(model))
    (model / "model.safetensors").write_bytes(b"\x01" * 65)  # what the old fingerprint did see: still refused
    with pytest.raises(KoloraError, match="model files"):
        ckpt.compare_fingerprints(saved, fingerprints(model=ckpt.model_fingerprint(str(model))), tmp_path, str(model))


# --------------------------------------------------------------------------- the eval base-answer cache
def cache_file_for(run, model, quantization="none"):
    from kolora.config import RunConfig
    from kolora.data import Example
    from kolora.evaluate import Plan, Side, base_cache_file
    from kolora.generation import GenConfig

    cfg = RunConfig()
    cfg.model.name, cfg.model.quantization = str(model), quantization
    side = Side("base", "base", str(model), open=None, untuned=True)
    plan = Plan(str(run), [Example("전세권이란?", "전세금을 지급하고 …")], "test", run / "eval", [side], cfg=cfg)
    return base_cache_file(side, plan, GenConfig(), 8)


def make_run(folder, model):
    import shutil

    (folder / "tokenizer").mkdir(parents=True)
    for f in model.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, folder / "tokenizer" / f.name)
    return folder


def test_a_4bit_run_and_an_unquantized_one_do_not_share_base_answers(tiny_models, tmp_path):
    model = tiny_models["llama"]
    q4, plain = make_run(tmp_path / "q4", model), make_run(tmp_path / "plain", model)
    assert cache_file_for(q4, model, "4bit") != cache_file_for(plain, model, "none")
    assert cache_file_for(plain, model) == cache_file_for(make_run(tmp_path / "plain2", model), model)


def test_the_runs_tokenizer_and_the_libraries_are_in_the_base_cache_key(tiny_models, tmp_path, monkeypatch):
    model = tiny_models["llama"]
    run = make_run(tmp_path / "run", model)
    before = cache_file_for(run, model)
    cfg = run / "tokenizer" / "tokenizer_config.json"
    cfg.write_text(cfg.read_text().replace("</s>", "<|end|>"))
    changed = cache_file_for(run, model)
    assert changed != before
    import importlib.metadata

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda n: "0.0.1" if n == "peft" else real(n))
    assert cache_file_for(run, model) != changed
    monkeypatch.undo()
    assert cache_file_for(run, model) == changed


def test_the_device_is_in_the_base_cache_key(tiny_models, tmp_path, monkeypatch):
    model = tiny_models["llama"]
    run = make_run(tmp_path / "run", model)
    monkeypatch.setattr("kolora.evaluate.inference_dtype", lambda: "float32")  # the same dtype: only the device differs
    cpu = cache_file_for(run, model)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.get_device_name", lambda i=0: "NVIDIA H200")
    assert cache_file_for(run, model) != cpu
