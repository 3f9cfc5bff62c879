"""`kolora train`: LoRA / QLoRA fine-tuning, one explicit loop built on Accelerate.

Reads top to bottom: resolve config → data (split, tokenize, length check) → model + LoRA →
optimizer + schedule → the loop (accumulate, clip, step, log, eval, checkpoint) → final
adapter, base-vs-tuned test loss, run summary. The same command runs under
`accelerate launch` (DDP/FSDP/DeepSpeed); Accelerate owns the processes, kolora owns the loop.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .config import RunConfig, save_yaml
from .data import SPLITS, Example, category_table, load_splits, write_jsonl
from .errors import KoloraError
from .models import ModelSource, load_model, load_tokenizer, resolve, target_modules
from .prompt import IGNORE, encode_example, fact_token_mask
from .runs import Run, claim_output_dir, remove_entries, truncate_metrics


# --------------------------------------------------------------------------- data → tensors
@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    weights: list[float] | None = None  # per-token loss weight (train.fact_weight); None = all 1

    @property
    def answer_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def tokenize_split(tokenizer, examples: list[Example], cfg: RunConfig,
                   fact_weight: float = 1.0) -> tuple[list[Tokenized], list[Example], list]:
    """Tokenize; rows over max_length are dropped (truncation would cut the EOS) and returned
    as their line numbers ('file:line' for rows of a data.train_only file). `fact_weight` ≠ 1
    attaches per-token loss weights (the training split only: held-out losses stay plain)."""
    kept, kept_ex, too_long = [], [], []
    for ex in examples:
        ids, labels = encode_example(tokenizer, ex, cfg.data.system_prompt, cfg.data.template)
        if len(ids) > cfg.data.max_length:
            too_long.append(f"{Path(ex.source).name}:{ex.line}" if ex.source else ex.line)
            continue
        kept.append(Tokenized(ids, labels, fact_weights(tokenizer, ex.answer, labels, fact_weight)))
        kept_ex.append(ex)
    return kept, kept_ex, too_long


def fact_weights(tokenizer, answer: str, labels: list[int], weight: float) -> list[float] | None:
    """Loss weights: `weight` on answer tokens that state a fact, 1 elsewhere (None when weight is 1).

    Why: the bundled model learns the wording of an answer long before its article number —
    Gemma spells numbers digit by digit, and 'Article 624' for 'Article 626' costs one token of
    sixty in the plain loss. Weighting those tokens trains the facts harder without training
    the wording longer (which makes the model over-confident on unseen answers)."""
    if weight == 1:
        return None
    n_answer = sum(1 for x in labels if x != IGNORE)
    mask = fact_token_mask(tokenizer, answer, n_answer)
    return [1.0] * (len(labels) - n_answer) + [weight if m else 1.0 for m in mask]


def fact_token_share(data: list[Tokenized]) -> tuple[int, int]:
    """(answer tokens with a fact weight ≠ 1, all answer tokens)."""
    weighted = sum(1 for t in data if t.weights for w, x in zip(t.weights, t.labels) if x != IGNORE and w != 1)
    return weighted, sum(t.answer_tokens for t in data)


class LengthGroupedBatches:
    """Batches of similar length (less padding), reshuffled each epoch from (seed, epoch).

    Deterministic: the batches of epoch e depend only on the seed, e and the lengths, so a
    resumed run sees exactly the batches the interrupted one would have seen."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group: int = 16):
        self.lengths, self.batch_size, self.seed, self.group, self.epoch = lengths, batch_size, seed, group, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        span = self.batch_size * self.group  # sort within windows: grouped yet still random
        batches = []
        for start in range(0, len(order), span):
            window = sorted(order[start:start + span], key=lambda i: self.lengths[i])
            # The last window's rows are spread evenly (13 rows, batch 4: 4+3+3+3, not 4+4+4+1):
            # a 1-row batch would make torch.compile build a second graph (sizes 0 and 1 are
            # specialised), which cost 27 s in the gemma3-270m demo.
            k = -(-len(window) // self.batch_size)
            size, extra = divmod(len(window), k)
            at = 0
            for j in range(k):
                n = size + (j < extra)
                batches.append(window[at:at + n])
                at += n
        rng.shuffle(batches)
        return batches

    def __iter__(self):
        return iter(self.batches(self.epoch))

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)


PAD_MULTIPLE = 32  # few distinct shapes: oneDNN and the allocator reuse their buffers (measured: -15% time, -0.9 GB RSS)


def collate(items: list[Tokenized], pad_id: int, multiple: int = PAD_MULTIPLE, device=None):
    """Right-padded batch; built on the CPU and moved to `device` when given (the training
    DataLoader leaves that to accelerate; evaluation passes the model's device)."""
    import torch

    width = max(len(t.input_ids) for t in items)
    width = -(-width // multiple) * multiple
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    weighted = any(t.weights for t in items)
    weights = torch.ones((len(items), width), dtype=torch.float32) if weighted else None
    for row, t in enumerate(items):  # right padding; labels by position, never by pad id
        n = len(t.input_ids)
        ids[row, :n] = torch.tensor(t.input_ids)
        labels[row, :n] = torch.tensor(t.labels)
        mask[row, :n] = 1
        if t.weights:
            weights[row, :n] = torch.tensor(t.weights)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if weighted:
        batch["weights"] = weights
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch


# --------------------------------------------------------------------------- the loss
HEAD_CHUNK_ROWS = 256  # answer rows per output-layer chunk (measured on gemma3-270m: +28% tokens/s, same loss)


def _head_ce():
    """Output layer + cross entropy over answer rows, in chunks, as one autograd function.

    The head is frozen, so its only gradient is the one w.r.t. the hidden states: computing it
    chunk by chunk in the forward pass means the (rows × vocabulary) logits never exist whole
    and nothing vocabulary-sized is kept for backward. Same FLOPs as the plain head + CE.
    Returns (Σ token_weight × CE, Σ CE); only the first has a gradient."""
    import torch

    class HeadCE(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h, weight, bias, wanted, softcap, token_weight):
            h = h.detach().to(weight.dtype)
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            plain = torch.zeros((), dtype=torch.float32, device=h.device)
            grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
            for s in range(0, h.shape[0], HEAD_CHUNK_ROWS):
                z = h[s:s + HEAD_CHUNK_ROWS] @ weight.t()
                if bias is not None:
                    z = z + bias
                z = z.float()
                capped = None
                if softcap:
                    capped = torch.tanh(z / softcap)
                    z = capped * softcap
                w = wanted[s:s + HEAD_CHUNK_ROWS]
                valid = w != IGNORE
                target = torch.where(valid, w, 0)
                lse = torch.logsumexp(z, dim=-1)
                ce = (lse - z.gather(1, target[:, None]).squeeze(1)) * valid
                scale = valid if token_weight is None else valid * token_weight[s:s + HEAD_CHUNK_ROWS]
                plain += ce.sum()
                total += (ce * scale).sum()  # = plain without weights (ce is already 0 off the answer)
                if grad_h is not None:
                    g = z.sub_(lse[:, None]).exp_()  # softmax in place; d CE / d logits = softmax - onehot
                    g[torch.arange(g.shape[0], device=g.device), target] -= 1
                    g *= scale[:, None]
                    if capped is not None:
                        g *= 1 - capped * capped
                    grad_h[s:s + HEAD_CHUNK_ROWS] = g.to(weight.dtype) @ weight
            if grad_h is not None:
                ctx.save_for_backward(grad_h)
            ctx.h_dtype = h.dtype
            ctx.mark_non_differentiable(plain)
            return total, plain

        @staticmethod
        def backward(ctx, grad_total, _grad_plain):
            (grad_h,) = ctx.saved_tensors
            return (grad_h * grad_total).to(ctx.h_dtype), None, None, None, None, None

    return HeadCE


def answer_loss_module(peft_model):
    """Wrap the model so that forward returns (summed CE, answer-token count); with per-token
    `weights` (train.fact_weight) (weighted sum, count, plain sum) — the plain sum is what is logged.

    The output layer runs only at answer positions, in chunks. For Gemma-3 (262k vocabulary)
    the full logits are most of the compute and memory of a step; the prompt positions' logits
    are never needed because their labels are ignored. Wrapping (instead of calling submodules
    from the loop) keeps DDP's gradient hooks on the path."""
    import torch

    head_ce = _head_ce()

    class AnswerLoss(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model
            causal = model.get_base_model() if hasattr(model, "get_base_model") else model
            self.backbone = getattr(causal, causal.base_model_prefix)
            self.head = causal.get_output_embeddings()
            self.softcap = getattr(causal.config, "final_logit_softcapping", None)
            weight = getattr(self.head, "weight", None)
            # A plain frozen (possibly tied) linear head; anything else (quantized, sharded)
            # goes through its own forward.
            self.chunked = (type(self.head) is torch.nn.Linear and weight is not None and weight.dim() == 2
                            and weight.is_floating_point() and not weight.requires_grad)

        def forward(self, input_ids, attention_mask, labels, weights=None):
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            # position t predicts token t+1
            targets = labels[:, 1:]
            keep = targets != IGNORE
            h, wanted = hidden[:, :-1][keep], targets[keep]
            token_weight = weights[:, 1:][keep].float() if weights is not None else None
            if self.chunked:
                total, plain = head_ce.apply(h, self.head.weight, self.head.bias, wanted, self.softcap, token_weight)
            else:
                logits = self.head(h).float()
                if self.softcap:
                    logits = torch.tanh(logits / self.softcap) * self.softcap
                ce = torch.nn.functional.cross_entropy(logits, wanted, reduction="none")
                plain = ce.sum()
                total = (ce * token_weight).sum() if token_weight is not None else plain
            if token_weight is None:
                return total, keep.sum()
            return total, keep.sum(), plain.detach()

    return AnswerLoss(peft_model)


def evaluate_loss(loss_model, data: list[Tokenized], pad_id: int, batch_size: int, autocast) -> float:
    """Mean answer-token cross entropy over `data` (token-weighted)."""
    import torch

    if not data:
        return float("nan")
    was_training = loss_model.training
    loss_model.eval()
    total, count = 0.0, 0
    device = next(loss_model.parameters()).device  # the model may be on a GPU
    order = sorted(range(len(data)), key=lambda i: len(data[i].input_ids))
    with torch.no_grad(), autocast():
        for start in range(0, len(order), batch_size):
            batch = collate([data[i] for i in order[start:start + batch_size]], pad_id, device=device)
            loss_sum, n = loss_model(**batch)
            total += float(loss_sum)
            count += int(n)
    loss_model.train(was_training)
    return total / max(count, 1)


# --------------------------------------------------------------------------- setup helpers
def resolve_precision(requested: str, use_cuda: bool) -> str:
    import torch

    if requested != "auto":
        if requested not in ("no", "bf16", "fp16"):
            raise KoloraError(f"train.mixed_precision '{requested}' is not one of auto, bf16, fp16, no")
        return requested
    if use_cuda:
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_bf16() else "no"


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def base_dtype(cfg: RunConfig, precision: str) -> str:
    if cfg.model.dtype != "auto":
        return cfg.model.dtype
    # Frozen weights held in bf16 halve memory and skip autocast's per-step weight casts.
    return "bfloat16" if precision == "bf16" else "float32"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def default_output_dir(model_name: str) -> str:
    stem = Path(model_name).name.replace(".gguf", "") or "model"
    return str(Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")


def attach_lora(model, cfg: RunConfig):
    from peft import LoraConfig, get_peft_model

    targets = target_modules(model, cfg.lora.target_modules)
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=targets, use_rslora=cfg.lora.use_rslora, use_dora=cfg.lora.use_dora,
                      fan_in_fan_out=model.config.model_type == "gpt2",  # GPT-2's Conv1D stores W transposed
                      bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora), targets


# --------------------------------------------------------------------------- run directory helpers
def decoder_layers(model) -> list:
    """The repeated blocks of a causal LM (Llama/Gemma/Phi: model.layers, GPT-2: transformer.h)."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(causal, causal.base_model_prefix, causal)
    for name in ("layers", "h", "blocks"):
        layers = getattr(backbone, name, None)
        if layers is not None and len(layers):
            return list(layers)
    return []


COMPILE_MIN_PARAMS = 50e6  # below this the minute of compiling costs more than it saves


def resolve_compile(cfg: RunConfig, use_cuda: bool, n_params: int) -> tuple[bool, str]:
    """(compile?, why). auto compiles on a CPU with a C++ compiler (inductor writes C++) for an
    unquantized model of at least 50M parameters without gradient checkpointing; measured on
    gemma3-270m: +46% tokens/s and 0.8 GB less peak RSS, for about a minute of compiling."""
    value = str(cfg.train.compile).lower()
    if value in ("no", "false", "off", "0"):
        return False, "off (train.compile)"
    if value not in ("auto", "yes", "true", "on", "1"):
        raise KoloraError(f"train.compile '{cfg.train.compile}' is not one of auto, true, false")
    if value != "auto":
        return True, "on (train.compile)"
    if use_cuda:
        return False, "off (auto: not measured on GPUs yet; --train.compile true to try)"
    if cfg.model.quantization != "none" or cfg.train.gradient_checkpointing:
        return False, "off (auto: quantized or gradient checkpointing)"
    if n_params < COMPILE_MIN_PARAMS:
        return False, f"off (auto: a small model, {n_params / 1e6:.0f}M parameters)"
    if not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")):
        return False, "off (auto: no C++ compiler found; install g++ for faster CPU training)"
    return True, "on (auto)"


class CompiledLayers:
    """torch.compile each decoder layer in place (parameter names unchanged, so adapters and
    checkpoints look the same), with a switch back to eager: evaluation and generation would
    otherwise compile new graphs (no grad, KV cache) for a few forward passes."""

    def __init__(self, model):
        import torch

        # A layer inductor cannot compile runs eagerly instead of failing the run.
        torch._dynamo.config.suppress_errors = True
        self.layers = decoder_layers(model)
        for layer in self.layers:
            layer.compile(dynamic=True)

    @contextlib.contextmanager
    def eager(self):
        import torch

        with torch.compiler.set_stance("force_eager"):
            yield

    def off(self) -> None:
        import torch

        torch.compiler.set_stance("force_eager")


def heap_trimmer():
    """A function that hands freed heap memory back to the OS (glibc's malloc_trim), or a no-op.

    Every micro-batch has another shape, so glibc's heap fills with free holes that no later
    request fits: on the gemma3-270m demo resident memory crept from 2.6 to 4.2 GB over 174
    steps while live memory stayed flat. Trimming once per optimizer step slows that creep (peak
    3.56 GB at step 175 and 3.67 GB at step 290 of a 5-epoch run, against 4.23 GB at step 174
    without). The call takes ~0.1 ms, but the next step faults its pages in again: steady-state
    tokens/s measured ~13% lower (every N steps would cost less; not measured yet)."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return lambda: None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # musl and other libcs have no malloc_trim
        return lambda: None
    trim.argtypes = [ctypes.c_size_t]
    return lambda: trim(0)


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


def out_of_memory_error(cfg: RunConfig, step: int, device) -> KoloraError:
    bs, ga = cfg.train.batch_size, cfg.train.grad_accum
    fixes = []
    if bs > 1:
        fixes.append(f"--train.batch_size {bs // 2} --train.grad_accum {ga * 2} (same effective batch of {bs * ga})")
    if not cfg.train.gradient_checkpointing:
        fixes.append("--train.gradient_checkpointing true")
    if cfg.model.quantization == "none":
        fixes.append("--model.quantization 4bit")
    fixes.append(f"a lower --data.max_length (now {cfg.data.max_length})")
    return KoloraError(f"out of memory on {device} at step {step} (micro-batch {bs} × max_length {cfg.data.max_length})",
                       "try " + ", or ".join(fixes) + "; the last checkpoint is intact (resume with --resume)")


def is_oom(e: BaseException) -> bool:
    import torch

    if isinstance(e, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


# --------------------------------------------------------------------------- the recipe
def train(cfg: RunConfig, resume: str | None = None, dry_run: bool = False, force: bool = False) -> Path | None:
    from .interrupts import StopRequest

    with StopRequest() as stop:
        return _train(cfg, resume, dry_run, force, stop)


def _train(cfg: RunConfig, resume: str | None, dry_run: bool, force: bool, stop) -> Path | None:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import gather_object, set_seed
    from transformers import get_cosine_schedule_with_warmup

    from . import checkpoint as ckpt
    from .interrupts import Faults

    faults = Faults()
    # 1. config and run directory ---------------------------------------------------------
    def absolute(value: str) -> str:  # later commands may run elsewhere; hub names stay as they are
        return str(Path(value).expanduser().resolve()) if Path(value).expanduser().exists() else value

    cfg.model.name, cfg.data.path = absolute(cfg.model.name), absolute(cfg.data.path)
    cfg.data.train_only = [absolute(v) for v in cfg.data.train_only or []]
    run = Run(Path(resume or cfg.train.output_dir or default_output_dir(cfg.model.name)))
    if not resume and not dry_run:  # --force replaces only a kolora run (run.json), never other files
        remove_entries(claim_output_dir(run.path, "run", force))
    use_cuda = torch.cuda.is_available()
    precision = resolve_precision(cfg.train.mixed_precision, use_cuda)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    accelerator = Accelerator(mixed_precision=precision, cpu=not use_cuda)
    is_main = accelerator.is_main_process
    say = (lambda *a: print(*a, flush=True)) if is_main else (lambda *a: None)
    set_seed(cfg.train.seed)

    if not cfg.train.fact_weight > 0:
        raise KoloraError(f"train.fact_weight must be positive (got {cfg.train.fact_weight})",
                          "1 trains with the plain loss; 2-4 weights the facts' tokens more")

    # 2. data -----------------------------------------------------------------------------
    splits, data_report = load_splits(cfg)  # before the model: a data mistake fails in a second
    for line in data_report:
        say(line)
    src: ModelSource = resolve(cfg.model.name)
    tokenizer = load_tokenizer(src, cfg.model.trust_remote_code)
    tokenized, dropped = {}, {}
    for name in SPLITS:
        weight = cfg.train.fact_weight if name == "train" else 1.0
        tokenized[name], splits[name], dropped[name] = tokenize_split(tokenizer, splits[name], cfg, weight)
    n_dropped = sum(len(v) for v in dropped.values())
    if n_dropped:
        say(f"dropped {n_dropped} rows longer than data.max_length={cfg.data.max_length} tokens "
            f"(lines {', '.join(str(x) for v in dropped.values() for x in v[:10])}); raise data.max_length to keep them")
    if not tokenized["train"]:
        raise KoloraError("no training rows left after the length check", f"raise data.max_length (now {cfg.data.max_length})")
    for line in category_table(splits):
        say("  " + line)

    train_data = tokenized["train"]
    if cfg.train.fact_weight != 1:
        weighted, answer_tokens = fact_token_share(train_data)
        say(f"train.fact_weight {cfg.train.fact_weight:g}: {weighted:,} of {answer_tokens:,} answer tokens "
            f"({100 * weighted / max(answer_tokens, 1):.1f}%) state a fact (statute reference, period, amount, …)")
    sampler = LengthGroupedBatches([len(t.input_ids) for t in train_data], cfg.train.batch_size, cfg.train.seed)
    # Its own generator: creating an iterator must not draw from the global RNG (dropout's),
    # or a resumed run would see different dropout masks than the uninterrupted one.
    loader = torch.utils.data.DataLoader(train_data, batch_sampler=sampler, generator=torch.Generator().manual_seed(0),
                                         collate_fn=lambda b: collate(b, tokenizer.pad_token_id))
    local_batches = math.ceil(len(sampler) / accelerator.num_processes)
    steps_per_epoch = math.ceil(local_batches / cfg.train.grad_accum)
    total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    train_tokens = sum(len(t.input_ids) for t in train_data)
    say(f"plan: {len(train_data)} train rows, {train_tokens:,} tokens/epoch, {total_steps} optimizer steps "
        f"(batch {cfg.train.batch_size} × accum {cfg.train.grad_accum} × {accelerator.num_processes} process(es)), "
        f"precision {precision}, device {accelerator.device}")
    if dry_run:
        from .estimate import plan_lines

        for line in plan_lines(cfg, src, train_data, total_steps, precision):
            say(line)
        return None

    # The run directory describes itself before the model loads: a run killed at any moment
    # from here on can be resumed with `--resume`.
    if is_main and not resume:
        (run.path / "data").mkdir(parents=True, exist_ok=True)
        run.update_info(kolora_version=__version__)  # run.json first: it marks the folder as a run
        save_yaml(cfg, run.config_file, f"# kolora train --config {run.config_file}\n")
        for name in SPLITS:
            write_jsonl(splits[name], run.split(name))
        tokenizer.save_pretrained(run.tokenizer)

    # 3. model + LoRA ---------------------------------------------------------------------
    dtype = base_dtype(cfg, precision)
    model = load_model(src, dtype, cfg.model.quantization, cfg.model.trust_remote_code,
                       device=accelerator.device if cfg.model.quantization != "none" else None)
    if cfg.model.quantization != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
    elif cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    quantized = sum(1 for m in model.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt"))
    model, targets = attach_lora(model, cfg)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    say(f"model {cfg.model.name} ({src.kind}), base {dtype}, LoRA r={cfg.lora.r} on {','.join(targets)}: "
        f"{n_train / 1e6:.2f} M trainable ({100 * n_train / n_all:.2f}%)")
    loss_model = answer_loss_module(model)
    do_compile, compile_why = resolve_compile(cfg, use_cuda, n_all)
    compiled = CompiledLayers(model) if do_compile else None
    if compiled and not compiled.layers:
        compiled, compile_why = None, "off (no decoder layers found)"
    say(f"torch.compile of the decoder layers: {compile_why}")
    from .estimate import matmul_peak_gflops, train_flops

    # MFU = achieved FLOP/s ÷ a matmul peak measured here, now, in the compute dtype.
    peak = None if use_cuda else matmul_peak_gflops(precision) * 1e9
    mean_len = train_tokens / len(train_data)
    # What a resume must match; stored in every checkpoint's manifest.
    fingerprints = {"model": ckpt.model_fingerprint(src.path), "model_name": cfg.model.name,
                    "lora": ckpt.lora_shape(cfg, targets), "data": ckpt.data_fingerprint(train_data),
                    "data_path": ", ".join([cfg.data.path] + list(cfg.data.train_only or [])), "train_rows": len(train_data),
                    "batching": [cfg.train.batch_size, cfg.train.grad_accum, accelerator.num_processes]}
    if cfg.train.fact_weight != 1:  # only when set, so checkpoints from before the key still resume
        fingerprints["fact_weight"] = cfg.train.fact_weight

    # 4. optimizer + schedule -------------------------------------------------------------
    params = [p for p in loss_model.parameters() if p.requires_grad]
    named_params = [(n, p) for n, p in loss_model.model.named_parameters() if p.requires_grad]
    try:
        optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=True)
    except (RuntimeError, TypeError):
        optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, foreach=True)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.train.warmup_ratio * total_steps), total_steps)
    loss_model, optimizer, loader = accelerator.prepare(loss_model, optimizer, loader)
    unwrapped = accelerator.unwrap_model(loss_model)

    # 5. resume -----------------------------------------------------------------------------
    state = {"step": 0, "micro_step": 0, "window_pos": 0, "window_loss": 0.0, "best_val": None, "best_checkpoint": None,
             "last_eval": None, "bad_evals": 0, "tokens": 0, "answer_tokens": 0, "skipped_steps": 0}
    partial_grads = None
    if resume:
        latest, unusable = ckpt.find_latest(run.checkpoints)
        for name, why in unusable:
            say(f"skipping checkpoint {name}: {why}")
        if latest is None:
            say(f"no complete checkpoint in {run.path}: starting the run again from step 0")
            dropped_events = truncate_metrics(run.metrics, -1) if is_main else 0
        else:
            ckpt.compare_fingerprints(ckpt.read_manifest(latest)["fingerprints"], fingerprints, latest)
            loaded, partial_grads = ckpt.load(latest, peft_model=unwrapped.model, optimizer=optimizer,
                                              scheduler=scheduler, rank=accelerator.process_index)
            state.update(loaded)
            dropped_events = truncate_metrics(run.metrics, state["step"]) if is_main else 0
            inside = f", {state['window_pos']} of {cfg.train.grad_accum} micro-batches into the next step" if state["window_pos"] else ""
            say(f"resumed from {latest.name}: step {state['step']}{inside}"
                + (f" ({dropped_events} metrics lines after it dropped)" if dropped_events else ""))
    if is_main:
        run.update_info(kolora_version=__version__, model=cfg.model.name, model_source=src.kind,
                        model_path=src.path, base_dtype=dtype, precision=precision, lora_targets=targets,
                        trainable_params=n_train, total_params=n_all, processes=accelerator.num_processes,
                        quantization=cfg.model.quantization, quantized_modules=quantized, compile=compile_why,
                        data_report=data_report, dropped_too_long=n_dropped, fingerprints=fingerprints)
    accelerator.wait_for_everyone()
    metrics_file = open(run.metrics, "a", encoding="utf-8") if is_main else None
    tb = None
    if is_main and cfg.train.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(str(run.path / "tensorboard"), purge_step=state["step"] + 1 if resume else None)

    def log(event: dict) -> None:
        if not is_main:
            return
        metrics_file.write(json.dumps(event) + "\n")
        metrics_file.flush()
        if tb:
            for k, v in event.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    tb.add_scalar(f"{event['kind']}/{k}", v, event["step"])

    def save(step: int, grads: dict | None = None) -> None:
        rngs = [ckpt.rng_state()] if accelerator.num_processes == 1 else gather_object([ckpt.rng_state()])
        if is_main:
            name = f"step-{step:06d}"
            last = state["last_eval"]
            if last and last[0] == step and last[1] == state["best_val"]:
                state["best_checkpoint"] = name  # kept by pruning even when it is not among the newest
            ckpt.save(run.checkpoints, step, adapter_model=unwrapped.model, optimizer=optimizer, scheduler=scheduler,
                      state=state, fingerprints=fingerprints, rng_by_rank=rngs, grads=grads, fault=faults or None)
            ckpt.prune(run.checkpoints, cfg.train.keep_checkpoints, {state["best_checkpoint"]} - {None})
        accelerator.wait_for_everyone()

    eval_data = tokenized["validation"]
    ev_bs = max(cfg.train.batch_size, 8)

    def run_eval(step: int) -> float:
        with compiled.eager() if compiled else contextlib.nullcontext():
            val = evaluate_loss(unwrapped, eval_data, tokenizer.pad_token_id, ev_bs, accelerator.autocast)
        log({"kind": "eval", "step": step, "val_loss": val})
        state["last_eval"] = [step, val]
        return val

    # 6. the loop ---------------------------------------------------------------------------
    if state["step"] == 0 and state["window_pos"] == 0 and eval_data:
        state["best_val"] = run_eval(0)  # LoRA B starts at 0: this is the base model's loss
        say(f"step 0 validation loss {state['best_val']:.4f} (= base model)")
    micro_batches = len(loader)  # per process, per epoch
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=state["step"], disable=not is_main, desc="train", unit="step", dynamic_ncols=True)
    loss_model.train()
    batches = _stream(loader, sampler, micro_batches, state["micro_step"], accelerator)
    if partial_grads is not None:  # resumed inside an accumulation window: its gradients so far
        for n, p in named_params:
            p.grad = partial_grads[n].to(p.device, p.dtype)
    trim_heap = heap_trimmer() if accelerator.device.type == "cpu" else (lambda: None)
    t_last, tok_last, ans_last, window_loss = time.time(), state["tokens"], state["answer_tokens"], []
    t_start = time.time()
    stop_reason = "max steps"
    stop.armed = True
    try:
        while state["step"] < total_steps:
            # A whole window is fetched first: its answer-token count weights every micro-batch.
            window = [next(batches) for _ in range(cfg.train.grad_accum)]
            window_tokens = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in window)
            # DDP averages gradients over processes; dividing by the global token count × P
            # makes that average the token-weighted mean over the whole global window, so N
            # processes compute the same update as one process with the same global batch.
            norm_tokens = _global_tokens(window_tokens, accelerator) / accelerator.num_processes
            step_loss, start = state["window_loss"], state["window_pos"]
            state["window_loss"], state["window_pos"] = 0.0, 0
            for i in range(start, len(window)):
                batch = window[i]
                sync = i == len(window) - 1
                ctx = accelerator.no_sync(loss_model) if not sync else contextlib.nullcontext()
                with ctx, accelerator.autocast():
                    out = loss_model(**batch)
                    loss = out[0] / max(norm_tokens, 1)  # token-weighted mean over the whole window
                    # with train.fact_weight the update follows the weighted loss; the plain one is logged
                    shown = out[2] / max(norm_tokens, 1) if len(out) > 2 else loss
                    if faults.hit("nan-at-step", state["step"] + 1):
                        loss, shown = loss * float("nan"), shown * float("nan")
                    if faults.hit("oom-at-step", state["step"] + 1):
                        raise torch.OutOfMemoryError("CUDA out of memory (injected by KOLORA_FAULTS)")
                accelerator.backward(loss)
                step_loss += float(shown.detach())
                state["tokens"] += int(batch["attention_mask"].sum())
                faults("micro", state["micro_step"] + i + 1)
                if stop.requested and not sync and accelerator.num_processes == 1:
                    # Stop inside the window: keep the gradients accumulated so far, so the
                    # resumed run finishes this very step exactly as it would have.
                    state["window_pos"], state["window_loss"] = i + 1, step_loss
                    save(state["step"], {n: p.grad for n, p in named_params if p.grad is not None})
                    raise _stopped(stop, run, state, inside=True)
            state["answer_tokens"] += window_tokens
            if accelerator.num_processes > 1:  # the logged loss is the global window's mean
                step_loss = float(accelerator.reduce(torch.tensor([step_loss], device=accelerator.device), "mean"))
            state["micro_step"] += len(window)
            grad_norm = None
            if cfg.train.max_grad_norm > 0:
                grad_norm = float(accelerator.clip_grad_norm_(params, cfg.train.max_grad_norm))
            finite = math.isfinite(step_loss) and (grad_norm is None or math.isfinite(grad_norm))
            if finite:
                optimizer.step()
            else:  # no update from a NaN/inf step; the schedule and data still move on
                state["skipped_steps"] += 1
                log({"kind": "skip", "step": state["step"] + 1, "loss": step_loss, "grad_norm": grad_norm})
                if state["skipped_steps"] > cfg.train.max_nonfinite_steps:
                    raise KoloraError(
                        f"loss {step_loss} / gradient norm {grad_norm} is not finite at step {state['step'] + 1} "
                        f"({state['skipped_steps']} non-finite steps, train.max_nonfinite_steps={cfg.train.max_nonfinite_steps})",
                        "lower train.lr, or use --train.mixed_precision no; the last checkpoint is intact "
                        f"(nothing after it was saved): resume with kolora train --resume {run.path}")
                bar.write(f"step {state['step'] + 1}: loss {step_loss} / gradient norm {grad_norm} not finite: "
                          f"step skipped ({state['skipped_steps']} of {cfg.train.max_nonfinite_steps} allowed)") if is_main else None
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            trim_heap()
            state["step"] += 1
            if finite:
                window_loss.append(step_loss)
            step = state["step"]
            faults("step", step)

            if (step % cfg.train.log_every == 0 or step == total_steps) and window_loss:
                now = time.time()
                tokens, answers = state["tokens"] - tok_last, state["answer_tokens"] - ans_last
                dt = max(now - t_last, 1e-9)
                tps = tokens * accelerator.num_processes / dt
                mfu = train_flops(unwrapped.model, tokens, answers, mean_len, n_train) / dt / peak if peak else None
                loss_avg = sum(window_loss) / len(window_loss)
                log({"kind": "train", "step": step, "epoch": state["micro_step"] / micro_batches, "loss": loss_avg,
                     "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm, "tokens_per_s": tps,
                     "answer_tokens_per_s": answers * accelerator.num_processes / dt,
                     "mfu": mfu, "elapsed_s": now - t_start, "peak_rss_mb": peak_rss_mb()})
                bar.set_postfix(loss=f"{loss_avg:.3f}", tok_s=f"{tps:.0f}", **({"mfu": f"{100 * mfu:.0f}%"} if mfu else {}))
                t_last, tok_last, ans_last, window_loss = now, state["tokens"], state["answer_tokens"], []
            bar.update(1)

            if eval_data and cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < total_steps:
                val = run_eval(step)
                bar.write(f"step {step}: validation loss {val:.4f}") if is_main else None
                if state["best_val"] is None or val < state["best_val"]:
                    state["best_val"], state["bad_evals"] = val, 0
                else:
                    state["bad_evals"] += 1
                    if cfg.train.early_stopping_patience and state["bad_evals"] >= cfg.train.early_stopping_patience:
                        stop_reason = f"early stopping (no improvement in {state['bad_evals']} evaluations)"
                        break
            if cfg.train.save_every and step % cfg.train.save_every == 0 and step < total_steps:
                save(step)
            if _stop_agreed(stop, accelerator) and step < total_steps:
                save(step)
                raise _stopped(stop, run, state, inside=False)
    except Exception as e:
        if is_oom(e):
            raise out_of_memory_error(cfg, state["step"] + 1, accelerator.device) from None
        raise
    finally:
        stop.armed = False
        bar.close()
    train_time = time.time() - t_start
    if compiled:
        compiled.off()  # evaluation and the health check's generation run eagerly

    # 7. final adapter, evaluation, summary ------------------------------------------------
    final_val = run_eval(state["step"]) if eval_data else None
    if final_val is not None and (state["best_val"] is None or final_val < state["best_val"]):
        state["best_val"] = final_val
    save(state["step"])
    if is_main:
        save_adapter_atomically(unwrapped.model, run.adapter)
    test = tokenized["test"]
    if test:
        say(f"evaluating the test split ({len(test)} rows) with the base model and the tuned adapter …")
    summary = {"steps": state["step"], "stop_reason": stop_reason, "train_time_s": round(train_time, 1),
               "tokens": state["tokens"], "answer_tokens": state["answer_tokens"],
               "tokens_per_s": round(state["tokens"] * accelerator.num_processes / max(train_time, 1e-9), 1),
               "val_loss": final_val, "skipped_steps": state["skipped_steps"], "peak_rss_mb": round(peak_rss_mb())}
    if test:
        tuned = evaluate_loss(unwrapped, test, tokenizer.pad_token_id, ev_bs, accelerator.autocast)
        with unwrapped.model.disable_adapter():
            base = evaluate_loss(unwrapped, test, tokenizer.pad_token_id, ev_bs, accelerator.autocast)
        summary.update(test_loss_base=base, test_loss_tuned=tuned, test_loss_change=(tuned - base) / base)
        log({"kind": "test", "step": state["step"], "base_loss": base, "tuned_loss": tuned})
    if is_main:
        run.update_info(summary=summary)
        metrics_file.close()
        if tb:
            tb.close()
        say(f"done: {state['step']} steps in {train_time:.0f} s ({summary['tokens_per_s']:.0f} tokens/s, "
            f"peak RSS {summary['peak_rss_mb']} MB), stopped by {stop_reason}")
        if final_val is not None:
            say(f"validation loss {final_val:.4f}")
        if test:
            say(f"test loss: base {summary['test_loss_base']:.4f} → tuned {summary['test_loss_tuned']:.4f} "
                f"({100 * summary['test_loss_change']:+.1f}%)")
        from .report import ascii_chart, loss_series, read_metrics

        for line in ascii_chart(loss_series(read_metrics(run.metrics))):
            say(line)
        if cfg.train.health_check and splits["validation"]:
            say(f"health check: answering {min(cfg.train.health_check, len(splits['validation']))} validation questions …")
            from .evaluate import health_check

            warnings = health_check(unwrapped.model, tokenizer, cfg, splits["validation"][:cfg.train.health_check])
            run.update_info(health_warnings=warnings)
            for w in warnings:
                say(f"warning: {w}")
            if not warnings:
                say("health check: every answer ended with EOS, no loops")
        say(f"adapter: {run.adapter}")
    accelerator.wait_for_everyone()
    return run.path


def _global_tokens(tokens: int, accelerator) -> float:
    if accelerator.num_processes == 1:
        return float(tokens)
    import torch

    return float(accelerator.reduce(torch.tensor([float(tokens)], device=accelerator.device), "sum"))


def _stop_agreed(stop, accelerator) -> bool:
    """Every process must stop at the same step, or the others would wait in an all-reduce forever."""
    if accelerator.num_processes == 1:
        return stop.requested
    import torch

    flag = torch.tensor([1.0 if stop.requested else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def _stopped(stop, run: Run, state: dict, inside: bool):
    from .errors import Stopped

    where = f"step {state['step']}" + (f" + {state['window_pos']} micro-batches" if inside else "")
    return Stopped(f"checkpoint saved at {where}; continue with: kolora train --resume {run.path}", stop.exit_code)


def _stream(loader, sampler, per_epoch: int, start_micro: int, accelerator):
    """Endless micro-batches across epochs, starting after `start_micro` consumed ones."""
    epoch, skip = divmod(start_micro, per_epoch)
    while True:
        # Accelerate's prepared loader calls set_epoch(<its own iteration count>) on our sampler
        # when iterated; tell it the real epoch, or a resumed run would replay epoch 0's order.
        # Skipped batches are drawn and dropped (collation is cheap) rather than using
        # skip_first_batches, whose new loader restarts that count at 0 too.
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        sampler.set_epoch(epoch)
        for i, batch in enumerate(loader):
            if i >= skip:
                yield batch
        epoch, skip = epoch + 1, 0
