"""A run directory describes itself; every command after `train` takes only its path.

    runs/<name>/
      config.yaml            resolved config (re-runnable with `kolora train --config`)
      run.json               model source, versions, summary figures
      adapter/               PEFT format: adapter_config.json + adapter_model.safetensors
      tokenizer/             the tokenizer used in training (chat template included)
      data/{train,validation,test}.jsonl   the exact split
      metrics.jsonl          one JSON object per log / eval event
      tensorboard/           TensorBoard event files
      checkpoints/step-NNNNNN/   adapter + optimizer + scheduler + RNG, written atomically
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from . import config as config_mod
from .errors import KoloraError
from .models import PICKLE_SUFFIXES


@dataclass
class Run:
    path: Path

    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def tokenizer(self) -> Path:
        return self.path / "tokenizer"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def info_file(self) -> Path:
        return self.path / "run.json"

    def split(self, name: str) -> Path:
        return self.path / "data" / f"{name}.jsonl"

    def config(self) -> config_mod.RunConfig:
        import yaml

        return config_mod.from_dict(yaml.safe_load(self.config_file.read_text(encoding="utf-8")))

    def info(self) -> dict:
        return json.loads(self.info_file.read_text()) if self.info_file.is_file() else {}

    def update_info(self, **values) -> None:
        info = self.info()
        info.update(values)
        self.info_file.write_text(json.dumps(info, indent=2, ensure_ascii=False))


def open_run(path: str, need_adapter: bool = True) -> Run:
    run = Run(Path(path).expanduser())
    if not run.path.is_dir():
        raise KoloraError(f"run directory not found: {path}", "pass the directory `kolora train` wrote (e.g. runs/demo)")
    if not run.config_file.is_file():
        raise KoloraError(f"{path} is not a kolora run (no config.yaml)", "pass the directory `kolora train` wrote")
    check_inside(run)
    if need_adapter and not (run.adapter / "adapter_model.safetensors").is_file():
        raise KoloraError(f"{path} has no trained adapter yet (adapter/adapter_model.safetensors)",
                          f"finish training first, or resume it: kolora train --resume {path}")
    return run


def check_inside(run: Run) -> None:
    """A run's parts must live inside it (no symlink to elsewhere) and hold no pickles: loading a
    pickle runs whatever code it contains, so an adapter or run copied from a stranger could."""
    base = run.path.resolve()
    for part in (run.config_file, run.info_file, run.adapter, run.tokenizer, run.checkpoints, run.path / "data"):
        if part.exists() and not part.resolve().is_relative_to(base):
            raise KoloraError(f"{part} points outside the run directory {run.path} (to {part.resolve()})",
                              "copy the files into the run directory instead of linking them")
    for folder in (run.adapter, run.tokenizer):
        if folder.is_dir():
            for f in folder.iterdir():
                if f.suffix in PICKLE_SUFFIXES:
                    raise KoloraError(f"{f} is a pickle-based file; kolora loads weights only as safetensors",
                                      "remove it (a kolora adapter is adapter_model.safetensors), or convert it "
                                      "with safetensors if you trust its author")


def default_output_dir(model_name: str) -> str:
    stem = Path(model_name).name.replace(".gguf", "") or "model"
    return str(Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")


def truncate_metrics(path: Path, last_step: int) -> int:
    """Drop events logged after the checkpoint we resume from (they will be logged again), so
    metrics.jsonl reads as one uninterrupted run. Returns how many were dropped."""
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines()
    keep = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= last_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
    os.replace(tmp, path)
    return len(lines) - len(keep)
