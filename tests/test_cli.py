"""End to end through the CLI, as a user runs it: train → chat → merge, and every bad input."""

import json
import re

import pytest
from conftest import TINY_TRAIN, run_cli


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr + result.stdout
    err = result.stderr.strip()
    assert "Traceback" not in err and "Traceback" not in result.stdout
    lines = [line for line in err.splitlines() if line.startswith("kolora:")]
    assert len(lines) == 1, err
    for frag in fragments:
        assert frag in lines[0], lines[0]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_train_chat_merge_end_to_end(tiny_models, small_csv, tmp_path, arch):
    run = tmp_path / "run"
    r = run_cli("train", "--model", str(tiny_models[arch]), "--data", str(small_csv), "--out", str(run), *TINY_TRAIN)
    assert r.returncode == 0, r.stderr
    assert "test loss: base" in r.stdout
    # the run directory describes itself
    for rel in ("config.yaml", "run.json", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                "tokenizer/tokenizer_config.json", "metrics.jsonl", "data/train.jsonl", "data/test.jsonl"):
        assert (run / rel).exists(), rel
    assert (run / "config.yaml").read_text(encoding="utf-8").startswith("# kolora train --config")
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    kinds = {e["kind"] for e in events}
    assert {"train", "eval", "test"} <= kinds
    train_steps = [e["step"] for e in events if e["kind"] == "train"]
    assert train_steps == list(range(1, 7))
    assert all(e["tokens_per_s"] > 0 for e in events if e["kind"] == "train")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000003", "step-000006"]
    info = json.loads((run / "run.json").read_text())
    assert info["summary"]["steps"] == 6 and info["summary"]["test_loss_tuned"] > 0

    r = run_cli("chat", str(run), "--question", "전세권이란?", "--max-new-tokens", "5")
    assert r.returncode == 0, r.stderr
    r = run_cli("chat", str(run), "--quick-test", "2", "--compare", "--max-new-tokens", "5")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("기본 모델:") == 2 and r.stdout.count("튜닝 모델:") == 2

    r = run_cli("merge", str(run), "--out", str(tmp_path / "merged"))
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "merged" / "kolora-merge.json").read_text())
    assert report["ok"] and report["max_logit_diff"] < 1e-3
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # stock transformers loads it


def test_interactive_chat_reads_stdin(tiny_models, small_csv, tmp_path):
    import subprocess
    import sys

    run = tmp_path / "run"
    r = run_cli("train", "--model", str(tiny_models["gemma3"]), "--data", str(small_csv), "--out", str(run), *TINY_TRAIN,
                "--max-steps", "2")
    assert r.returncode == 0, r.stderr
    p = subprocess.run([sys.executable, "-m", "kolora", "chat", str(run), "--max-new-tokens", "4"],
                       input="전세란?\n/base\n전세란?\n/exit\n", capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "now answering with the base model" in p.stderr


def test_resume_continues_from_checkpoint(tiny_models, small_csv, tmp_path):
    import shutil

    run = tmp_path / "run"
    r = run_cli("train", "--model", str(tiny_models["llama"]), "--data", str(small_csv), "--out", str(run), *TINY_TRAIN)
    assert r.returncode == 0, r.stderr

    def losses():
        return {e["step"]: e["loss"] for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if e["kind"] == "train"}
    uninterrupted = losses()
    # A crash after the step-3 checkpoint: the later checkpoint never got written.
    shutil.rmtree(run / "checkpoints" / "step-000006")
    r = run_cli("train", "--resume", str(run))
    assert r.returncode == 0, r.stderr
    assert "resumed from step-000003" in r.stdout
    resumed = losses()  # later lines for steps 4-6 overwrite the first run's
    # Same data order, optimizer, scheduler and RNG: steps 4-6 repeat exactly.
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(uninterrupted[step], abs=1e-6), step


def test_existing_output_dir_is_not_overwritten(tiny_models, small_csv, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "something").write_text("x")
    r = run_cli("train", "--model", str(tiny_models["llama"]), "--data", str(small_csv), "--out", str(run))
    assert_one_line_error(r, "already holds a run", "--force")


def test_dry_run_prints_plan_and_trains_nothing(tiny_models, small_csv, tmp_path):
    r = run_cli("train", "--model", str(tiny_models["phi"]), "--data", str(small_csv), "--out", str(tmp_path / "r"),
                "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "plan:" in r.stdout and "peak memory" in r.stdout and "nothing was trained" in r.stdout
    assert not (tmp_path / "r" / "adapter").exists()


def test_prepare_reports_counts_lengths_and_too_long(tiny_models, small_csv):
    r = run_cli("prepare", str(small_csv), "--model", str(tiny_models["llama"]), "--max-length", "60")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "60 rows read" in out and "train" in out and "validation" in out and "test" in out
    assert "p50" in out and "p95" in out and "Korean characters per answer token" in out
    assert "rows over data.max_length=60:" in out and "dropped" in out


BAD_INPUTS = {
    "missing file": (["prepare", "nope.csv"], ["data file not found: nope.csv"]),
    "unknown model": (["train", "--model", "gemma-270m", "--dry-run"], ["unknown model 'gemma-270m'", "gemma3-270m"]),
    "unknown config key": (["train", "--train.learning_rate", "1"], ["unrecognized arguments", "train.lr"]),
    "offline hub id": (["train", "--model", "someone/not-cached-model", "--dry-run"],
                       ["Hugging Face hub", "gemma3-270m"]),
    "offline hub dataset": (["prepare", "someone/korean-qa"], ["cannot load dataset 'someone/korean-qa'"]),
}


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_input_is_one_clear_line(kind):
    args, fragments = BAD_INPUTS[kind]
    assert_one_line_error(run_cli(*args), *fragments)


def test_bad_data_files_are_one_clear_line(tiny_models, tmp_path):
    cases = {
        "enc.csv": (b"question,answer\n\xff\xfe\xfa,\x80\x81\n", "cannot decode"),
        "cols.csv": ("질문내용,answer\n가,나\n".encode(), "no 'question' column"),
        "empty.csv": ("question,answer\n가,   \n".encode(), "no usable examples"),
    }
    for name, (raw, fragment) in cases.items():
        (tmp_path / name).write_bytes(raw)
        r = run_cli("prepare", str(tmp_path / name), "--model", str(tiny_models["llama"]))
        assert_one_line_error(r, fragment, name)


def test_unknown_yaml_key_names_file_and_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  name: gemma3-270m\nlora:\n  rank: 8\n", encoding="utf-8")
    assert_one_line_error(run_cli("train", "--config", str(cfg)), f"{cfg}:4", "lora.rank", "lora.r")


def test_debug_shows_traceback():
    r = run_cli("--debug", "prepare", "nope.csv")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_models_doctor_inspect(tiny_models):
    r = run_cli("models")
    assert r.returncode == 0 and "gemma3-270m" in r.stdout and "smollm2-135m" in r.stdout
    assert "skt/kogpt2-base-v2" in r.stdout
    r = run_cli("doctor")
    assert r.returncode == 0 and "torch" in r.stdout and "bf16" in r.stdout and "RAM" in r.stdout
    # kolora's entry point turns torch's huge-page allocation on before torch loads (device.allocator_defaults)
    assert "THP_MEM_ALLOC_ENABLE=1" in r.stdout
    r = run_cli("doctor", env={"THP_MEM_ALLOC_ENABLE": "0"})  # a user's own choice wins
    assert r.returncode == 0 and "THP_MEM_ALLOC_ENABLE=0" in r.stdout
    r = run_cli("inspect", str(tiny_models["gpt2"]), "--r", "8")
    assert r.returncode == 0, r.stderr
    assert "suggested LoRA targets: c_attn,c_proj,c_fc" in r.stdout and "trainable parameters" in r.stdout


def test_training_options_gradient_checkpointing_dora_rslora_tensorboard_train_only(tiny_models, small_csv, tmp_path):
    run = tmp_path / "run"
    index = tmp_path / "index.csv"
    index.write_text("question,answer\n제303조는 무엇을 정하나요?,민법 제303조(전세권의 내용)입니다.\n", encoding="utf-8")
    r = run_cli("train", "--model", str(tiny_models["gemma3"]), "--data", str(small_csv), "--out", str(run),
                *TINY_TRAIN, "--max-steps", "2", "--train.gradient_checkpointing", "true", "--lora.use_dora", "true",
                "--lora.use_rslora", "true", "--train.tensorboard", "true", "--data.train_only", str(index),
                "--train.fact_weight", "3")
    assert r.returncode == 0, r.stderr
    assert "1 rows read (utf-8), 1 kept (training only)" in r.stdout
    assert re.search(r"train.fact_weight 3: [\d,]+ of [\d,]+ answer tokens \([\d.]+%\) state a fact", r.stdout)
    train_rows = [json.loads(x) for x in (run / "data" / "train.jsonl").read_text().splitlines()]
    assert [x["question"] for x in train_rows if x.get("source") == str(index)] == ["제303조는 무엇을 정하나요?"]
    assert "제303조는" not in (run / "data" / "test.jsonl").read_text()
    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True and cfg["use_rslora"] is True
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    train_events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert all(0 < e["mfu"] < 1 for e in train_events)


def test_early_stopping(tiny_models, small_csv, tmp_path):
    run = tmp_path / "run"
    # lr 0: the validation loss cannot improve, so patience 1 stops at the first evaluation.
    r = run_cli("train", "--model", str(tiny_models["llama"]), "--data", str(small_csv), "--out", str(run),
                *TINY_TRAIN, "--max-steps", "20", "--train.eval_every", "2", "--train.lr", "0",
                "--train.early_stopping_patience", "1")
    assert r.returncode == 0, r.stderr
    summary = json.loads((run / "run.json").read_text())["summary"]
    assert summary["steps"] == 2 and summary["stop_reason"].startswith("early stopping")


def test_help_lists_every_config_key_with_its_text():
    r = run_cli("train", "--help")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    assert "--train.gradient_checkpointing" in text and "~30% slower" in text  # '%' is escaped for argparse
    from kolora.config import all_keys

    for key in all_keys():
        assert f"--{key}" in text, key
