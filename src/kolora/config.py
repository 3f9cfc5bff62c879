"""Typed configuration. Every field has a help text; the CLI flags and YAML keys derive from it.

A run is described by one `RunConfig` with four sections (model, data, lora, train). YAML
presets under `configs/` set some of them; `--section.key value` on the command line sets
any of them.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import KoloraError, nearest


def opt(default, help: str):
    """A config field with its help text (shown by `kolora train --help`)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    name: str = opt("gemma3-270m", "preset (see `kolora models`), Hugging Face hub id, local model directory or .gguf file")
    dtype: str = opt("auto", "dtype of the frozen base weights: auto (bfloat16 when mixed precision is bf16, else float32), float32, bfloat16, float16")
    quantization: str = opt("none", "QLoRA base quantization through bitsandbytes: none, 4bit (NF4) or 8bit")
    trust_remote_code: bool = opt(False, "run model code shipped with a hub model; off unless you trust its author")


@dataclass
class DataConfig:
    path: str = opt("data/civil_law_qa.csv", "CSV (question,answer[,category,difficulty]), Alpaca/KoAlpaca JSON, JSONL (question/answer, instruction/input/output or messages), or a hub dataset name")
    max_length: int = opt(384, "max tokens of prompt + answer; longer rows are dropped and counted (never truncated, which would cut the EOS)")
    split: list = opt([0.8, 0.1, 0.1], "train / validation / test fractions (seeded, stratified by category when present)")
    seed: int = opt(42, "seed of the split")
    train_only: list = opt([], "more data files (same formats) used for training only, never for validation/test: "
                               "an article index, a glossary; a row whose question is also a held-out question is dropped and counted")
    system_prompt: str | None = opt(None, "system message put in every prompt (chat template) or above the question (fallback template)")
    template: str = opt("auto", "prompt format: auto (the model's chat template when it has one, else kolora's fallback) or fallback")


@dataclass
class LoraConfig:
    r: int = opt(16, "LoRA rank")
    alpha: int = opt(32, "LoRA alpha (scale = alpha / r, or alpha / sqrt(r) with rslora)")
    dropout: float = opt(0.05, "dropout on the LoRA input")
    target_modules: Any = opt("auto", "modules that get adapters: auto (per architecture, see `kolora inspect`), all-linear, or a comma-separated list")
    use_rslora: bool = opt(False, "rank-stabilised LoRA scaling (alpha / sqrt(r))")
    use_dora: bool = opt(False, "weight-decomposed LoRA (DoRA); slower, sometimes better at low rank")
    layers: int = opt(0, "adapters only on the last N decoder layers; 0 = every layer. Backward stops below the lowest "
                         "adapted layer, so a step over half the layers costs about a third less")


@dataclass
class TrainConfig:
    output_dir: str | None = opt(None, "run directory (default runs/<model>-<date>-<time>)")
    epochs: float = opt(2.0, "passes over the training split (ignored when max_steps > 0)")
    max_steps: int = opt(0, "optimizer steps to run; 0 means derive from epochs")
    batch_size: int = opt(4, "micro-batch size (sequences per forward pass)")
    grad_accum: int = opt(2, "micro-batches per optimizer step (effective batch = batch_size × grad_accum × processes)")
    lr: float = opt(2e-4, "peak learning rate of AdamW")
    weight_decay: float = opt(0.0, "AdamW weight decay on LoRA weights")
    warmup_ratio: float = opt(0.05, "share of steps with linear warm-up before the cosine decay")
    fact_weight: float = opt(1.0, "loss weight of answer tokens that state a fact (statute reference, period, amount, fraction, "
                                  "percentage, count: what `kolora eval` scores as fact recall); 1 = plain cross entropy")
    max_grad_norm: float = opt(1.0, "gradient clipping norm; 0 disables clipping (a NaN/inf gradient is still caught)")
    mixed_precision: str = opt("auto", "auto (bf16 where the CPU/GPU supports it), bf16, fp16 or no")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward: less memory, ~30% slower")
    compile: str = opt("auto", "torch.compile each decoder layer: auto (on a CPU with a C++ compiler, unquantized, no gradient checkpointing), true, false")
    attention: str = opt("auto", "attention kernel in training: auto (the model's own, SDPA), sdpa, or eager (matmul + softmax "
                                 "that torch.compile fuses; on a CPU it measured -3% to +10% tokens/s on short rows and more memory, "
                                 "which grows with the square of the length)")
    eval_every: int = opt(50, "evaluate validation loss every N optimizer steps (and always at the end); 0 = only at the end")
    save_every: int = opt(100, "write a checkpoint every N optimizer steps; 0 = only at the end")
    keep_checkpoints: int = opt(2, "how many recent checkpoints to keep (the best one by validation loss is kept too)")
    max_nonfinite_steps: int = opt(2, "optimizer steps with a NaN/inf loss or gradient that are skipped (no update) before the run stops; 0 = stop at the first")
    early_stopping_patience: int = opt(0, "stop after N evaluations without a better validation loss (adapter/ then holds the best); 0 = off")
    log_every: int = opt(5, "write a metrics.jsonl line every N optimizer steps")
    health_check: int = opt(4, "after training, answer N validation questions and warn if answers do not stop (no EOS) or loop; 0 = off")
    seed: int = opt(42, "seed of LoRA init, dropout and data order")
    threads: int = opt(0, "CPU threads for torch; 0 = all physical cores")
    tensorboard: bool = opt(True, "write TensorBoard logs to <run>/tensorboard")


@dataclass
class RetrievalConfig:
    corpus: list = opt([], "grounding corpus: files or folders of .md/.txt statutes (split into articles at 제N조) or .jsonl "
                           "passages {id, title, text}; empty = no retrieval (the model answers from memory)")
    k: int = opt(3, "passages retrieved for each question and placed before it in the prompt")
    context_tokens: int = opt(384, "token budget of the passages in one prompt; a longer passage keeps its first paragraphs")
    oracle_p: float = opt(0.8, "share of training rows in which the article the answer cites is put among the k passages "
                               "(at a random position) when retrieval missed it; the rest keep retrieval as it came (RAFT)")
    tokenizer: str = opt("char2", "retrieval tokenizer: char2 (character bigrams), kiwi (Korean morphemes, offline) or "
                                "char2+kiwi (both in one index)")
    expand: bool = opt(True, "index each passage together with the training rows (question and answer) whose answers "
                             "cite it (document expansion; never validation or test rows)")
    bm25_b: float = opt(0.35, "BM25 length normalisation (0 = none, 1 = full); 0.35 measured best on the bundled "
                              "statutes (bench/RETRIEVAL.md: long articles and articles with many expansion rows are "
                              "penalised less than the textbook 0.75)")
    expand_with: list = opt([], "more data files (same formats as data.path) whose questions only expand the index, "
                                "without being trained on: an article index; a row whose question is a held-out "
                                "question is dropped and counted")


SECTIONS = {"model": ModelConfig, "data": DataConfig, "lora": LoraConfig, "train": TrainConfig,
            "retrieval": RetrievalConfig}


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def set(self, dotted: str, value, source: str = "command line") -> None:
        """Set `section.key` from a YAML-typed value, checking the key and the type."""
        section, _, key = dotted.partition(".")
        if section not in SECTIONS or not key:
            guess = suggest_key(dotted)
            raise KoloraError(f"unknown config key '{dotted}' ({source})",
                              f"did you mean '{guess}'?" if guess else "see `kolora train --help` for the keys")
        obj = getattr(self, section)
        names = {f.name: f for f in fields(obj)}
        if key not in names:
            guess = suggest_key(f"{section}.{key}")
            raise KoloraError(f"unknown config key '{dotted}' ({source})",
                              f"did you mean '{guess}'?" if guess else f"keys of '{section}': {', '.join(names)}")
        setattr(obj, key, coerce(value, names[key], dotted, source))


# Names users bring from transformers / TRL / peft, mapped to ours.
SYNONYMS = {
    "learning_rate": "train.lr", "num_train_epochs": "train.epochs", "num_epochs": "train.epochs",
    "per_device_train_batch_size": "train.batch_size", "micro_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum", "max_seq_length": "data.max_length",
    "max_seq_len": "data.max_length", "cutoff_len": "data.max_length", "lora_r": "lora.r", "rank": "lora.r",
    "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout", "output": "train.output_dir",
    "warmup": "train.warmup_ratio", "warmup_steps": "train.warmup_ratio", "bf16": "train.mixed_precision",
    "load_in_4bit": "model.quantization", "model_name_or_path": "model.name", "dataset": "data.path",
}


def suggest_key(bad: str) -> str | None:
    """The config key a user most likely meant."""
    leaf = bad.lstrip("-").rsplit(".", 1)[-1].replace("-", "_")
    if leaf in SYNONYMS:
        return SYNONYMS[leaf]
    return nearest(bad.lstrip("-").replace("-", "_"), all_keys())


def all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in fields(cls)]


def coerce(value, f: dataclasses.Field, dotted: str, source: str):
    """Convert a parsed value to the field's type, or explain what was expected."""
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    bad = KoloraError(f"config key '{dotted}' ({source}) got {value!r}", f"expected {kind}")
    if value is None:
        if "None" in kind or kind == "Any":
            return None
        raise bad
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "yes", "1", "on"):
            return True
        if str(value).lower() in ("false", "no", "0", "off"):
            return False
        raise bad
    if kind == "int":
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise bad
        try:
            return int(value)
        except (TypeError, ValueError):
            raise bad from None
    if kind == "float":
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad from None
    if kind == "list":
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise bad
        if isinstance(default, list) and default and isinstance(default[0], float):
            try:
                return [float(v) for v in value]
            except (TypeError, ValueError):
                raise bad from None
        return list(value)
    if kind == "Any":
        return value
    if isinstance(value, bool):  # YAML 1.1 reads `no` as False: `mixed_precision: no` means "no"
        return "no" if value is False else "yes"
    return str(value)


def parse_scalar(text: str):
    """Parse a command-line value the way YAML would ('1e-4' → 0.0001, 'true' → True)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and _looks_float(value):
        return float(value)
    return value


def _looks_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def load_yaml(path: str | Path) -> RunConfig:
    """Load a preset. Unknown sections or keys name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise KoloraError(f"config file not found: {path}", "check the path; presets live in configs/")
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise KoloraError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})", "fix the syntax at that line") from None
    if not isinstance(data, dict):
        raise KoloraError(f"{path}: expected sections model/data/lora/train at the top level")
    lines = _key_lines(node)
    cfg = RunConfig()
    for section, values in data.items():
        if section not in SECTIONS:
            guess = nearest(section, SECTIONS)
            raise KoloraError(f"{path}:{lines.get(section, '?')}: unknown section '{section}'",
                              f"did you mean '{guess}'?" if guess else "sections are model, data, lora, train")
        if not isinstance(values, dict):
            raise KoloraError(f"{path}:{lines.get(section, '?')}: section '{section}' must be a mapping of key: value")
        for key, value in values.items():
            dotted = f"{section}.{key}"
            cfg.set(dotted, value, source=f"{path}:{lines.get(dotted, '?')}")
    return cfg


def _key_lines(node) -> dict[str, int]:
    """Map 'section' and 'section.key' to 1-based line numbers in the YAML file."""
    out: dict[str, int] = {}
    if node is None or not hasattr(node, "value") or not isinstance(node.value, list):
        return out
    for k, v in node.value:
        if not hasattr(k, "value"):
            continue
        out[str(k.value)] = k.start_mark.line + 1
        if isinstance(getattr(v, "value", None), list):
            for k2, _ in v.value:
                if hasattr(k2, "value") and isinstance(k2.value, str):
                    out[f"{k.value}.{k2.value}"] = k2.start_mark.line + 1
    return out


def from_dict(data: dict) -> RunConfig:
    cfg = RunConfig()
    for section, values in data.items():
        for key, value in (values or {}).items():
            cfg.set(f"{section}.{key}", value, source="run config")
    return cfg


def save_yaml(cfg: RunConfig, path: Path, header: str = "") -> None:
    text = yaml.safe_dump(cfg.to_dict(), allow_unicode=True, sort_keys=False)
    path.write_text(header + text, encoding="utf-8")


# --------------------------------------------------------------------------- command-line flags
# Every config key is a flag (`--train.lr 1e-4`), derived from the dataclasses above: the field's
# help is the flag's help, so the CLI and the config file can never disagree.
ALIASES = {  # short flags for the keys people set most
    "--model": "model.name", "--data": "data.path", "--out": "train.output_dir",
    "--epochs": "train.epochs", "--max-steps": "train.max_steps", "--lr": "train.lr",
    "--max-length": "data.max_length", "--r": "lora.r",
}


def add_config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML preset (see configs/); flags below override it")
    for alias, key in ALIASES.items():
        p.add_argument(alias, dest=f"cfg:{key}", default=argparse.SUPPRESS, metavar="V", help=f"= --{key}")
    for section, cls in SECTIONS.items():
        group = p.add_argument_group(section)
        for f in fields(cls):
            default = f.default if f.default is not MISSING else f.default_factory()
            group.add_argument(f"--{section}.{f.name}", dest=f"cfg:{section}.{f.name}", default=argparse.SUPPRESS,
                               metavar="V", help=f"{f.metadata.get('help', '')} [default: {default}]".replace("%", "%%"))


def flag_value(key: str, text: str):
    """Text fields stay text ('no', '1.0', a Korean prompt); other fields parse like YAML."""
    section, name = key.split(".", 1)
    kind = {f.name: str(f.type) for f in fields(SECTIONS[section])}[name]
    return text if kind.startswith("str") else parse_scalar(text)


def apply_flags(cfg: RunConfig, args, allowed: tuple[str, ...] | None = None) -> RunConfig:
    for dest, value in vars(args).items():
        if dest.startswith("cfg:"):
            key = dest[4:]
            if allowed is not None and key not in allowed:
                raise KoloraError(f"--{key} cannot change when resuming", f"only {', '.join('--' + k for k in allowed)} can")
            cfg.set(key, flag_value(key, value), source=f"--{key}")
    return cfg


def build_config(args) -> RunConfig:
    return apply_flags(load_yaml(args.config) if getattr(args, "config", None) else RunConfig(), args)
