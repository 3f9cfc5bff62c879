"""Peak memory and time per step of a training config, before training.

One model of memory serves `kolora estimate` and `kolora train --dry-run`:

    peak = runtime + weights + LoRA state + max(loading, training micro-batch, evaluation batch)

On a CPU the micro-batch and evaluation terms include the allocator's slack (see
HEAP_RETENTION): resident memory, which is what runs out, not just live tensors. Where training
compiles its decoder layers (the CPU default) the micro-batch term is calibrated instead (see
COMPILED_ACTIVATIONS): fewer saved activations, no slack, a smaller head buffer.

- runtime: on a CPU the libraries and the tokenizer, measured in this process (the training
  process holds the same); on a GPU the CUDA context.
- weights: base parameters in their dtype; with QLoRA the decoder's linear weights take
  ~0.52 byte (NF4 + double-quantised scales) and peft's `prepare_model_for_kbit_training`
  turns every other parameter (embeddings, norms) into float32.
- LoRA state: float32 weights, gradients and both AdamW moments, 16 bytes per parameter.
- training micro-batch: the activations autograd keeps for backward, *measured* by running
  a 1- and a 2-layer copy of the model (built from its config, random weights, LoRA
  attached, kolora's own loss) under saved-tensor hooks, so every architecture gets its own
  bytes per token per layer; plus the output layer, which kolora runs at answer positions
  only and in chunks of 256 rows: min(answer rows, 256) × vocabulary × 12 bytes (head
  output, its float32 copy turned into the softmax gradient in place, and its bf16 cast).
- evaluation batch (max(batch, 8) rows, no graph): min(answer rows, 256) × vocabulary × 8 bytes.
- loading (CPU only): the checkpoint's pages are read while the weights are cast.

The shapes are the ones training will see: the same tokenizer, split, length filter,
length-grouped batches, padding to 32 (answer rows are not padded).

Time per step: `train_flops` (the formula the training loop logs MFU with) over a matmul
peak measured here for ~0.3 s in the compute dtype, at an MFU calibrated from real runs on the
same kind of CPU (AMX or AVX-512 BF16; bench/estimate_validation.py). On a GPU that is not in this machine the peak and MFU are
assumptions, and the output says so.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, replace

from . import grounding
from .batching import PAD_MULTIPLE
from .device import choose_precision, cpu_class, current_rss, matmul_peak_gflops, meminfo, resolve_compile, train_flops
from .errors import KoloraError
from .loss import EVAL_BATCH_MIN, HEAD_CHUNK_ROWS

GiB = 2**30
# MFU the training loop logs on an idle CPU, as a share of the matmul peak measured in the
# compute dtype, per kind of CPU (device.cpu_class), as (compiled bf16, eager bf16, float32):
# the training step is mostly memory-bound, so its achieved FLOP/s varies far less between CPUs
# than their matmul peaks do, and one share cannot fit both kinds.
# - amx: bench/estimate_validation.py, 2026-12-04, Intel Xeon with AMX, 2 cores, torch 2.13,
#   6-step runs of the five cases (bf16 peak ~1,350 GFLOP/s): compiled decoder layers (train.compile
#   auto) 0.168-0.218; eager (gradient checkpointing, which also recomputes the forward) 0.111;
#   float32 without autocast 0.479 of the (much lower) float32 peak.
# - avx512_bf16: the same script, AMD EPYC (AVX-512 BF16, no AMX), 2 cores, torch 2.13 (bf16 peak
#   344-410 GFLOP/s), 4-step runs of the same five cases. Refitted 2026-12-07 (session 33) after the
#   issue-20 speed-ups (shared dropout masks, no padding mask): compiled 0.492-0.566 (0.53 puts all
#   three within -7%/+7%), eager 0.330, float32 0.731 of the float32 peak; checked out of sample on
#   the two cases the fit did not see (bench/HISTORY.md, session 33). Before them: 0.43 / 0.27 / 0.57.
# - other (no bf16 instructions: training runs in float32): bench/estimate_validation.py, 2026-12-08
#   (session 35), an Intel Xeon whose VM exposes no AVX-512 BF16 and no AMX, 2 cores, torch 2.13
#   (float32 peak ~150 GFLOP/s, bf16 ~54: oneDNN without bf16 instructions), 4-step runs of five
#   cases: the four with compiled layers 0.576-0.830 (0.68 puts them within -15%/+22%). The
#   bf16 figures (only if a user forces bf16, 2.7-3.3x slower here): compiled 0.85 from one
#   20-step Gemma run; eager not measured, the compiled figure times avx512_bf16's eager/compiled
#   ratio.
# Float32 without compiled layers (gradient checkpointing) takes the float32 figure times the
# same kind's eager/compiled ratio: it recomputes the forward as eager bf16 does (measured on
# `other`: 0.428, predicted 0.68 x 0.62 = 0.42).
# With other jobs on the cores it falls far lower (training suffers more from contention than a
# 0.3 s matmul does).
AVX512_BF16_MFU = (0.53, 0.33, 0.73)
CPU_MFU = {"amx": (0.19, 0.11, 0.45), "avx512_bf16": AVX512_BF16_MFU,
           "other": (0.85, round(0.85 * AVX512_BF16_MFU[1] / AVX512_BF16_MFU[0], 2), 0.68)}
# A GPU that is not here: typical LoRA training efficiency on consumer cards, and a peak
# between an RTX 3060 and a 4070 (dense bf16 tensor cores). Assumptions, printed as such.
MFU_GPU = 0.35
GPU_PEAK_TFLOPS = 30.0
CUDA_CONTEXT_BYTES = 0.5 * GiB
# When /proc is missing: python + torch + transformers + peft + accelerate measured here.
LIBRARIES_BYTES = 0.4 * GiB
# glibc keeps freed activation blocks: after the first large free its mmap threshold rises to
# 32 MB, so activations (mostly smaller) come from the heap, and the next micro-batch's
# differently shaped tensors do not fit the holes. Measured on gemma3-270m and smollm2-135m
# (bench/estimate_validation.py, plus an in-process run with the profiler): resident memory
# ≈ 2 × the live activation bytes, while the big logits tensors (mmapped) come back exactly.
HEAP_RETENTION = 2.0
LOGIT_BYTES_TRAIN = 12  # per answer row per vocabulary entry, see the module docstring
# Compiled decoder layers (the CPU default): inductor recomputes pointwise results in backward
# instead of saving them, and the head's cross entropy is one compiled function over a reused
# logits buffer in the compute dtype, its gradient written in place (loss.ce_and_grad). Their
# resident peak is the eager probe's activations × this factor with no allocator slack (training
# trims the heap after every step, device.heap_trimmer). Fitted on the four compiled cases of
# bench/estimate_validation.py: 0.85 on 2026-12-04 (Intel Xeon); 0.65 on 2026-12-07 (session 33,
# AMD EPYC) once right-padded batches dropped their padding mask (the flash kernel keeps less for
# backward than the masked path) and q/k/v shared one dropout mask: the four within -7%/+5%.
COMPILED_ACTIVATIONS = 0.65
LOGIT_BYTES_EVAL = 8
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit weight + 8-bit scale per 64 + fp32 per 256 scales


# --------------------------------------------------------------------------- the model, without weights
@dataclass
class ModelFacts:
    name: str
    kind: str
    path: str
    model: object  # on the meta device: shapes only
    config: object
    n_params: int
    n_layer_linear: int  # weights bitsandbytes would quantize
    vocab: int
    hidden: int
    layers: int
    targets: list
    lora_params: int
    trained_layers: int  # decoder layers with adapters (lora.layers): autograd keeps activations of these only
    checkpoint_bytes: int


def layer_count(config) -> int:
    return getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0)


def model_facts(cfg, src=None) -> ModelFacts:
    """Shapes and parameter counts from the config alone: no weights are loaded."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .models import adapted_layers, lora_param_count, resolve, target_modules

    src = src or resolve(cfg.model.name)
    try:
        config = AutoConfig.from_pretrained(src.path, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        if src.kind == "hub":
            raise KoloraError(f"cannot read the config of '{src.name}': it is not in the local Hugging Face cache "
                              "and the hub cannot be reached", "go online once (only config.json and the tokenizer "
                              "are needed to estimate), or use an offline preset") from None
        raise KoloraError(f"cannot read the config of {src.name}: {str(e).splitlines()[0]}") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    targets = target_modules(model, cfg.lora.target_modules)
    trained = len(adapted_layers(model, cfg.lora.layers) or range(layer_count(config)))
    head = model.get_output_embeddings()
    # bitsandbytes replaces every Linear (and GPT-2's Conv1D) except the output layer
    layer_linear = sum(m.weight.numel() for m in model.modules()
                       if m is not head and type(m).__name__ in ("Linear", "Conv1D"))
    emb = model.get_input_embeddings().weight
    n_params = sum(p.numel() for p in model.parameters())
    return ModelFacts(
        name=cfg.model.name, kind=src.kind, path=src.path, model=model, config=config, n_params=n_params,
        n_layer_linear=layer_linear, vocab=emb.shape[0], hidden=emb.shape[1], layers=layer_count(config),
        targets=targets, lora_params=lora_param_count(model, targets, cfg.lora.r) * trained // layer_count(config),
        trained_layers=trained,
        checkpoint_bytes=checkpoint_bytes(src, config, n_params))


def checkpoint_bytes(src, config, n_params: int) -> int:
    """Bytes of the weight files (read during loading): on disk when local, else from the config's dtype."""
    from pathlib import Path

    path = Path(src.path)
    if path.is_dir():
        files = list(path.glob("*.safetensors")) or list(path.glob("*.bin"))
        if files:
            return sum(f.stat().st_size for f in files)
    dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
    return n_params * (2 if ("16" in dtype) else 4)


def weight_bytes(facts: ModelFacts, base_dtype: str, quantization: str) -> float:
    per = 2 if base_dtype in ("bfloat16", "float16") else 4
    if quantization == "4bit":
        return facts.n_layer_linear * NF4_BYTES + (facts.n_params - facts.n_layer_linear) * 4
    if quantization == "8bit":
        return facts.n_layer_linear * 1.0 + (facts.n_params - facts.n_layer_linear) * 4
    return facts.n_params * per


# --------------------------------------------------------------------------- activations, measured
@dataclass
class ActivationProfile:
    """Bytes autograd keeps: per layer `fixed` + per token (per_layer + per_layer_seq·seq);
    outside the layers `outside` per token; with gradient checkpointing only `ckpt_per_layer`
    per token per layer, plus one layer recomputed during backward."""

    per_layer: float
    per_layer_seq: float
    outside: float
    ckpt_per_layer: float
    fixed: float = 0.0  # per layer and forward: LoRA weights cast to the compute dtype

    def layer(self, width: int) -> float:
        return self.per_layer + self.per_layer_seq * width

    def one_layer(self, tokens: int, width: int) -> float:
        return tokens * self.layer(width) + self.fixed

    def saved(self, tokens: int, width: int, layers: int, checkpointing: bool) -> float:
        if checkpointing:
            kept = tokens * layers * self.ckpt_per_layer + self.one_layer(tokens, width)
        else:
            kept = layers * self.one_layer(tokens, width)
        return max(kept + tokens * self.outside, 0.0)


def _with_layers(config, n: int):
    import copy

    c = copy.deepcopy(config)
    c.num_hidden_layers = n
    if getattr(c, "layer_types", None):
        c.layer_types = list(c.layer_types)[:n]
    c.vocab_size = 512  # the output layer is accounted for separately
    for attr in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(c, attr, None)
        if isinstance(value, int) and value >= 512:
            setattr(c, attr, 0)
    return c


def _saved_bytes(config, cfg, dtype, autocast_dtype, layers: int, rows: int, seq: int, checkpointing: bool) -> int:
    import contextlib

    import torch
    from transformers import AutoModelForCausalLM

    from .loss import answer_loss_module
    from .models import attach_lora
    from .prompt import IGNORE

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_with_layers(config, layers), dtype=dtype,
                                             trust_remote_code=cfg.model.trust_remote_code)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model, _ = attach_lora(model, cfg)
    loss_model = answer_loss_module(model)
    loss_model.train()
    params = {p.untyped_storage().data_ptr() for p in loss_model.parameters()}
    ids = torch.randint(4, 500, (rows, seq))
    labels = ids.clone()
    labels[:, : seq // 2] = IGNORE
    mask = torch.ones_like(ids)
    mask[1:, seq - seq // 4:] = 0  # padded rows, as in training: attention then needs (and keeps) a mask
    labels[mask == 0] = IGNORE
    kept: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:  # frozen weights are counted with the weights
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    amp = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
        loss_model(ids, mask, labels)
    return sum(kept.values())


def probe_activations(facts: ModelFacts, cfg, precision: str) -> ActivationProfile:
    """Run a 1- and a 2-layer copy of the model on three lengths and count what autograd keeps.

    2 layers minus 1 layer is one layer (the first layer keeps less, as its input needs no
    gradient; the `outside` term absorbs that). Three lengths separate a per-forward constant
    (LoRA weights cast to bf16), the per-token bytes and a quadratic attention term (eager
    attention; zero with SDPA's flash kernel). A few seconds, single-threaded."""
    import torch

    autocast = {"bf16": torch.bfloat16, "fp16": torch.bfloat16}.get(precision)  # fp16 probes as bf16 (same sizes)
    dtype = torch.bfloat16 if autocast else torch.float32
    rows, lengths = 2, (32, 64, 128)  # the second row is padded

    def kept(layers, seq, ckpt=False):
        return _saved_bytes(facts.config, cfg, dtype, autocast, layers, rows, seq, ckpt)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes: threads only add synchronisation, worst on a busy machine
    try:
        one = [kept(1, t) for t in lengths]
        layer = [kept(2, t) - o for t, o in zip(lengths, one)]
        t_ck = lengths[1]
        ckpt = (kept(2, t_ck, True) - kept(1, t_ck, True)) / (rows * t_ck)
    finally:
        torch.set_num_threads(threads)
    # one layer keeps fixed + rows·(slope·s + quad·s²) bytes at length s: fit through the three
    (t1, t2, t3), (l1, l2, l3) = lengths, layer
    quad = max(((l3 - l2) / (t3 - t2) - (l2 - l1) / (t2 - t1)) / (t3 - t1), 0.0)
    slope = (l3 - l1) / (t3 - t1) - quad * (t1 + t3)
    fixed = max(l1 - slope * t1 - quad * t1 * t1, 0.0)
    outside = (one[2] - layer[2]) / (rows * t3)
    return ActivationProfile(slope / rows, quad / rows, outside, max(ckpt, 0.0), fixed)


# --------------------------------------------------------------------------- data shapes
@dataclass
class DataProfile:
    """(length, answer tokens) of every tokenized row, before the max_length filter."""

    train: list
    eval: list  # validation + test
    source: str = "data"

    @classmethod
    def from_config(cls, cfg, tokenizer) -> "DataProfile":
        from .data import load_splits
        from .prompt import IGNORE, encode_example

        splits, _ = load_splits(cfg)
        if grounding.corpus_paths(cfg):  # the rows training sees carry their retrieved passages (~3× the tokens)
            grounding.ground_splits(cfg, splits, tokenizer)

        def rows(name):
            out = []
            for ex in splits[name]:
                ids, labels = encode_example(tokenizer, ex, cfg.data.system_prompt, cfg.data.template)
                out.append((len(ids), sum(1 for x in labels if x != IGNORE)))
            return out

        return cls(rows("train"), rows("validation") + rows("test"), cfg.data.path)

    @classmethod
    def from_tokenized(cls, train_data) -> "DataProfile":
        # --dry-run only has the training split; evaluation rows come from the same distribution
        rows = [(len(t.input_ids), t.answer_tokens) for t in train_data]
        return cls(rows, rows, "train split")

    def kept(self, rows: list, max_length: int) -> list:
        return [r for r in rows if r[0] <= max_length]

    def train_batches(self, batch_size: int, max_length: int, seed: int, rows_seen: int) -> list[tuple]:
        """(rows, padded width, padded answer rows) of the micro-batches training will run:
        the same length-grouped batches, epoch after epoch, until `rows_seen` rows."""
        from .batching import LengthGroupedBatches

        rows = self.kept(self.train, max_length)
        if not rows:
            return []
        sampler = LengthGroupedBatches([r[0] for r in rows], batch_size, seed)
        out, epoch, n_micro = [], 0, max(1, math.ceil(rows_seen / batch_size))
        while len(out) < n_micro:
            out += [_shape([rows[i] for i in batch]) for batch in sampler.batches(epoch)]
            epoch += 1
        return out[:n_micro]

    def eval_batches(self, batch_size: int, max_length: int) -> list[tuple]:
        rows = sorted(self.kept(self.eval, max_length))
        size = max(batch_size, EVAL_BATCH_MIN)
        return [_shape(rows[i:i + size]) for i in range(0, len(rows), size)]

    def mean_length(self, max_length: int) -> float:
        rows = self.kept(self.train, max_length)
        return sum(r[0] for r in rows) / max(len(rows), 1)

    def answer_fraction(self, max_length: int) -> float:
        rows = self.kept(self.train, max_length)
        return sum(r[1] for r in rows) / max(sum(r[0] for r in rows), 1)


def _shape(rows: list) -> tuple[int, int, int]:
    width = -(-max(r[0] for r in rows) // PAD_MULTIPLE) * PAD_MULTIPLE
    answers = sum(r[1] for r in rows)
    return len(rows), width, answers


# --------------------------------------------------------------------------- the device
@dataclass
class Device:
    kind: str  # cpu | cuda
    budget: float  # bytes training may use
    label: str
    peak_gflops: float
    mfu: float
    time_note: str


def _load_average() -> float:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return 0.0


def device_pattern(text: str):
    match = re.fullmatch(r"cpu|cuda(?::(\d+(?:\.\d+)?)\s*gi?b)?", text.strip().lower())
    if not match:
        raise KoloraError(f"--device '{text}' is not cpu, cuda or cuda:<N>GB", "for example --device cuda:8GB")
    return match


def parse_device(text: str, precision: str, peak_tflops: float | None, compiled: bool = True) -> Device:
    """The device an estimate is for; on a CPU `compiled` says whether training compiles its
    decoder layers, which decides the calibrated MFU."""
    text = text.strip().lower()
    if text == "cpu":
        info = meminfo()
        total, avail = info.get("MemTotal", 0), info.get("MemAvailable", 0)
        peak = matmul_peak_gflops(precision)
        kind = cpu_class()
        mfu_compiled, mfu_eager, mfu_fp32 = CPU_MFU[kind]
        if precision not in ("bf16", "fp16"):
            mfu, how = (mfu_fp32, "float32") if compiled else (mfu_fp32 * mfu_eager / mfu_compiled, "float32, eager layers")
        else:
            mfu, how = (mfu_compiled, "compiled layers") if compiled else (mfu_eager, "eager layers")
        note = f"MFU {100 * mfu:.0f}% ({how}) " + (f"calibrated on real runs on an idle {kind} CPU" if kind != "other" else
                                                   "calibrated on real runs on an idle CPU without bf16 instructions")
        load, cores = _load_average(), os.cpu_count() or 1
        if load > cores:  # threads then wait on each other; measured 10-40x slower steps here
            note += f"; NOW load {load:.1f} on {cores} cores: expect training to be several times slower"
        return Device("cpu", avail or total, f"cpu: {total / GiB:.1f} GiB RAM, {avail / GiB:.1f} GiB available",
                      peak, mfu, note)
    match = device_pattern(text)
    if match.group(1):
        budget = float(match.group(1)) * GiB
        label = f"cuda: {float(match.group(1)):g} GiB GPU"
        if peak_tflops:
            return Device("cuda", budget, label, peak_tflops * 1e3, MFU_GPU,
                          f"peak {peak_tflops:g} TFLOP/s as given, MFU {100 * MFU_GPU:.0f}% assumed")
        return Device("cuda", budget, label, GPU_PEAK_TFLOPS * 1e3, MFU_GPU,
                      f"ASSUMED GPU: {GPU_PEAK_TFLOPS:g} TFLOP/s peak at {100 * MFU_GPU:.0f}% MFU "
                      "(pass --peak-tflops for your card)")
    import torch

    if not torch.cuda.is_available():
        raise KoloraError("--device cuda: no CUDA GPU here", "name the GPU's memory instead, e.g. --device cuda:8GB")
    prop = torch.cuda.get_device_properties(0)
    peak = peak_tflops * 1e3 if peak_tflops else matmul_peak_gflops(precision, device="cuda")
    return Device("cuda", prop.total_memory, f"cuda: {prop.name}, {prop.total_memory / GiB:.1f} GiB", peak, MFU_GPU,
                  f"matmul peak measured here, MFU {100 * MFU_GPU:.0f}% assumed")


# --------------------------------------------------------------------------- the estimate
@dataclass
class Setting:
    """The knobs a verdict may turn."""

    batch_size: int
    max_length: int
    checkpointing: bool
    quantization: str

    def describe_change(self, base: "Setting", grad_accum: int) -> str:
        if self.quantization != base.quantization:
            return "use QLoRA (model.quantization: 4bit)"
        if self.checkpointing != base.checkpointing:
            return "turn on train.gradient_checkpointing (~30% slower)"
        if self.batch_size != base.batch_size:
            accum = max(1, round(base.batch_size * grad_accum / self.batch_size))
            return (f"lower train.batch_size to {self.batch_size} (and raise train.grad_accum to {accum} "
                    "to keep the effective batch)")
        return f"lower data.max_length to {self.max_length}"


@dataclass
class Memory:
    runtime: float
    weights: float
    lora_state: float
    activations: float
    logits: float
    eval_batch: float
    loading: float
    worst_batch: tuple
    worst_eval: tuple
    heap_train: float = 0.0  # freed activation blocks the C allocator keeps (CPU)
    heap_eval: float = 0.0
    logit_bytes: int = LOGIT_BYTES_TRAIN  # per answer row per vocabulary entry in a training step
    compiled: bool = False  # decoder layers compiled (activations scaled by COMPILED_ACTIVATIONS)

    @property
    def phases(self) -> dict:
        steady = self.runtime + self.weights
        return {"load": self.runtime + self.loading + self.weights,
                "train": steady + self.lora_state + self.activations + self.logits + self.heap_train,
                "eval": steady + self.lora_state + self.eval_batch + self.heap_eval}

    @property
    def peak(self) -> float:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)


@dataclass
class Estimate:
    facts: ModelFacts
    device: Device
    setting: Setting
    memory: Memory
    profile: ActivationProfile
    data: DataProfile
    precision: str
    base_dtype: str
    steps: int
    grad_accum: int
    step_seconds: float
    eval_seconds: float
    flops_per_token: float
    tokens_per_step: float
    train_rows: int
    dropped: int
    verdict: str
    alternatives: list
    lora_r: int

    @property
    def peak_bytes(self) -> float:
        return self.memory.peak

    @property
    def mfu(self) -> float:
        return self.device.mfu

    @property
    def fits(self) -> bool:
        return self.memory.peak <= self.device.budget

    def phase_mb(self) -> dict:
        return {k: v / 2**20 for k, v in self.memory.phases.items()}

    def to_json(self) -> dict:
        m = self.memory
        return {"model": self.facts.name, "device": self.device.label, "budget_gib": self.device.budget / GiB,
                "peak_gib": m.peak / GiB, "peak_phase": m.peak_phase, "fits": self.fits, "verdict": self.verdict,
                "alternatives": self.alternatives,
                "parts_gib": {k: getattr(m, k) / GiB for k in ("runtime", "weights", "lora_state", "activations",
                                                               "logits", "eval_batch", "loading", "heap_train",
                                                               "heap_eval")},
                "phases_gib": {k: v / GiB for k, v in m.phases.items()},
                "activation_bytes_per_token_per_layer": self.profile.layer(m.worst_batch[1]),
                "step_seconds": self.step_seconds, "steps": self.steps,
                "total_minutes": (self.steps * self.step_seconds + self.eval_seconds) / 60,
                "flops_per_token": self.flops_per_token, "peak_gflops": self.device.peak_gflops, "mfu": self.mfu}

    def lines(self) -> list[str]:
        f, m, s = self.facts, self.memory, self.setting
        rows, width, answers = m.worst_batch
        per_w = {"4bit": "NF4 linear weights, float32 rest", "8bit": "int8 linear weights, float32 rest"}.get(
            s.quantization, f"{self.base_dtype}")
        total_min = (self.steps * self.step_seconds + self.eval_seconds) / 60
        out = [
            f"model    {f.name} ({f.kind}): {f.n_params / 1e6:.0f} M parameters, {f.layers} layers, hidden {f.hidden}, "
            f"vocab {f.vocab:,}; LoRA r={self.lora_r} on {','.join(f.targets)}: {f.lora_params / 1e6:.2f} M",
            f"data     {self.data.source}: {self.train_rows} training rows ≤ {s.max_length} tokens"
            + (f" ({self.dropped} longer rows dropped)" if self.dropped else "")
            + f"; largest micro-batch {rows} × {width} tokens with {answers} answer rows",
            f"device   {self.device.label}; precision {self.precision}",
            f"peak memory ≈ {m.peak / GiB:.2f} GiB (during {PHASE_WORDS[m.peak_phase]})",
            f"  runtime                {m.runtime / GiB:6.2f} GiB  "
            + ("libraries + tokenizer, measured in this process" if self.device.kind == "cpu" else "CUDA context"),
            f"  base weights           {m.weights / GiB:6.2f} GiB  {f.n_params / 1e6:.0f} M parameters, {per_w}",
            f"  LoRA + AdamW state     {m.lora_state / GiB:6.2f} GiB  {f.lora_params / 1e6:.2f} M × 16 bytes "
            "(fp32 weight, gradient, 2 moments)",
            f"  activations            {m.activations / GiB:6.2f} GiB  " + (
                f"{self.profile.ckpt_per_layer / 1024:.1f} KiB per token per layer kept by gradient checkpointing, "
                f"+ one layer recomputed ({self.profile.layer(width) / 1024:.1f} KiB per token)" if s.checkpointing else
                f"{self.profile.layer(width) / 1024:.1f} KiB per token per layer") +
            f" × {f.layers} layers × {rows * width:,} tokens (measured on a 1-2 layer copy"
            + (f"; × {COMPILED_ACTIVATIONS:g} with compiled layers)" if m.compiled else ")"),
            f"  logits (answers only)  {m.logits / GiB:6.2f} GiB  {min(answers, HEAD_CHUNK_ROWS)} of {answers} rows at a time × {f.vocab:,} × {m.logit_bytes} bytes",
            f"  evaluation batch       {m.eval_batch / GiB:6.2f} GiB  {min(m.worst_eval[2], HEAD_CHUNK_ROWS)} answer rows at a time × {f.vocab:,} × "
            f"{LOGIT_BYTES_EVAL} bytes (batch {m.worst_eval[0]}, after the step's memory is freed)",
        ]
        if m.heap_train:
            out.append(f"  allocator slack        {m.heap_train / GiB:6.2f} GiB  freed activation blocks glibc keeps "
                       f"(measured ≈ {HEAP_RETENTION - 1:g} × activations on this CPU)")
        if m.loading:
            out.append(f"  loading                {m.loading / GiB:6.2f} GiB  checkpoint pages while the weights are cast "
                       "(only during loading)")
        out += [
            f"time     ≈ {self.step_seconds:.2f} s per optimizer step ({self.tokens_per_step:,.0f} tokens × "
            f"{self.flops_per_token / 1e9:.2f} GFLOP/token at {self.device.peak_gflops:,.0f} GFLOP/s peak; "
            f"{self.device.time_note})",
            f"         {self.steps} steps ≈ {total_min:.1f} min including evaluation, plus model loading",
            f"verdict  {self.verdict}",
        ]
        out += [f"         also fits: {alt}" for alt in self.alternatives]
        return out



PHASE_WORDS = {"load": "model loading", "train": "a training step", "eval": "evaluation"}


def memory_for(facts: ModelFacts, profile: ActivationProfile, data: DataProfile, device: Device, setting: Setting,
               base_dtype: str, runtime: float, seed: int, rows_seen: int, compiled: bool = False,
               compute_bytes: int = 2) -> Memory:
    """Peak resident memory per phase. `compiled`: training compiles its decoder layers (then
    activations × COMPILED_ACTIVATIONS, no allocator slack, the fused head's logits buffer of
    `compute_bytes` per entry)."""
    # advise() also tries settings under which training would not compile (device.resolve_compile)
    compiled = compiled and not setting.checkpointing and setting.quantization == "none"
    logit_bytes = compute_bytes if compiled else LOGIT_BYTES_TRAIN
    weights = weight_bytes(facts, base_dtype, setting.quantization)
    train_batches = data.train_batches(setting.batch_size, setting.max_length, seed, rows_seen)
    if not train_batches:
        raise KoloraError(f"no training rows are at most data.max_length={setting.max_length} tokens",
                          "raise data.max_length")

    def step_bytes(shape):
        rows, width, answers = shape
        # checkpointing makes the inputs require a gradient, so then every layer keeps its checkpoint
        kept_layers = facts.layers if setting.checkpointing else facts.trained_layers
        act = profile.saved(rows * width, width, kept_layers, setting.checkpointing)
        return act * (COMPILED_ACTIVATIONS if compiled else 1.0), min(answers, HEAD_CHUNK_ROWS) * facts.vocab * logit_bytes

    worst = max(train_batches, key=lambda b: sum(step_bytes(b)))
    act, logits = step_bytes(worst)
    evals = data.eval_batches(setting.batch_size, setting.max_length) or [(0, 0, 0)]

    def working_set(shape):  # no graph in evaluation: one layer's tensors at a time
        rows, width, _ = shape
        return profile.one_layer(rows * width, width)

    def eval_bytes(shape):
        return working_set(shape) + min(shape[2], HEAD_CHUNK_ROWS) * facts.vocab * LOGIT_BYTES_EVAL

    worst_eval = max(evals, key=eval_bytes)
    on_cpu = device.kind == "cpu"
    slack = HEAP_RETENTION - 1 if on_cpu and not compiled else 0.0
    # Loading reads the checkpoint's pages while casting them; in the checkpoint's own dtype
    # the weights are those pages (measured: float32 gemma3-270m loads with no extra).
    same_dtype = abs(facts.checkpoint_bytes - weights) < 0.05 * weights
    loading = facts.checkpoint_bytes if on_cpu and not same_dtype else 0.0
    return Memory(runtime, weights, facts.lora_params * 16.0, act, logits, eval_bytes(worst_eval), loading,
                  worst, worst_eval,
                  heap_train=slack * act, heap_eval=slack * working_set(worst_eval), logit_bytes=logit_bytes,
                  compiled=compiled)


def advise(fits_with, setting: Setting, grad_accum: int, allow_qlora: bool) -> tuple[str, list[str]]:
    """The verdict: 'fits', or the least costly single change that fits, then the others."""
    if fits_with(setting):
        return "fits", []
    options = []
    for b in range(setting.batch_size - 1, 0, -1):  # slower only; same effective batch
        if fits_with(replace(setting, batch_size=b)):
            options.append(replace(setting, batch_size=b))
            break
    if not setting.checkpointing and fits_with(replace(setting, checkpointing=True)):
        options.append(replace(setting, checkpointing=True))
    if allow_qlora and setting.quantization == "none" and fits_with(replace(setting, quantization="4bit")):
        options.append(replace(setting, quantization="4bit"))
    for length in range(setting.max_length - PAD_MULTIPLE, PAD_MULTIPLE - 1, -PAD_MULTIPLE):  # drops data: last
        try:
            if fits_with(replace(setting, max_length=length)):
                options.append(replace(setting, max_length=length))
                break
        except KoloraError:  # no rows left at this length
            break
    changes = [o.describe_change(setting, grad_accum) for o in options]
    if changes:
        return f"does not fit — {changes[0]}", changes[1:]
    smallest = replace(setting, batch_size=1, checkpointing=True,
                       quantization="4bit" if allow_qlora else setting.quantization)
    if fits_with(smallest):
        return ("does not fit with one change — combine: train.batch_size 1, train.gradient_checkpointing true"
                + (", model.quantization 4bit" if allow_qlora else "")), []
    return "does not fit even with batch 1, gradient checkpointing and QLoRA — use a smaller model or a bigger device", []


def estimate(cfg, device: str = "cpu", peak_tflops: float | None = None, src=None, tokenizer=None,
             data: DataProfile | None = None, precision: str | None = None, runtime: float | None = None,
             total_steps: int | None = None) -> Estimate:
    """Everything `kolora estimate` prints. Pieces the caller already has (train --dry-run) may be passed in."""
    from .models import load_tokenizer, resolve

    device_pattern(device)  # a typo fails before anything loads
    src = src or resolve(cfg.model.name)
    on_cuda = device.strip().lower().startswith("cuda")
    # a GPU that is not here is assumed to do bf16 (Ampere or newer; fp16 has the same sizes)
    precision = precision or choose_precision(cfg.train.mixed_precision, cuda=on_cuda, cuda_bf16=True).mixed
    if data is None:
        tokenizer = tokenizer or load_tokenizer(src, cfg.model.trust_remote_code)
        data = DataProfile.from_config(cfg, tokenizer)
    if on_cuda:
        runtime = CUDA_CONTEXT_BYTES
    elif runtime is None:
        runtime = training_runtime_bytes()
    facts = model_facts(cfg, src)
    # training compiles its decoder layers on a CPU by default (device.resolve_compile), which
    # keeps fewer activations and runs faster than the eager probe's shapes suggest
    compiled = not on_cuda and resolve_compile(cfg, False, facts.n_params)[0]
    dev = parse_device(device, precision, peak_tflops, compiled)
    dtype = choose_precision(precision, cfg.model.dtype, cuda=on_cuda, cuda_bf16=True).weights
    profile = probe_activations(facts, cfg, precision)
    setting = Setting(cfg.train.batch_size, cfg.data.max_length, cfg.train.gradient_checkpointing,
                      cfg.model.quantization)
    kept = data.kept(data.train, setting.max_length)
    steps = total_steps or steps_of(cfg, len(kept))
    rows_seen = steps * cfg.train.grad_accum * cfg.train.batch_size

    compute_bytes = 2 if precision in ("bf16", "fp16") else 4

    def memory(s: Setting) -> Memory:
        return memory_for(facts, profile, data, dev, s, dtype, runtime, cfg.train.seed, rows_seen, compiled,
                          compute_bytes)

    mem = memory(setting)
    verdict, alternatives = advise(lambda s: memory(s).peak <= dev.budget, setting, cfg.train.grad_accum,
                                   allow_qlora=True)
    if verdict == "fits" and mem.peak > 0.8 * dev.budget:
        verdict = f"fits, tightly ({mem.peak / GiB:.1f} of {dev.budget / GiB:.1f} GiB; the estimate's error is ±25%)"
    elif verdict == "fits":
        verdict = f"fits ({mem.peak / GiB:.1f} of {dev.budget / GiB:.1f} GiB)"

    mean_len = data.mean_length(setting.max_length)
    flops_tok = train_flops(facts.model, 1, data.answer_fraction(setting.max_length), mean_len, facts.lora_params,
                           cfg.lora.layers)
    tokens_step = cfg.train.batch_size * cfg.train.grad_accum * mean_len
    rate = dev.peak_gflops * 1e9 * dev.mfu
    # Evaluation is a forward pass, about half a training pass per token. Validation (half of
    # the held-out rows) runs at step 0, every eval_every steps and at the end; the test half
    # runs twice (base and tuned).
    held_out = sum(r[0] for r in data.kept(data.eval, setting.max_length))
    passes = 2 + (steps // cfg.train.eval_every if cfg.train.eval_every else 0) + 2
    eval_s = passes * held_out / 2 * flops_tok / 2 / rate
    return Estimate(facts, dev, setting, mem, profile, data, precision, dtype, steps, cfg.train.grad_accum,
                    tokens_step * flops_tok / rate, eval_s, flops_tok, tokens_step, len(kept),
                    len(data.train) - len(kept), verdict, alternatives, cfg.lora.r)


def steps_of(cfg, train_rows: int, processes: int = 1) -> int:
    """Optimizer steps, counted the way train.py counts them."""
    if cfg.train.max_steps:
        return cfg.train.max_steps
    local_batches = math.ceil(math.ceil(train_rows / cfg.train.batch_size) / processes)
    return max(1, math.ceil(cfg.train.epochs * math.ceil(local_batches / cfg.train.grad_accum)))


def training_runtime_bytes() -> float:
    """What the training process holds before its model loads: the same libraries, tokenizer
    and data as this process now (called after both are loaded)."""
    import accelerate  # noqa: F401 - training imports them, so they count here too
    import peft  # noqa: F401

    return current_rss() or LIBRARIES_BYTES


# --------------------------------------------------------------------------- train --dry-run
def plan_lines(cfg, src, train_data, total_steps: int, precision: str) -> list[str]:
    """`kolora train --dry-run`: the estimate with the data training already tokenized."""
    est = estimate(cfg, "cpu", src=src, data=DataProfile.from_tokenized(train_data), precision=precision,
                   runtime=training_runtime_bytes(), total_steps=total_steps)
    return [f"estimate: {line}" for line in est.lines()] + ["dry run: nothing was trained"]
