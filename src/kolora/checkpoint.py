"""Crash-safe checkpoints: complete or ignored, never half-loaded, never a pickle.

    checkpoints/step-000040/
      adapter/                   PEFT adapter (safetensors)
      optimizer.safetensors      AdamW moments, flattened; the rest of its state is JSON
      rng.safetensors            torch CPU (and CUDA) RNG of every process
      grads.safetensors          only when saved inside a gradient-accumulation window
      trainer_state.json         step, micro-batch position, scheduler, fp16 grad scaler, best loss, …
      kolora-checkpoint.json     written last: format, fingerprints, every file's size + sha256

A checkpoint is written into `.tmp-…`, fsynced, renamed, and the parent directory fsynced (a
re-saved step moves the old one to `.old-…` first, which `find_latest` renames back after a crash);
the manifest is the last file written, so a directory without a valid manifest (a crash mid-save,
a foreign checkpoint copied in, a truncated file) is skipped and reported, never loaded.
Why not `accelerator.save_state`: it saves the whole frozen base with every checkpoint, is not
atomic, and stores RNG states as pickles that must be loaded with `weights_only=False`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

from . import __version__
from .errors import KoloraError
from .files import fsync_path
from .models import PICKLE_SUFFIXES

FORMAT = "kolora-checkpoint/1"
MANIFEST = "kolora-checkpoint.json"


# --------------------------------------------------------------------------- fingerprints
def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin")
HASH_CACHE = "file-hashes.json"  # under models.cache_root(): sha256 by (path, size, mtime, ctime, inode)


def model_fingerprint(path: str) -> str:
    """What the model's weights are, by content: config.json plus the sha256 of every weight file
    (each hashed once per file version, see cached_sha256), or the commit of a hub snapshot.
    Sizes alone miss a re-converted or fine-tuned model with the same shapes; the name alone
    misses a hub model updated in place."""
    p = Path(path)
    if not p.is_dir():
        return hub_fingerprint(path)
    if p.parent.name == "snapshots" and _is_commit(p.name):  # a Hugging Face cache snapshot: immutable
        return f"hub:{p.parent.parent.name}@{p.name}"
    parts = [(p / "config.json").read_bytes() if (p / "config.json").is_file() else b""]
    weights = [f for f in sorted(p.iterdir()) if f.suffix in WEIGHT_SUFFIXES and f.is_file()]
    hashes = cached_sha256(weights)
    parts += [f"{f.name}:{hashes[f]}".encode() for f in weights]
    return "sha256:" + sha256_bytes(b"\n".join(parts))


def _is_commit(name: str) -> bool:
    return len(name) == 40 and all(c in "0123456789abcdef" for c in name)


def hub_fingerprint(repo_id: str) -> str:
    """A hub id loads its cached snapshot of `main`: that commit, when there is one."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # noqa: BLE001 - no cache, a malformed id: the name is all there is
        found = None
    commit = Path(found).parent.name if isinstance(found, str) else ""
    return f"hub:{repo_id}@{commit}" if _is_commit(commit) else f"hub:{repo_id}"


def cached_sha256(files: list[Path]) -> dict[Path, str]:
    """sha256 of each file, computed once per file version: a 500 MB model takes seconds to
    hash, and every resume and eval asks again. A version is (path, size, mtime, ctime, inode):
    rewriting a file, even to the same size and mtime, changes its ctime."""
    from .models import cache_root

    cache_file = cache_root() / HASH_CACHE
    try:
        known = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    out, changed = {}, False
    for f in files:
        st = f.stat()
        key = str(f.resolve())
        version = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        entry = known.get(key)
        if isinstance(entry, dict) and entry.get("version") == version:
            out[f] = entry["sha256"]
            continue
        out[f] = sha256_file(f)
        known[key], changed = {"version": version, "sha256": out[f]}, True
    if changed:
        try:  # a private temp name, then an atomic rename: concurrent processes never read half a file
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(f".{HASH_CACHE}.{os.getpid()}")
            tmp.write_text(json.dumps(known, indent=0), encoding="utf-8")
            os.replace(tmp, cache_file)
        except OSError:
            pass  # a read-only cache only costs hashing again next time
    return out


def legacy_model_fingerprint(path: str) -> str:
    """The fingerprint checkpoints from before content hashing hold (config.json + file sizes, or
    the bare name): compared with those so that they still resume."""
    p = Path(path)
    if not p.is_dir():
        return sha256_bytes(path.encode())
    parts = [(p / "config.json").read_bytes() if (p / "config.json").is_file() else b""]
    for f in sorted(p.iterdir()):
        if f.suffix in WEIGHT_SUFFIXES:
            parts.append(f"{f.name}:{f.stat().st_size}".encode())
    return sha256_bytes(b"\n".join(parts))


def data_fingerprint(items) -> str:
    """The tokenized training split itself: catches an edited data file, another tokenizer,
    another max_length or split — anything that would change what the resumed run trains on."""
    h = hashlib.sha256()
    for t in items:
        h.update(json.dumps([t.input_ids, t.labels]).encode())
    return h.hexdigest()


def lora_shape(cfg, targets: list[str]) -> dict:
    return {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "target_modules": sorted(targets),
            "use_dora": cfg.lora.use_dora, "use_rslora": cfg.lora.use_rslora}


def compare_fingerprints(saved: dict, now: dict, where: Path, model_path: str | None = None) -> None:
    """One line naming what differs; nothing has been loaded yet when this raises. `model_path`
    lets a checkpoint with a fingerprint of the old kind be compared in its own terms."""
    diffs = []
    model_now = now["model"]
    if model_path is not None and ":" not in str(saved.get("model", ":")):
        model_now = legacy_model_fingerprint(model_path)
    if saved.get("model") != model_now:
        diffs.append(f"the model (checkpoint: {saved.get('model_name')}, now: {now['model_name']})"
                     if saved.get("model_name") != now["model_name"] else
                     f"the model files of {now['model_name']} changed since the checkpoint")
    old_lora, new_lora = saved.get("lora", {}), now["lora"]
    for key in new_lora:
        if old_lora.get(key) != new_lora[key]:
            diffs.append(f"LoRA {key} (checkpoint: {old_lora.get(key)}, now: {new_lora[key]})")
    if saved.get("data") != now["data"]:
        diffs.append(f"the training data (checkpoint: {saved.get('train_rows')} rows of {saved.get('data_path')}, "
                     f"now: {now['train_rows']} rows of {now['data_path']}; the file, tokenizer, split or max_length changed)")
    diffs += batching_diffs(saved.get("batching"), now.get("batching"))
    if "seed" in saved and saved["seed"] != now.get("seed"):  # checkpoints from before the key resume as they did
        diffs.append(f"train.seed: {saved['seed']} then, {now.get('seed')} now")
    if saved.get("fact_weight", 1) != now.get("fact_weight", 1):
        diffs.append(f"train.fact_weight (checkpoint: {saved.get('fact_weight', 1)}, now: {now.get('fact_weight', 1)})")
    if diffs:
        raise KoloraError(f"cannot resume from {where}: " + "; ".join(diffs),
                          "restore the original model/data/config (and number of processes), or start a new run with --out")


BATCHING = ("train.batch_size", "train.grad_accum", "processes")


def batching_diffs(saved: list | None, now: list | None) -> list[str]:
    """[batch_size, grad_accum, processes]: another one makes other batches and windows, so the
    resumed run would not continue the data order (and RNG streams) it was saved in."""
    if not saved or not now:
        return []
    out = []
    for name, old, new in zip(BATCHING, saved, now):
        if old != new:
            out.append(f"{old} {name} then, {new} now" if name == "processes" else f"{name}: {old} then, {new} now")
    return out


# --------------------------------------------------------------------------- optimizer ⇄ safetensors
def optimizer_to_tensors(optimizer) -> tuple[dict, dict]:
    """AdamW state → flat tensors + JSON (no pickle). Keys: state.<param index>.<name>."""
    import torch

    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta.get("scalars", {}).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def rng_state() -> dict:
    import torch

    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(tensors: dict) -> None:
    import torch

    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


# --------------------------------------------------------------------------- save
def _fsync(path: Path) -> None:
    fsync_path(path)


def save(root: Path, step: int, *, adapter_model, optimizer, scheduler, state: dict, fingerprints: dict,
         rng_by_rank: list[dict], grads: dict | None = None, fault=None, scaler=None) -> Path:
    """Write checkpoint `step` atomically. `fault` is the test hook that may kill us mid-save."""
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    if same_state(final, state):
        # A stop requested on a save step asks for this very state again (train saves, then stops).
        # Rewriting a complete checkpoint gains nothing and opens a window for the SIGKILL a
        # pre-emption sends shortly after its SIGTERM.
        return final
    tmp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    adapter_model.save_pretrained(tmp / "adapter")
    opt_tensors, opt_meta = optimizer_to_tensors(optimizer)
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    rng = {f"rank{r}.{k}": v for r, st in enumerate(rng_by_rank) for k, v in st.items()}
    save_file(rng, tmp / "rng.safetensors")
    if grads:
        save_file({k: v.detach().contiguous().cpu() for k, v in grads.items()}, tmp / "grads.safetensors")
    if fault:
        fault("in-save", step)
    trainer_state = {**state, "scheduler": scheduler.state_dict(), "optimizer": opt_meta,
                     "python_random": _json_random_state()}
    if scaler is not None:  # fp16: the loss scale it has settled on (plain numbers: JSON, no pickle)
        trainer_state["grad_scaler"] = scaler.state_dict()
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    files = {str(f.relative_to(tmp)): {"size": f.stat().st_size, "sha256": sha256_file(f)}
             for f in sorted(tmp.rglob("*")) if f.is_file()}
    manifest = {"format": FORMAT, "kolora_version": __version__, "step": step,
                "fingerprints": fingerprints, "files": files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    # Files, subfolders and the folder itself reach the disk before the rename makes them a checkpoint.
    for f in tmp.rglob("*"):
        _fsync(f)
    _fsync(tmp)
    # Re-saving a step (a stop inside the window after the save_every save of that step): the new
    # one is renamed in before the old one is deleted, so at every instant a complete step-N or its
    # .old- twin exists, and find_latest puts the twin back if a kill lands between the renames.
    old = root / f".old-step-{step:06d}"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)  # step-N is complete, so a leftover twin is stale
        os.replace(final, old)
        _fsync(root)
        if fault:
            fault("ckpt-between-renames", step)
    os.replace(tmp, final)
    _fsync(root)  # the rename itself must survive a power cut
    shutil.rmtree(old, ignore_errors=True)
    return final


def same_state(ckpt: Path, state: dict) -> bool:
    """Whether `ckpt` is a complete checkpoint of exactly this point: step and micro-batch position."""
    if verify(ckpt) is not None:
        return False
    try:
        saved = json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (saved.get("step"), saved.get("window_pos", 0)) == (state.get("step"), state.get("window_pos", 0))


def _json_random_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def prune(root: Path, keep: int, protect: set[str]) -> None:
    """Keep the newest `keep` complete checkpoints plus every protected one (the best)."""
    if keep <= 0:
        return
    complete = [p for p in sorted(root.glob("step-*")) if verify(p) is None]
    newest = {p.name for p in complete[-keep:]}
    for p in complete:
        if p.name not in newest and p.name not in protect:
            shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------- find / verify / load
def verify(ckpt: Path, deep: bool = False) -> str | None:
    """None when `ckpt` is a complete kolora checkpoint, else why it is not."""
    if (ckpt / MANIFEST).is_symlink() or not (ckpt / MANIFEST).is_file():
        if any(f.suffix in PICKLE_SUFFIXES for f in ckpt.rglob("*")):
            return "not written by kolora (pickle files, no kolora-checkpoint.json)"
        return "incomplete (no kolora-checkpoint.json: interrupted while saving, or not written by kolora)"
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return "unreadable kolora-checkpoint.json"
    if manifest.get("format") != FORMAT:
        return f"unknown format {manifest.get('format')!r}"
    base = ckpt.resolve()
    for rel, meta in manifest.get("files", {}).items():
        f = ckpt / rel
        if not f.resolve().is_relative_to(base):
            return f"file {rel} points outside the checkpoint"
        if not f.is_file() or f.stat().st_size != meta["size"]:
            return f"file {rel} is missing or truncated"
        if deep and sha256_file(f) != meta["sha256"]:
            return f"file {rel} is corrupted (sha256 mismatch)"
    for f in ckpt.rglob("*"):
        if f.suffix in PICKLE_SUFFIXES:
            return f"contains a pickle-based file ({f.name}); kolora loads only safetensors"
    return None


def find_latest(root: Path) -> tuple[Path | None, list[tuple[str, str]]]:
    """Newest usable checkpoint, and the ones skipped with the reason (shown to the user)."""
    skipped = []
    if not root.is_dir():
        return None, skipped
    recover_old_twins(root, skipped)
    for p in root.glob(".tmp-step-*"):
        skipped.append((p.name, "interrupted while saving"))
    for p in sorted(root.glob("step-*"), reverse=True):
        why = verify(p, deep=True)
        if why is None:
            return p, skipped
        skipped.append((p.name, why))
    return None, skipped


def recover_old_twins(root: Path, skipped: list[tuple[str, str]]) -> None:
    """A kill between the two renames of a re-save leaves `.old-step-N` and no `step-N`: the twin
    is a complete checkpoint of that step, so it is renamed back. With `step-N` present the twin
    is what the interrupted save was about to delete."""
    for old in sorted(root.glob(".old-step-*")):
        final = root / old.name[len(".old-"):]
        if final.exists():
            if verify(final) is None:
                shutil.rmtree(old, ignore_errors=True)
            continue
        why = verify(old, deep=True)
        if why is None:
            os.replace(old, final)
            _fsync(root)
        else:
            skipped.append((old.name, why))


def read_manifest(ckpt: Path) -> dict:
    return json.loads((ckpt / MANIFEST).read_text())


def load(ckpt: Path, *, peft_model, optimizer, scheduler, rank: int, scaler=None) -> tuple[dict, dict | None]:
    """Restore adapter, optimizer, scheduler, RNG and the fp16 grad scaler; returns (trainer
    state, partial grads)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    why = verify(ckpt)
    if why:
        raise KoloraError(f"checkpoint {ckpt} is {why}", "delete it; kolora resumes from the newest complete one")
    state = json.loads((ckpt / "trainer_state.json").read_text())
    rng = load_file(ckpt / "rng.safetensors")
    mine = {k.split(".", 1)[1]: v for k, v in rng.items() if k.startswith(f"rank{rank}.")}
    if not mine:  # checked before anything is loaded: never a half-restored state
        raise KoloraError(f"checkpoint {ckpt} has no RNG state for process {rank}",
                          "resume with the number of processes the run was saved with")
    result = set_peft_model_state_dict(peft_model, load_file(ckpt / "adapter" / "adapter_model.safetensors"))
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise KoloraError(f"checkpoint {ckpt} holds adapter weights this model does not have ({unexpected[0]} …)",
                          "resume with the model and LoRA config the run was started with")
    optimizer.load_state_dict(optimizer_from_tensors(load_file(ckpt / "optimizer.safetensors"), state.pop("optimizer")))
    scheduler.load_state_dict(state.pop("scheduler"))
    scaler_state = state.pop("grad_scaler", None)
    if scaler is not None and scaler_state:  # else it starts afresh (a checkpoint from before fp16 state was kept)
        scaler.load_state_dict(scaler_state)
    set_rng_state(mine)
    py = state.pop("python_random", None)
    if py:
        random.setstate((py[0], tuple(py[1]), py[2]))
    grads = load_file(ckpt / "grads.safetensors") if (ckpt / "grads.safetensors").is_file() else None
    return state, grads


def save_adapter_atomically(peft_model, target: Path) -> None:
    tmp = target.with_name(f".tmp-{target.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(tmp)
    old = target.with_name(f".old-{target.name}")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
