"""`kolora train`: LoRA / QLoRA fine-tuning, one explicit loop built on Accelerate.

Reads top to bottom, one function per stage of a run:

    setup_run        config, run directory, precision, the Accelerator, the seed
    setup_data       split, tokenize, length check, length-grouped batches, the plan
    setup_model      model + LoRA, the answer-only loss, torch.compile, the resume fingerprints
    setup_optimizer  AdamW + cosine schedule, accelerate.prepare, resume from a checkpoint
    fit              the loop: accumulate, clip, step, log, evaluate, checkpoint
    finish           final adapter, base-vs-tuned test loss, summary, health check

The same command runs under `accelerate launch` (DDP/FSDP/DeepSpeed); Accelerate owns the
processes, kolora owns the loop. What the pieces are made of lives below the stages:
`batching` (data → tensors), `loss` (the chunked head cross entropy), `device` (precision,
compile, heap trimming, FLOPs), `checkpoint` and `runs` (the run directory).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import __version__, grounding
from . import checkpoint as ckpt
from .batching import LengthGroupedBatches, Tokenized, collate, fact_token_share, tokenize_split
from .config import RunConfig, add_config_flags, apply_flags, build_config, save_yaml
from .data import SPLITS, category_table, load_splits, write_jsonl
from .device import (
    CompiledLayers,
    choose_precision,
    heap_trimmer,
    is_oom,
    matmul_peak_gflops,
    peak_rss_mb,
    resolve_attention,
    resolve_compile,
    train_flops,
)
from .errors import KoloraError, Stopped
from .estimator import plan_lines
from .generation import health_check
from .grounding import corpus_paths
from .interrupts import Faults, StopRequest
from .loss import EVAL_BATCH_MIN, answer_loss_module, evaluate_loss
from .models import ModelSource, attach_lora, cpu_lora_dropout, load_model, load_tokenizer, resolve
from .prompt import IGNORE
from .report import ascii_chart, loss_series, read_metrics
from .retrieval import recall_ks
from .runs import Run, claim_output_dir, default_output_dir, open_run, remove_entries, truncate_metrics

HELP = "fine-tune a LoRA adapter"


# --------------------------------------------------------------------------- the verb
def add_arguments(p) -> None:
    p.description = "Fine-tune a LoRA/QLoRA adapter."
    add_config_flags(p)
    p.add_argument("--resume", metavar="RUN", help="continue the run in RUN from its newest checkpoint")
    p.add_argument("--dry-run", action="store_true", help="check config and data, print the plan, train nothing")
    p.add_argument("--force", action="store_true", help="replace an existing run in the output directory")


def run(args) -> int:
    if args.resume:
        run_dir = open_run(args.resume, need_adapter=False)
        # only the length of the run may change on resume
        train(apply_flags(run_dir.config(), args, ("train.max_steps", "train.epochs")), resume=args.resume)
    else:
        train(build_config(args), dry_run=args.dry_run, force=args.force)
    return 0


def train(cfg: RunConfig, resume: str | None = None, dry_run: bool = False, force: bool = False) -> Path | None:
    with StopRequest() as stop:
        t = setup_run(cfg, resume, dry_run, force, stop)
        setup_data(t)
        if dry_run:
            for line in plan_lines(cfg, t.src, t.tokenized["train"], t.total_steps, t.precision.mixed):
                t.say(line)
            return None
        write_run_directory(t)
        setup_model(t)
        setup_optimizer(t)
        open_logs(t)
        fit(t)
        return finish(t)


@dataclass
class Trainer:
    """What the stages of one run share. Each setup_* function fills its part, in order."""

    cfg: RunConfig
    run: Run
    resume: str | None
    accelerator: object
    precision: object  # device.Precision
    stop: object  # interrupts.StopRequest
    faults: Faults
    is_main: bool
    use_cuda: bool
    # setup_data
    splits: dict = field(default_factory=dict)
    data_report: list = field(default_factory=list)
    src: ModelSource | None = None
    tokenizer: object = None
    tokenized: dict[str, list[Tokenized]] = field(default_factory=dict)
    n_dropped: int = 0
    sampler: LengthGroupedBatches | None = None
    loader: object = None
    total_steps: int = 0
    train_tokens: int = 0
    # setup_model
    model: object = None  # the peft model
    loss_model: object = None  # wraps it: forward returns the answer loss
    unwrapped: object = None  # loss_model without accelerate's wrappers
    compiled: CompiledLayers | None = None
    compile_why: str = ""
    attention_why: str = ""
    targets: list = field(default_factory=list)
    quantized: int = 0
    n_train: int = 0
    n_all: int = 0
    peak: float | None = None  # measured matmul FLOP/s, for MFU
    mean_len: float = 0.0
    fingerprints: dict = field(default_factory=dict)
    # setup_optimizer
    optimizer: object = None
    scheduler: object = None
    params: list = field(default_factory=list)
    named_params: list = field(default_factory=list)
    state: dict = field(default_factory=dict)
    partial_grads: dict | None = None
    # open_logs / fit
    metrics_file: object = None
    tb: object = None
    stop_reason: str = "max steps"
    train_time: float = 0.0
    plain: dict = field(default_factory=dict)  # the splits before retrieval added context
    grounding: object = None  # grounding.Grounding when retrieval.corpus is set
    retrieval_recall: dict | None = None

    def say(self, *a) -> None:
        if self.is_main:
            print(*a, flush=True)

    def log(self, event: dict) -> None:
        if not self.is_main:
            return
        self.metrics_file.write(json.dumps(event) + "\n")
        self.metrics_file.flush()
        if self.tb:
            for k, v in event.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.tb.add_scalar(f"{event['kind']}/{k}", v, event["step"])

    def save(self, step: int, grads: dict | None = None) -> None:
        from accelerate.utils import gather_object

        acc, state = self.accelerator, self.state
        rngs = [ckpt.rng_state()] if acc.num_processes == 1 else gather_object([ckpt.rng_state()])
        if self.is_main:
            name = f"step-{step:06d}"
            last = state["last_eval"]
            if last and last[0] == step and last[1] == state["best_val"]:
                state["best_checkpoint"] = name  # kept by pruning even when it is not among the newest
            ckpt.save(self.run.checkpoints, step, adapter_model=self.unwrapped.model, optimizer=self.optimizer,
                      scheduler=self.scheduler, state=state, fingerprints=self.fingerprints, rng_by_rank=rngs,
                      grads=grads, fault=self.faults or None, scaler=getattr(acc, "scaler", None))
            ckpt.prune(self.run.checkpoints, self.cfg.train.keep_checkpoints, {state["best_checkpoint"]} - {None})
        acc.wait_for_everyone()

    def held_out_loss(self, split: str) -> float:
        bs = max(self.cfg.train.batch_size, EVAL_BATCH_MIN)
        return evaluate_loss(self.unwrapped, self.tokenized[split], self.tokenizer.pad_token_id, bs,
                             self.accelerator.autocast)

    def run_eval(self, step: int) -> float:
        with self.compiled.eager() if self.compiled else contextlib.nullcontext():
            val = self.held_out_loss("validation")
        self.log({"kind": "eval", "step": step, "val_loss": val})
        self.state["last_eval"] = [step, val]
        return val


# --------------------------------------------------------------------------- 1. config and run directory
def absolute(value: str) -> str:
    """Later commands may run elsewhere: local paths become absolute; hub names stay as they are."""
    return str(Path(value).expanduser().resolve()) if Path(value).expanduser().exists() else value


def setup_run(cfg: RunConfig, resume: str | None, dry_run: bool, force: bool, stop) -> Trainer:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    faults = Faults()
    cfg.model.name, cfg.data.path = absolute(cfg.model.name), absolute(cfg.data.path)
    cfg.data.train_only = [absolute(v) for v in cfg.data.train_only or []]
    cfg.retrieval.corpus = [absolute(v) for v in corpus_paths(cfg)]
    cfg.retrieval.expand_with = [absolute(v) for v in cfg.retrieval.expand_with or []]
    run = Run(Path(resume or cfg.train.output_dir or default_output_dir(cfg.model.name)))
    if not resume and not dry_run:  # --force replaces only a kolora run (run.json), never other files
        remove_entries(claim_output_dir(run.path, "run", force))
    use_cuda = torch.cuda.is_available()
    precision = choose_precision(cfg.train.mixed_precision, cfg.model.dtype, cuda=use_cuda)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    accelerator = Accelerator(mixed_precision=precision.mixed, cpu=not use_cuda)
    refuse_deepspeed_accumulation(cfg, accelerator)
    set_seed(cfg.train.seed)
    if not cfg.train.fact_weight > 0:
        raise KoloraError(f"train.fact_weight must be positive (got {cfg.train.fact_weight})",
                          "1 trains with the plain loss; 2-4 weights the facts' tokens more")
    return Trainer(cfg, run, resume, accelerator, precision, stop, faults, accelerator.is_main_process, use_cuda)


def refuse_deepspeed_accumulation(cfg: RunConfig, accelerator) -> None:
    """Under DeepSpeed, accelerate steps the engine on every micro-batch (its optimizer.step is a
    no-op): kolora's accumulation window and its NaN/inf skip would silently not happen."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED and cfg.train.grad_accum > 1:
        raise KoloraError(f"train.grad_accum {cfg.train.grad_accum} does not work under DeepSpeed: its engine steps "
                          "on every micro-batch, so kolora's gradient accumulation (and its NaN skip) would not apply",
                          "set gradient_accumulation_steps in the DeepSpeed JSON and --train.grad_accum 1, "
                          "or launch with DDP (accelerate launch --multi_gpu)")


# --------------------------------------------------------------------------- 2. data
def setup_data(t: Trainer) -> None:
    import torch

    cfg = t.cfg
    t.splits, t.data_report = load_splits(cfg)  # before the model: a data mistake fails in a second
    for line in t.data_report:
        t.say(line)
    t.src = resolve(cfg.model.name)
    t.tokenizer = load_tokenizer(t.src, cfg.model.trust_remote_code)
    t.plain = {name: list(rows) for name, rows in t.splits.items()}  # what data/*.jsonl keeps: no context
    if corpus_paths(cfg):
        ground_splits(t)
    dropped = {}
    for name in SPLITS:
        weight = cfg.train.fact_weight if name == "train" else 1.0
        t.tokenized[name], t.splits[name], dropped[name] = tokenize_split(t.tokenizer, t.splits[name], cfg, weight)
    t.n_dropped = sum(len(v) for v in dropped.values())
    if t.n_dropped:
        t.say(f"dropped {t.n_dropped} rows longer than data.max_length={cfg.data.max_length} tokens "
              f"(lines {', '.join(str(x) for v in dropped.values() for x in v[:10])}); raise data.max_length to keep them")
    if not t.tokenized["train"]:
        raise KoloraError("no training rows left after the length check", f"raise data.max_length (now {cfg.data.max_length})")
    for line in category_table(t.splits):
        t.say("  " + line)

    train_data = t.tokenized["train"]
    if cfg.train.fact_weight != 1:
        weighted, answer_tokens = fact_token_share(train_data)
        t.say(f"train.fact_weight {cfg.train.fact_weight:g}: {weighted:,} of {answer_tokens:,} answer tokens "
              f"({100 * weighted / max(answer_tokens, 1):.1f}%) state a fact (statute reference, period, amount, …)")
    t.sampler = LengthGroupedBatches([len(x.input_ids) for x in train_data], cfg.train.batch_size, cfg.train.seed)
    # Its own generator: creating an iterator must not draw from the global RNG (dropout's),
    # or a resumed run would see different dropout masks than the uninterrupted one.
    pad_id = t.tokenizer.pad_token_id
    t.loader = torch.utils.data.DataLoader(train_data, batch_sampler=t.sampler, generator=torch.Generator().manual_seed(0),
                                           collate_fn=lambda b: collate(b, pad_id))
    processes = t.accelerator.num_processes
    local_batches = math.ceil(len(t.sampler) / processes)
    steps_per_epoch = math.ceil(local_batches / cfg.train.grad_accum)
    t.total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    t.train_tokens = sum(len(x.input_ids) for x in train_data)
    t.say(f"plan: {len(train_data)} train rows, {t.train_tokens:,} tokens/epoch, {t.total_steps} optimizer steps "
          f"(batch {cfg.train.batch_size} × accum {cfg.train.grad_accum} × {processes} process(es)), "
          f"precision {t.precision.mixed}, device {t.accelerator.device}")


def ground_splits(t: Trainer) -> None:
    """Retrieved passages before every question (retrieval.corpus): the index learns from the
    training questions only; held-out rows are retrieved for exactly as chat and eval will."""
    cfg = t.cfg
    t.grounding, counts = grounding.ground_splits(cfg, t.splits, t.tokenizer)
    for line in t.grounding.corpus.report + t.grounding.index.report:
        t.say(line)
    r = cfg.retrieval
    t.say(f"retrieval: {len(t.grounding.corpus)} passages, top {r.k} within {r.context_tokens} tokens "
          f"({r.tokenizer}); training rows citing an article: {counts['citing']} of {counts['rows']}, "
          f"retrieved {counts['retrieved']}, oracle inserted {counts['inserted']} (oracle_p {r.oracle_p:g}), "
          f"missed {counts['missed']}")
    held_out = t.plain["validation"] + t.plain["test"]
    if held_out:
        rec = t.grounding.recall(held_out)
        if rec["questions"]:
            t.say(f"retrieval on validation+test ({rec['questions']} questions citing an article): "
                  + ", ".join(f"recall@{k} {rec[f'recall@{k}']:.2f}" for k in recall_ks(rec)))
            t.retrieval_recall = rec


def write_run_directory(t: Trainer) -> None:
    """The run directory describes itself before the model loads: a run killed at any moment
    from here on can be resumed with `--resume`."""
    if t.is_main and not t.resume:
        (t.run.path / "data").mkdir(parents=True, exist_ok=True)
        t.run.update_info(kolora_version=__version__)  # run.json first: it marks the folder as a run
        save_yaml(t.cfg, t.run.config_file, f"# kolora train --config {t.run.config_file}\n")
        for name in SPLITS:  # without context: chat and eval retrieve again from the saved index
            write_jsonl([replace(ex, context=None) for ex in t.splits[name]], t.run.split(name))
        t.tokenizer.save_pretrained(t.run.tokenizer)
        if t.grounding:
            t.grounding.save(t.run.path)


# --------------------------------------------------------------------------- 3. model + LoRA
def setup_model(t: Trainer) -> None:
    cfg, dtype = t.cfg, t.precision.weights
    model = load_model(t.src, dtype, cfg.model.quantization, cfg.model.trust_remote_code,
                       device=t.accelerator.device if cfg.model.quantization != "none" else None)
    if cfg.model.quantization != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
    elif cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    t.quantized = sum(1 for m in model.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt"))
    model, t.targets = attach_lora(model, cfg)
    if not t.use_cuda:  # nn.Dropout draws one random number per element: a quarter of a CPU step
        cpu_lora_dropout(model)
    t.model = model
    t.n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    t.n_all = sum(p.numel() for p in model.parameters())
    t.say(f"model {cfg.model.name} ({t.src.kind}), base {dtype}, LoRA r={cfg.lora.r} on {','.join(t.targets)}: "
          f"{t.n_train / 1e6:.2f} M trainable ({100 * t.n_train / t.n_all:.2f}%)")
    do_compile, t.compile_why = resolve_compile(cfg, t.use_cuda, t.n_all)
    attention, t.attention_why = resolve_attention(cfg)
    if attention and attention != getattr(model.config, "_attn_implementation", None):
        model.set_attn_implementation(attention)  # before compiling: the graphs bake it in
    t.say(f"attention: {t.attention_why}")
    t.compiled = CompiledLayers(model) if do_compile else None
    if t.compiled and not t.compiled.layers:
        t.compiled, t.compile_why = None, "off (no decoder layers found)"
    # the output layer's cross entropy is compiled with the layers (a fused CE + gradient per chunk)
    t.loss_model = answer_loss_module(model, fused_head=t.compiled is not None)
    t.say(f"torch.compile of the decoder layers: {t.compile_why}")
    # MFU = achieved FLOP/s ÷ a matmul peak measured here, now, in the compute dtype.
    t.peak = None if t.use_cuda else matmul_peak_gflops(t.precision.mixed) * 1e9
    train_data = t.tokenized["train"]
    t.mean_len = t.train_tokens / len(train_data)
    # What a resume must match; stored in every checkpoint's manifest.
    t.fingerprints = {"model": ckpt.model_fingerprint(t.src.path), "model_name": cfg.model.name,
                      "lora": ckpt.lora_shape(cfg, t.targets), "data": ckpt.data_fingerprint(train_data),
                      "data_path": ", ".join([cfg.data.path] + list(cfg.data.train_only or [])),
                      "train_rows": len(train_data),
                      "batching": [cfg.train.batch_size, cfg.train.grad_accum, t.accelerator.num_processes],
                      "seed": cfg.train.seed}
    if cfg.train.fact_weight != 1:  # only when set, so checkpoints from before the key still resume
        t.fingerprints["fact_weight"] = cfg.train.fact_weight
    if t.grounding:  # the prompts depend on the corpus and the retrieval settings
        t.fingerprints["retrieval"] = {"corpus": t.grounding.corpus.fingerprint(), "k": cfg.retrieval.k,
                                       "context_tokens": cfg.retrieval.context_tokens, "oracle_p": cfg.retrieval.oracle_p,
                                       "tokenizer": cfg.retrieval.tokenizer, "expand": cfg.retrieval.expand,
                                       "expand_with": len(t.grounding.extra)}


# --------------------------------------------------------------------------- 4. optimizer, schedule, resume
def setup_optimizer(t: Trainer) -> None:
    import torch
    from transformers import get_cosine_schedule_with_warmup

    cfg = t.cfg
    t.params = [p for p in t.loss_model.parameters() if p.requires_grad]
    t.named_params = [(n, p) for n, p in t.loss_model.model.named_parameters() if p.requires_grad]
    try:
        optimizer = torch.optim.AdamW(t.params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=True)
    except (RuntimeError, TypeError):
        optimizer = torch.optim.AdamW(t.params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, foreach=True)
    t.scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.train.warmup_ratio * t.total_steps), t.total_steps)
    t.loss_model, t.optimizer, t.loader = t.accelerator.prepare(t.loss_model, optimizer, t.loader)
    t.unwrapped = t.accelerator.unwrap_model(t.loss_model)

    t.state = {"step": 0, "micro_step": 0, "window_pos": 0, "window_loss": 0.0, "best_val": None,
               "best_checkpoint": None, "last_eval": None, "bad_evals": 0, "tokens": 0, "answer_tokens": 0,
               "skipped_steps": 0}
    if t.resume:
        resume_from_checkpoint(t)


def resume_from_checkpoint(t: Trainer) -> None:
    latest, unusable = ckpt.find_latest(t.run.checkpoints)
    for name, why in unusable:
        t.say(f"skipping checkpoint {name}: {why}")
    if latest is None:
        t.say(f"no complete checkpoint in {t.run.path}: starting the run again from step 0")
        if t.is_main:
            truncate_metrics(t.run.metrics, -1)
        return
    ckpt.compare_fingerprints(ckpt.read_manifest(latest)["fingerprints"], t.fingerprints, latest, t.src.path)
    loaded, t.partial_grads = ckpt.load(latest, peft_model=t.unwrapped.model, optimizer=t.optimizer,
                                        scheduler=t.scheduler, rank=t.accelerator.process_index,
                                        scaler=getattr(t.accelerator, "scaler", None))
    t.state.update(loaded)
    dropped_events = truncate_metrics(t.run.metrics, t.state["step"]) if t.is_main else 0
    inside = (f", {t.state['window_pos']} of {t.cfg.train.grad_accum} micro-batches into the next step"
              if t.state["window_pos"] else "")
    t.say(f"resumed from {latest.name}: step {t.state['step']}{inside}"
          + (f" ({dropped_events} metrics lines after it dropped)" if dropped_events else ""))


def open_logs(t: Trainer) -> None:
    cfg = t.cfg
    if t.is_main:
        t.run.update_info(kolora_version=__version__, model=cfg.model.name, model_source=t.src.kind,
                          model_path=t.src.path, base_dtype=t.precision.weights, precision=t.precision.mixed,
                          lora_targets=t.targets, trainable_params=t.n_train, total_params=t.n_all,
                          processes=t.accelerator.num_processes, quantization=cfg.model.quantization,
                          quantized_modules=t.quantized, compile=t.compile_why, attention=t.attention_why, data_report=t.data_report,
                          dropped_too_long=t.n_dropped, fingerprints=t.fingerprints,
                          retrieval_recall=t.retrieval_recall)
    t.accelerator.wait_for_everyone()
    t.metrics_file = open(t.run.metrics, "a", encoding="utf-8") if t.is_main else None
    if t.is_main and cfg.train.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        t.tb = SummaryWriter(str(t.run.path / "tensorboard"), purge_step=t.state["step"] + 1 if t.resume else None)


# --------------------------------------------------------------------------- 5. the loop
def fit(t: Trainer) -> None:
    cfg, state, acc = t.cfg, t.state, t.accelerator
    has_eval = bool(t.tokenized["validation"])
    # Step 0's validation loss is the base model's (LoRA B starts at 0): the baseline the periodic
    # evaluations compare with. Without them (eval_every 0) the test split's base loss says the same.
    if state["step"] == 0 and state["window_pos"] == 0 and has_eval and cfg.train.eval_every:
        state["best_val"] = t.run_eval(0)
        t.say(f"step 0 validation loss {state['best_val']:.4f} (= base model)")
    from tqdm.auto import tqdm

    bar = tqdm(total=t.total_steps, initial=state["step"], disable=not t.is_main, desc="train", unit="step",
               dynamic_ncols=True)
    t.loss_model.train()
    micro_batches = len(t.loader)  # per process, per epoch
    batches = _stream(t.loader, t.sampler, micro_batches, state["micro_step"], acc)
    if t.partial_grads is not None:  # resumed inside an accumulation window: its gradients so far
        for n, p in t.named_params:
            p.grad = t.partial_grads[n].to(p.device, p.dtype)
    trim_heap = heap_trimmer() if acc.device.type == "cpu" else (lambda: None)
    meter = _Meter(time.time(), state["tokens"], state["answer_tokens"])
    t_start = time.time()
    t.stop.armed = True
    try:
        while state["step"] < t.total_steps:
            # A whole window is fetched first: its answer-token count weights every micro-batch.
            window = [next(batches) for _ in range(cfg.train.grad_accum)]
            step_loss = accumulate(t, window)
            grad_norm, finite = apply_update(t, step_loss, bar)
            trim_heap()
            state["step"] += 1
            if finite:
                meter.losses.append(step_loss)
            step = state["step"]
            t.faults("step", step)
            if (step % cfg.train.log_every == 0 or step == t.total_steps) and meter.losses:
                log_progress(t, meter, grad_norm, micro_batches, t_start, bar)
            bar.update(1)

            if has_eval and cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < t.total_steps:
                if not evaluate_and_decide(t, step, bar):
                    break
                if state["bad_evals"] == 0 and not (cfg.train.save_every and step % cfg.train.save_every == 0):
                    t.save(step)  # a new best: its checkpoint is what adapter/ gets if later ones are worse
            if cfg.train.save_every and step % cfg.train.save_every == 0 and step < t.total_steps:
                t.save(step)
            if _stop_agreed(t.stop, acc) and step < t.total_steps:
                t.save(step)
                raise _stopped(t.stop, t.run, state, inside=False)
    except Exception as e:
        if is_oom(e):
            raise out_of_memory_error(cfg, state["step"] + 1, acc.device) from None
        raise
    finally:
        t.stop.armed = False
        bar.close()
    t.train_time = time.time() - t_start
    if t.compiled:
        t.compiled.off()  # evaluation and the health check's generation run eagerly


def accumulate(t: Trainer, window: list[dict]) -> float:
    """Forward and backward over one accumulation window; returns the window's logged loss."""
    import torch

    state, acc = t.state, t.accelerator
    window_tokens = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in window)
    # DDP averages gradients over processes; dividing by the global token count × P
    # makes that average the token-weighted mean over the whole global window, so N
    # processes compute the same update as one process with the same global batch.
    norm_tokens = _global_tokens(window_tokens, acc) / acc.num_processes
    step_loss, start = state["window_loss"], state["window_pos"]
    state["window_loss"], state["window_pos"] = 0.0, 0
    for i in range(start, len(window)):
        batch = window[i]
        sync = i == len(window) - 1
        ctx = acc.no_sync(t.loss_model) if not sync else contextlib.nullcontext()
        with ctx, acc.autocast():
            out = t.loss_model(**batch)
            loss = out[0] / max(norm_tokens, 1)  # token-weighted mean over the whole window
            # with train.fact_weight the update follows the weighted loss; the plain one is logged
            shown = out[2] / max(norm_tokens, 1) if len(out) > 2 else loss
            if t.faults.hit("nan-at-step", state["step"] + 1):
                loss, shown = loss * float("nan"), shown * float("nan")
            if t.faults.hit("oom-at-step", state["step"] + 1):
                raise torch.OutOfMemoryError("CUDA out of memory (injected by KOLORA_FAULTS)")
        acc.backward(loss)
        step_loss += float(shown.detach())
        state["tokens"] += int(batch["attention_mask"].sum())
        t.faults("micro", state["micro_step"] + i + 1)
        if t.stop.requested and not sync and acc.num_processes == 1:
            # Stop inside the window: keep the gradients accumulated so far, so the
            # resumed run finishes this very step exactly as it would have.
            state["window_pos"], state["window_loss"] = i + 1, step_loss
            t.save(state["step"], {n: p.grad for n, p in t.named_params if p.grad is not None})
            raise _stopped(t.stop, t.run, state, inside=True)
    state["answer_tokens"] += window_tokens
    if acc.num_processes > 1:  # the logged loss is the global window's mean
        step_loss = float(acc.reduce(torch.tensor([step_loss], device=acc.device), "mean"))
    state["micro_step"] += len(window)
    return step_loss


def apply_update(t: Trainer, step_loss: float, bar) -> tuple[float | None, bool]:
    """Clip, then step the optimizer, unless the loss or the gradient norm is not finite:
    then the update is skipped (the schedule and data still move on), up to
    train.max_nonfinite_steps times. Returns (gradient norm, finite)."""
    grad_norm = gradient_norm(t)
    scaler = getattr(t.accelerator, "scaler", None)
    overflow = False
    if scaler is not None:
        # fp16: the grad scaler decides. Its step skips an update with inf/NaN gradients and
        # its update() lowers the scale; both must run every step, or the next unscale_()
        # fails ("already been called") and the scale never adapts.
        t.optimizer.step()
        skipped = bool(getattr(t.optimizer, "step_was_skipped", False))
        finite = math.isfinite(step_loss) and not skipped
        overflow = skipped and math.isfinite(step_loss)  # the scaler's business: it retries at a lower scale
    else:
        finite = math.isfinite(step_loss) and (grad_norm is None or math.isfinite(grad_norm))
        if finite:
            t.optimizer.step()
    if not finite:
        skip_step(t, step_loss, grad_norm, bar, scaler.get_scale() if overflow else None)
    t.scheduler.step()
    t.optimizer.zero_grad(set_to_none=True)
    return grad_norm, finite


def gradient_norm(t: Trainer) -> float | None:
    """The global gradient norm, clipped to train.max_grad_norm; with 0 (no clipping) it is still
    measured, so a NaN/inf gradient is caught either way. Through accelerate, so fp16 gradients
    are unscaled first and FSDP's shards count on every process."""
    max_norm = t.cfg.train.max_grad_norm if t.cfg.train.max_grad_norm > 0 else float("inf")  # inf: scales by 1
    norm = t.accelerator.clip_grad_norm_(t.params, max_norm)
    return None if norm is None else float(norm)  # DeepSpeed clips inside its engine


def skip_step(t: Trainer, step_loss: float, grad_norm, bar, fp16_scale: float | None) -> None:
    """Count and report a step without an update. An fp16 overflow (finite loss, the scaler
    lowered its scale) is routine while the scale settles: counted, never fatal."""
    cfg, state = t.cfg, t.state
    state["skipped_steps"] += 1
    step = state["step"] + 1
    if fp16_scale is not None:
        state["fp16_overflows"] = state.get("fp16_overflows", 0) + 1  # .get: checkpoints from before the key
        t.log({"kind": "skip", "step": step, "loss": step_loss, "grad_norm": grad_norm, "fp16_overflow": True,
               "loss_scale": fp16_scale})
        if t.is_main:
            bar.write(f"step {step}: fp16 gradient overflow: step skipped, loss scale lowered to {fp16_scale:g}")
        return
    t.log({"kind": "skip", "step": step, "loss": step_loss, "grad_norm": grad_norm})
    nonfinite = state["skipped_steps"] - state.get("fp16_overflows", 0)
    if nonfinite > cfg.train.max_nonfinite_steps:
        raise KoloraError(
            f"loss {step_loss} / gradient norm {grad_norm} is not finite at step {step} "
            f"({nonfinite} non-finite steps, train.max_nonfinite_steps={cfg.train.max_nonfinite_steps})",
            "lower train.lr, or use --train.mixed_precision no; the last checkpoint is intact "
            f"(nothing after it was saved): resume with kolora train --resume {t.run.path}")
    if t.is_main:
        bar.write(f"step {step}: loss {step_loss} / gradient norm {grad_norm} not finite: "
                  f"step skipped ({nonfinite} of {cfg.train.max_nonfinite_steps} allowed)")


@dataclass
class _Meter:
    """Tokens and losses since the last progress line."""

    time: float
    tokens: int
    answers: int
    losses: list = field(default_factory=list)


def log_progress(t: Trainer, meter: _Meter, grad_norm, micro_batches: int, t_start: float, bar) -> None:
    state, procs = t.state, t.accelerator.num_processes
    now = time.time()
    tokens, answers = state["tokens"] - meter.tokens, state["answer_tokens"] - meter.answers
    dt = max(now - meter.time, 1e-9)
    tps = tokens * procs / dt
    mfu = train_flops(t.unwrapped.model, tokens, answers, t.mean_len, t.n_train,
                     0 if t.cfg.train.gradient_checkpointing else t.cfg.lora.layers) / dt / t.peak if t.peak else None
    loss_avg = sum(meter.losses) / len(meter.losses)
    t.log({"kind": "train", "step": state["step"], "epoch": state["micro_step"] / micro_batches, "loss": loss_avg,
           "lr": t.scheduler.get_last_lr()[0], "grad_norm": grad_norm, "tokens_per_s": tps,
           "answer_tokens_per_s": answers * procs / dt,
           "mfu": mfu, "elapsed_s": now - t_start, "peak_rss_mb": peak_rss_mb()})
    bar.set_postfix(loss=f"{loss_avg:.3f}", tok_s=f"{tps:.0f}", **({"mfu": f"{100 * mfu:.0f}%"} if mfu else {}))
    meter.time, meter.tokens, meter.answers, meter.losses = now, state["tokens"], state["answer_tokens"], []


def evaluate_and_decide(t: Trainer, step: int, bar) -> bool:
    """Validation loss at an eval step; False when early stopping ends the run."""
    state, patience = t.state, t.cfg.train.early_stopping_patience
    val = t.run_eval(step)
    if t.is_main:
        bar.write(f"step {step}: validation loss {val:.4f}")
    if state["best_val"] is None or val < state["best_val"]:
        state["best_val"], state["bad_evals"] = val, 0
        return True
    state["bad_evals"] += 1
    if patience and state["bad_evals"] >= patience:
        t.stop_reason = f"early stopping (no improvement in {state['bad_evals']} evaluations)"
        return False
    return True


# --------------------------------------------------------------------------- 6. final adapter, evaluation, summary
def finish(t: Trainer) -> Path:
    state, acc = t.state, t.accelerator
    has_eval = bool(t.tokenized["validation"])
    final_val = t.run_eval(state["step"]) if has_eval else None
    if final_val is not None and (state["best_val"] is None or final_val < state["best_val"]):
        state["best_val"] = final_val
    t.save(state["step"])  # the last weights: what a longer resumed run continues from
    best = restore_best_weights(t, final_val)
    if t.is_main:
        ckpt.save_adapter_atomically(t.unwrapped.model, t.run.adapter)
    test = t.tokenized["test"]
    if test:
        t.say(f"evaluating the test split ({len(test)} rows) with the base model and the tuned adapter …")
    summary = {"steps": state["step"], "stop_reason": t.stop_reason, "train_time_s": round(t.train_time, 1),
               "tokens": state["tokens"], "answer_tokens": state["answer_tokens"],
               "tokens_per_s": round(state["tokens"] * acc.num_processes / max(t.train_time, 1e-9), 1),
               "val_loss": final_val, "skipped_steps": state["skipped_steps"], "peak_rss_mb": round(peak_rss_mb())}
    if t.use_cuda:  # what a user with an 8 GB card needs to know; taken before the test-split passes add theirs
        import torch

        summary["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    if best:  # val_loss is the saved adapter's, as the test loss below is
        summary["adapter_from"], summary["val_loss"] = best, best["val_loss"]
    if test:
        tuned = t.held_out_loss("test")
        with t.unwrapped.model.disable_adapter():
            base = t.held_out_loss("test")
        summary.update(test_loss_base=base, test_loss_tuned=tuned, test_loss_change=(tuned - base) / base)
        t.log({"kind": "test", "step": state["step"], "base_loss": base, "tuned_loss": tuned})
    if t.is_main:
        report_summary(t, summary, summary["val_loss"])
    acc.wait_for_everyone()
    return t.run.path


def restore_best_weights(t: Trainer, final_val: float | None) -> dict | None:
    """When the last validation loss is worse than the best (early stopping, or overfitting by
    the end), the model gets the best checkpoint's adapter back: adapter/, the test loss and the
    health check are then all the best weights'. Every process loads it (all compute the test
    loss). Returns what adapter/ holds instead of the last weights, for run.json."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state, name = t.state, t.state["best_checkpoint"]
    if final_val is None or state["best_val"] is None or not final_val > state["best_val"]:
        return None
    if name is None or not (t.run.checkpoints / name).is_dir():
        t.say(f"validation loss {final_val:.4f} is worse than the best ({state['best_val']:.4f}), whose weights were "
              "not kept (the base model's at step 0, or a checkpoint deleted): adapter/ holds the last weights")
        return None
    set_peft_model_state_dict(t.unwrapped.model, load_file(t.run.checkpoints / name / "adapter" / "adapter_model.safetensors"))
    step = int(name.split("-")[1])
    t.say(f"adapter/ holds the best validation loss (step {step}, {state['best_val']:.4f}; the last step's "
          f"{final_val:.4f}), from checkpoints/{name}")
    return {"checkpoint": name, "step": step, "val_loss": state["best_val"], "last_val_loss": final_val}


def report_summary(t: Trainer, summary: dict, final_val: float | None) -> None:
    t.run.update_info(summary=summary)
    t.metrics_file.close()
    if t.tb:
        t.tb.close()
    gpu = f", peak GPU memory {summary['peak_gpu_mb']} MB" if "peak_gpu_mb" in summary else ""
    t.say(f"done: {t.state['step']} steps in {t.train_time:.0f} s ({summary['tokens_per_s']:.0f} tokens/s, "
          f"peak RSS {summary['peak_rss_mb']} MB{gpu}), stopped by {t.stop_reason}")
    if final_val is not None:
        t.say(f"validation loss {final_val:.4f}")
    if "test_loss_base" in summary:
        t.say(f"test loss: base {summary['test_loss_base']:.4f} → tuned {summary['test_loss_tuned']:.4f} "
              f"({100 * summary['test_loss_change']:+.1f}%)")
    for line in ascii_chart(loss_series(read_metrics(t.run.metrics))):
        t.say(line)
    validation = t.splits["validation"]
    if t.cfg.train.health_check and validation:
        n = min(t.cfg.train.health_check, len(validation))
        t.say(f"health check: answering {n} validation questions …")
        check = (lambda answer, question: t.grounding.check(answer, question, [])) if t.grounding else None
        warnings = health_check(t.unwrapped.model, t.tokenizer, t.cfg, validation[:t.cfg.train.health_check],
                                check=check)
        t.run.update_info(health_warnings=warnings)
        for w in warnings:
            t.say(f"warning: {w}")
        if not warnings:
            t.say("health check: every answer ended with EOS, no loops")
    t.say(f"adapter: {t.run.adapter}")


# --------------------------------------------------------------------------- helpers of the loop
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
