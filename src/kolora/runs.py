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
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from . import config as config_mod
from .errors import KoloraError
from .files import fsync_path
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
        # run.json marks the folder as a run (--force may replace it) and holds the summary:
        # a crash mid-write must leave the old file, never a torn one
        write_atomically(self.info_file, json.dumps(info, indent=2, ensure_ascii=False))


def fsync_dir(path: Path) -> None:
    fsync_path(path)


def write_atomically(path: Path, text: str) -> None:
    """Temp file + fsync + rename: readers see the old content or the new, never half of it."""
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)  # the rename itself must survive a power cut


def truncate_metrics(path: Path, last_step: int) -> int:
    """Drop events logged after the checkpoint we resume from (they will be logged again), so
    metrics.jsonl reads as one uninterrupted run. Returns how many lines were dropped.
    A line cut by a crash (the process killed mid-write) is dropped too, as `report.read_metrics`
    skips it: it is the very case a resume follows."""
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines()
    keep = []
    for line in lines:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict) and event.get("step", 0) <= last_step:
            keep.append(line)
    write_atomically(path, "".join(line + "\n" for line in keep))
    return len(lines) - len(keep)


# --------------------------------------------------------------------------- --out and --force
# What marks a folder as kolora's own. A run has run.json from its first moment; a merged model and
# an export list the files they wrote, so --force replaces those and nothing a user put beside them.
MARKERS = {"run": "run.json", "merge": "kolora-merge.json", "export": "kolora-export.json"}
KIND_NAMES = {"run": "run", "merge": "merged model", "export": "export"}
# Exports written before kolora-export.json listed its files: what they wrote, by name.
LEGACY_EXPORT_FILES = ("Modelfile", "convert.log", "merged", "kolora-export.json")


def claim_output_dir(path: Path | str, kind: str, force: bool, writes: Iterable[str] = ()) -> list[Path]:
    """The one rule for --out of train, merge and export; returns the entries the new output replaces.

    A new or empty folder is used as it is. A non-empty one needs --force, and --force replaces
    only what kolora wrote: a run folder (run.json) as a whole, or the files a merge/export listed
    in its marker. Anything else is refused: kolora never deletes what it did not write.
    `writes`: names the new output will create; one that is the user's is refused too."""
    path = Path(path).expanduser()
    marker_name = MARKERS[kind]
    what = KIND_NAMES[kind]
    if not path.exists() and not path.is_symlink():
        return []
    if not path.is_dir():
        raise KoloraError(f"--out {path} is a file, not a folder", "pick an empty or new folder for --out")
    entries = sorted(path.iterdir())
    if not entries:
        return []
    marker = path / marker_name
    ours = marker.is_file() and not marker.is_symlink()
    if not force:
        if kind == "run":
            if ours:
                raise KoloraError(f"output directory {path} already holds a run",
                                  f"resume it with `kolora train --resume {path}`, pick another --out, "
                                  "or pass --force to replace it")
            raise KoloraError(f"output directory {path} already holds a run or other files ({entries[0].name} …)",
                              "pick an empty or new --out (--force replaces only a kolora run, a folder with run.json)")
        raise KoloraError(f"{path} exists and is not empty",
                          f"choose another --out, or pass --force to replace the {what} kolora wrote there" if ours
                          else f"choose an empty or new --out (--force replaces only a kolora {what}, "
                               f"a folder with {marker_name})")
    if not ours:
        raise KoloraError(f"--force will not replace {path}: it has no {marker_name}, so it is not a kolora {what} "
                          f"and kolora did not write it ({entries[0].name} …)",
                          "pick an empty or new folder for --out; kolora deletes only what it wrote")
    if kind == "run":
        owned = entries
    else:
        owned = [path / name for name in _listed(marker, kind, entries)]
        owned = [p for p in owned if p.exists() or p.is_symlink()]
    in_the_way = [name for name in writes if (path / name).exists() and path / name not in owned]
    if in_the_way:
        raise KoloraError(f"{path / in_the_way[0]} is in the way: the new {what} writes a file of that name, "
                          f"and kolora did not write this one (it is not listed in {marker_name})",
                          "move it elsewhere, or pick an empty or new folder for --out")
    return owned


def _listed(marker: Path, kind: str, entries: list[Path]) -> list[str]:
    """Names the marker says kolora wrote; only plain names inside the folder (a marker is data
    from disk, and may have been edited or copied from elsewhere)."""
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        info = {}
    info = info if isinstance(info, dict) else {}
    files = info.get("files")
    if not isinstance(files, list):
        if kind == "merge":  # merges before the list: the folder was the merged model, nothing else
            files = [p.name for p in entries]
        else:
            files = ([info["gguf"]] if isinstance(info.get("gguf"), str) else []) + list(LEGACY_EXPORT_FILES)
    names = [f for f in files if isinstance(f, str) and f not in ("", ".", "..") and "/" not in f and "\\" not in f]
    return list(dict.fromkeys(names + [marker.name]))


def remove_entries(paths: Iterable[Path]) -> None:
    """Delete what `claim_output_dir` returned, the marker last: a process stopped halfway (or a
    second process of a multi-process launch looking at the same folder) still sees a kolora folder."""
    paths = sorted(paths, key=lambda p: p.name in MARKERS.values())
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            if p.exists():
                shutil.rmtree(p)  # again, to raise what stopped it
        else:
            p.unlink(missing_ok=True)


def temp_dir_beside(out: Path) -> Path:
    """A fresh folder next to `out`, on the same file system, so the finished output is renamed in."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".kolora-tmp-{out.name}-", dir=out.parent))


def swap_in(new: Path, out: Path, replaced: list[Path], marker: str) -> None:
    """Move the finished output `new` (from `temp_dir_beside(out)`) to `out`, replacing only
    `replaced` (from `claim_output_dir`). Only renames: the previous output stays whole until the
    new one is complete, and at every instant `out` holds a marker. On an error it is put back."""
    if not out.exists() and not out.is_symlink():
        os.replace(new, out)
        fsync_dir(out.parent)
        return
    old = Path(tempfile.mkdtemp(prefix=f".kolora-old-{out.name}-", dir=out.parent))
    moved_out: list[tuple[Path, Path]] = []
    moved_in: list[tuple[Path, Path]] = []
    try:
        for p in replaced:
            if p.name != marker:  # the old marker goes last, replaced by the new one in one rename
                os.replace(p, old / p.name)
                moved_out.append((old / p.name, p))
        for p in sorted(new.iterdir()):
            if p.name != marker:
                if (out / p.name).exists() or (out / p.name).is_symlink():
                    raise KoloraError(f"{out / p.name} is in the way and kolora did not write it",
                                      "move it elsewhere, or pick an empty or new folder for --out")
                os.replace(p, out / p.name)
                moved_in.append((out / p.name, p))
        os.replace(new / marker, out / marker)
    except BaseException:
        for src, dst in reversed(moved_out + moved_in):  # the new entries leave first, freeing the names
            os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
        raise
    fsync_dir(out)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(new, ignore_errors=True)


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
