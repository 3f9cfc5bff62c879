from pathlib import Path

import pytest

from kolora.cli import build_parser
from kolora.config import RunConfig, build_config, load_yaml, parse_scalar
from kolora.errors import KoloraError

ROOT = Path(__file__).resolve().parents[1]


def test_every_preset_loads_and_starts_with_its_command():
    presets = sorted((ROOT / "configs").glob("*.yaml"))
    names = {p.stem for p in presets}
    assert {"gemma3-270m", "smollm2-135m", "kogpt2", "tinyllama-qlora", "phi2-qlora"} <= names
    for path in presets:
        first = path.read_text(encoding="utf-8").splitlines()[0]
        assert first == f"# kolora train --config configs/{path.name}", path
        cfg = load_yaml(path)
        assert cfg.model.name and cfg.data.path


def test_unknown_key_names_file_line_and_suggestion(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: gemma3-270m\ntrain:\n  epochs: 1\n  learning_rate: 1e-4\n", encoding="utf-8")
    with pytest.raises(KoloraError) as e:
        load_yaml(bad)
    assert f"{bad}:5" in str(e.value) and "train.learning_rate" in str(e.value)
    assert "train.lr" in e.value.hint


def test_unknown_section_and_bad_type(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trian:\n  epochs: 1\n", encoding="utf-8")
    with pytest.raises(KoloraError, match=r"bad.yaml:1: unknown section 'trian'"):
        load_yaml(bad)
    bad.write_text("train:\n  batch_size: many\n", encoding="utf-8")
    with pytest.raises(KoloraError, match="batch_size"):
        load_yaml(bad)


def test_cli_flags_override_yaml_with_types():
    args = build_parser().parse_args(["train", "--config", str(ROOT / "configs" / "gemma3-270m.yaml"),
                                      "--train.lr", "1e-4", "--lora.use_dora", "true", "--data.split", "0.7,0.2,0.1",
                                      "--max-steps", "7", "--model", "smollm2-135m"])
    cfg = build_config(args)
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.lora.use_dora is True
    assert cfg.data.split == [0.7, 0.2, 0.1]
    assert cfg.train.max_steps == 7
    assert cfg.model.name == "smollm2-135m"
    assert cfg.train.output_dir == "runs/demo"  # from the YAML, untouched


def test_unknown_flag_is_one_line_with_suggestion():
    with pytest.raises(KoloraError) as e:
        build_parser().parse_args(["train", "--train.learning-rate", "1"])
    assert "train.lr" in e.value.one_line() or "train.learning" in e.value.one_line()


def test_parse_scalar():
    assert parse_scalar("1e-4") == pytest.approx(1e-4)
    assert parse_scalar("true") is True
    assert parse_scalar("3") == 3
    assert parse_scalar("q_proj,v_proj") == "q_proj,v_proj"


def test_every_field_has_help():
    from dataclasses import fields

    cfg = RunConfig()
    for section in ("model", "data", "lora", "train"):
        for f in fields(getattr(cfg, section)):
            assert f.metadata.get("help"), f"{section}.{f.name} has no help text"
