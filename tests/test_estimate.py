"""`kolora estimate`: memory parts that add up, a measured activation profile that extrapolates,
verdicts that name the change that fits, and the same numbers in `kolora train --dry-run`.
Real-model accuracy (predicted vs measured peak RSS) is bench/estimate_validation.py's job."""

import json

import pytest
from conftest import run_cli

from kolora.config import RunConfig
from kolora.estimator import (
    HEAP_RETENTION,
    ActivationProfile,
    Setting,
    _saved_bytes,
    advise,
    model_facts,
    parse_device,
    probe_activations,
    weight_bytes,
)

GiB = 2**30


def tiny_cfg(path, **train) -> RunConfig:
    cfg = RunConfig()
    cfg.model.name = str(path)
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def estimate_json(*args):
    r = run_cli("estimate", *args, "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


def test_estimate_prints_parts_that_add_up_to_the_peak(tiny_models, small_csv):
    est = estimate_json("--model", str(tiny_models["llama"]), "--data", str(small_csv), "--data.max_length", "512")
    parts, phases = est["parts_gib"], est["phases_gib"]
    steady = parts["runtime"] + parts["weights"]
    assert phases["train"] == pytest.approx(steady + parts["lora_state"] + parts["activations"] + parts["logits"]
                                            + parts["heap_train"])
    assert phases["eval"] == pytest.approx(steady + parts["lora_state"] + parts["eval_batch"] + parts["heap_eval"])
    assert parts["heap_train"] == pytest.approx(parts["activations"] * (HEAP_RETENTION - 1))
    assert phases["load"] == pytest.approx(steady + parts["loading"])
    assert est["peak_gib"] == pytest.approx(max(phases.values()))
    assert est["fits"] and est["verdict"].startswith("fits")
    assert est["step_seconds"] > 0 and est["steps"] > 0
    assert 0 < parts["runtime"] < 4, "runtime = this process's libraries + tokenizer"


def test_estimate_text_names_every_part_and_the_verdict(tiny_models, small_csv):
    r = run_cli("estimate", "--model", str(tiny_models["gemma3"]), "--data", str(small_csv), "--data.max_length", "512")
    assert r.returncode == 0, r.stderr[-2000:]
    for word in ("peak memory", "base weights", "LoRA + AdamW", "activations", "logits", "evaluation batch",
                 "per optimizer step", "verdict"):
        assert word in r.stdout, word


def test_activation_probe_extrapolates_to_a_deeper_model(tiny_models):
    """The profile comes from 1- and 2-layer copies; it must predict what a 4-layer model keeps."""
    import torch

    cfg = tiny_cfg(tiny_models["llama"])
    facts = model_facts(cfg)
    profile = probe_activations(facts, cfg, "bf16")
    facts.config.num_hidden_layers = 4
    for rows, seq in ((2, 96), (3, 160)):
        predicted = profile.saved(rows * seq, seq, 4, checkpointing=False)
        measured = _saved_bytes(facts.config, cfg, torch.bfloat16, torch.bfloat16, 4, rows, seq, False)
        # the small-vocab output layer of the copies is in `measured`, not in the layer terms
        assert predicted == pytest.approx(measured, rel=0.10), (rows, seq)


def test_checkpointing_keeps_far_less_than_full_activations(tiny_models):
    cfg = tiny_cfg(tiny_models["llama"])
    profile = probe_activations(model_facts(cfg), cfg, "bf16")
    assert 0 < profile.ckpt_per_layer < profile.per_layer / 4
    assert profile.saved(1024, 256, 24, True) < profile.saved(1024, 256, 24, False) / 3


def test_weight_bytes_follow_dtype_and_quantization(tiny_models):
    facts = model_facts(tiny_cfg(tiny_models["llama"]))
    fp32, bf16 = weight_bytes(facts, "float32", "none"), weight_bytes(facts, "bfloat16", "none")
    assert fp32 == 2 * bf16 == 4 * facts.n_params
    # NF4 on the decoder's linear weights; peft's kbit preparation makes everything else float32
    nf4 = weight_bytes(facts, "bfloat16", "4bit")
    assert nf4 == pytest.approx(facts.n_layer_linear * 0.516 + (facts.n_params - facts.n_layer_linear) * 4, rel=1e-3)


BASE = Setting(batch_size=8, max_length=512, checkpointing=True, quantization="none")


@pytest.mark.parametrize("fits, verdict", [
    (lambda s: True, "fits"),
    (lambda s: s.batch_size <= 2, "lower train.batch_size to 2 (and raise train.grad_accum to 8"),
    (lambda s: s.quantization == "4bit", "use QLoRA (model.quantization: 4bit)"),
    (lambda s: s.max_length <= 256, "lower data.max_length to 256"),
    (lambda s: False, "does not fit even with"),
])
def test_verdict_names_the_least_costly_change_that_fits(fits, verdict):
    text, _ = advise(fits, BASE, grad_accum=2, allow_qlora=True)
    assert verdict in text


def test_verdict_lists_the_other_changes_that_also_fit():
    text, others = advise(lambda s: s.batch_size <= 4 or s.quantization == "4bit", BASE, 2, True)
    assert "train.batch_size to 4" in text and others == ["use QLoRA (model.quantization: 4bit)"]


@pytest.mark.slow  # two estimates in subprocesses
def test_a_small_gpu_gets_a_verdict_with_a_fix(tiny_models, small_csv):
    big = estimate_json("--model", str(tiny_models["gemma3"]), "--data", str(small_csv), "--data.max_length", "512",
                        "--device", "cuda:8GB")
    assert big["fits"] and big["parts_gib"]["runtime"] == pytest.approx(0.5)  # the CUDA context
    assert big["parts_gib"]["loading"] == 0  # weights load straight onto the GPU
    assert big["parts_gib"]["heap_train"] == 0  # glibc's heap is a CPU matter
    need = big["peak_gib"] - 0.5
    tight = estimate_json("--model", str(tiny_models["gemma3"]), "--data", str(small_csv), "--data.max_length", "512",
                          "--device", f"cuda:{0.5 + need * 0.7:.4f}GB")
    assert not tight["fits"] and tight["verdict"].startswith("does not fit — ")


def test_device_strings():
    assert parse_device("cuda:8GB", "bf16", None).budget == 8 * GiB
    assert parse_device("CUDA:12gb", "bf16", 100.0).peak_gflops == 100_000
    with pytest.raises(Exception, match="cuda:<N>GB"):
        parse_device("gpu", "bf16", None)


def test_bad_device_and_uncached_hub_model_are_one_line_errors(tiny_models, small_csv):
    r = run_cli("estimate", "--model", str(tiny_models["llama"]), "--data", str(small_csv), "--device", "tpu")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--device" in r.stderr
    r = run_cli("estimate", "--model", "nobody-here/no-such-model-xyz", "--data", str(small_csv))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len([line for line in r.stderr.splitlines() if line.startswith("kolora:")]) == 1


def test_dry_run_prints_the_same_estimate(tiny_models, small_csv, tmp_path):
    r = run_cli("train", "--model", str(tiny_models["llama"]), "--data", str(small_csv), "--out", str(tmp_path / "r"),
                "--data.max_length", "512", "--dry-run")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "estimate: peak memory" in r.stdout and "estimate: verdict" in r.stdout
    assert "dry run: nothing was trained" in r.stdout
    assert not (tmp_path / "r" / "adapter").exists()


def test_profile_arithmetic():
    p = ActivationProfile(per_layer=1000.0, per_layer_seq=2.0, outside=-100.0, ckpt_per_layer=50.0, fixed=7.0)
    assert p.layer(100) == 1200
    assert p.saved(10, 100, 3, False) == 3 * (10 * 1200 + 7) - 10 * 100
    assert p.saved(10, 100, 3, True) == 10 * 3 * 50 + (10 * 1200 + 7) - 10 * 100  # + one layer recomputed


def test_a_hub_model_is_estimated_from_the_cached_config_without_weights(tiny_models, small_csv, tmp_path):
    """Only config.json and the tokenizer in the Hugging Face cache, offline: enough to estimate."""
    import shutil

    snapshot = tmp_path / "hub" / "models--kolora-test--no-weights" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for f in tiny_models["llama"].iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, snapshot / f.name)
    (tmp_path / "hub" / "models--kolora-test--no-weights" / "refs").mkdir()
    (tmp_path / "hub" / "models--kolora-test--no-weights" / "refs" / "main").write_text("0123abcd")
    r = run_cli("estimate", "--model", "kolora-test/no-weights", "--data", str(small_csv), "--data.max_length", "512",
                "--json", env={"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    est = json.loads(r.stdout)
    assert est["parts_gib"]["weights"] > 0 and est["fits"]


def test_a_grounded_config_is_estimated_with_its_passages(tiny_models, small_csv, tmp_path):
    """With retrieval.corpus every training row carries its retrieved passages (the demo's rows are
    ~3× longer); the estimate must see the rows `kolora train` plans, token for token."""
    import re
    from pathlib import Path

    from kolora.estimator import DataProfile
    from kolora.models import ModelSource, load_tokenizer

    statutes = Path(__file__).resolve().parents[1] / "data" / "statutes"
    flags = ["--model", str(tiny_models["llama"]), "--data", str(small_csv), "--data.max_length", "512",
             "--retrieval.corpus", str(statutes), "--retrieval.k", "2", "--retrieval.context_tokens", "96"]
    r = run_cli("train", *flags, "--out", str(tmp_path / "r"), "--dry-run")
    assert r.returncode == 0, r.stderr[-2000:]
    planned = int(re.search(r"plan: \d+ train rows, ([\d,]+) tokens/epoch", r.stdout)[1].replace(",", ""))

    cfg = tiny_cfg(tiny_models["llama"])
    cfg.data.path, cfg.data.max_length = str(small_csv), 512
    cfg.retrieval.corpus, cfg.retrieval.k, cfg.retrieval.context_tokens = [str(statutes)], 2, 96
    tok = load_tokenizer(ModelSource("llama", str(tiny_models["llama"]), "local"))
    grounded = DataProfile.from_config(cfg, tok)
    assert sum(n for n, _ in grounded.kept(grounded.train, 512)) == planned
    cfg.retrieval.corpus = []
    plain = DataProfile.from_config(cfg, tok)
    assert sum(n for n, _ in plain.train) < sum(n for n, _ in grounded.train)
    assert [a for _, a in plain.train] == [a for _, a in grounded.train]  # passages are prompt, not answer


def test_compiled_layers_are_estimated_with_their_calibration(tiny_models, small_csv, monkeypatch):
    """On a CPU training compiles its decoder layers (device.resolve_compile): the estimate then
    scales the eager probe's activations by COMPILED_ACTIVATIONS, counts no allocator slack (the
    heap is trimmed every step), the fused head's logits buffer in the compute dtype, and the
    compiled MFU. Gradient checkpointing turns compiling off, and the eager model back on."""
    from kolora import estimator

    cfg = tiny_cfg(tiny_models["llama"])
    cfg.data.path, cfg.data.max_length = str(small_csv), 512
    monkeypatch.setattr(estimator, "resolve_compile", lambda *a: (False, "off"))
    eager = estimator.estimate(cfg)
    monkeypatch.setattr(estimator, "resolve_compile", lambda *a: (True, "on"))
    compiled = estimator.estimate(cfg)
    e, c = eager.memory, compiled.memory
    assert c.activations == pytest.approx(e.activations * estimator.COMPILED_ACTIVATIONS)
    assert e.heap_train == pytest.approx(e.activations * (HEAP_RETENTION - 1)) and c.heap_train == 0
    bf16 = compiled.precision in ("bf16", "fp16")
    assert c.logits == pytest.approx(e.logits * (2 if bf16 else 4) / estimator.LOGIT_BYTES_TRAIN)
    mfu_compiled, mfu_eager, mfu_fp32 = estimator.CPU_MFU[estimator.cpu_class()]
    assert compiled.mfu == (mfu_compiled if bf16 else mfu_fp32)
    assert eager.mfu == pytest.approx(mfu_eager if bf16 else mfu_fp32 * mfu_eager / mfu_compiled)
    for est in (eager, compiled):
        assert est.step_seconds == pytest.approx(est.tokens_per_step * est.flops_per_token
                                                 / (est.device.peak_gflops * 1e9 * est.mfu))
    cfg.train.gradient_checkpointing = True
    ckpt = estimator.estimate(cfg).memory
    assert not ckpt.compiled and ckpt.heap_train == pytest.approx(ckpt.activations * (HEAP_RETENTION - 1))


@pytest.mark.parametrize("flags,kind", [("fpu avx512f avx512_bf16 amx_bf16 amx_tile", "amx"),
                                        ("fpu avx512f avx512_bf16", "avx512_bf16"),
                                        ("fpu avx2 fma", "other")])
def test_the_cpu_class_picks_the_mfu_calibrated_on_that_kind_of_cpu(monkeypatch, tmp_path, flags, kind):
    """Step time comes from the MFU measured on the same kind of CPU: AMX's bf16 matmul peak is
    about 3x AVX-512 BF16's, while a (memory-bound) training step is not, so one share fits
    neither. A CPU without bf16 instructions (float32 training) has its own calibration too."""
    import kolora.device as device
    from kolora import estimator

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    real_path = device.Path
    monkeypatch.setattr(device, "Path", lambda p: real_path(cpuinfo) if p == "/proc/cpuinfo" else real_path(p))
    assert device.cpu_class() == kind
    assert device.cpu_has_bf16() == (kind != "other")
    assert set(estimator.CPU_MFU) == {"amx", "avx512_bf16", "other"}
    monkeypatch.setattr(estimator, "matmul_peak_gflops", lambda precision: 100.0)
    monkeypatch.setattr(estimator, "cpu_class", device.cpu_class)
    compiled, eager, fp32 = estimator.CPU_MFU[kind]
    assert estimator.parse_device("cpu", "bf16", None, compiled=True).mfu == compiled
    assert estimator.parse_device("cpu", "bf16", None, compiled=False).mfu == eager
    assert estimator.parse_device("cpu", "no", None, compiled=True).mfu == fp32
    # float32 without compiled layers (gradient checkpointing) recomputes the forward, as eager bf16 does
    fp32_eager = estimator.parse_device("cpu", "no", None, compiled=False).mfu
    assert fp32_eager == pytest.approx(fp32 * eager / compiled) and fp32_eager < fp32
    note = estimator.parse_device("cpu", "bf16", None, compiled=True).time_note
    assert ("without bf16 instructions" in note) == (kind == "other") and (kind in note or kind == "other")
