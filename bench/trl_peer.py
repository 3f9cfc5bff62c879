"""The peer: TRL `SFTTrainer` + peft LoRA on the rows and micro-batches kolora trained on.

    python bench/trl_peer.py --kolora-run RUN --out DIR --steps N

TRL's documented CPU configuration: `use_cpu=True`, `bf16=True` where the CPU has bf16
(autocast over the float32 weights TRL loads by default), completion-only loss on a
prompt/completion dataset. The dataset is given pre-tokenized (`input_ids` +
`completion_mask`, a format SFTTrainer documents) with kolora's own encoder, so both trainers
see identical token ids; the micro-batches are kolora's, in kolora's order, so the eval loss
after N steps differs only by the trainer, not by which rows it saw. Same LoRA shape and
targets, lr, cosine schedule with the same warm-up steps, AdamW (fused), weight decay,
clipping, seed, max_length, batch × accumulation and number of optimizer steps.

Writes DIR/adapter (PEFT) and DIR/timing.json (wall time at the end of every step, losses,
whether every collated micro-batch matched kolora's plan)."""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import load_plan, read_json  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kolora-run", required=True, help="run directory kolora wrote (config, split, run.json)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="TRL's own default; off by default here because kolora trains without it (faster)")
    ap.add_argument("--dtype", default="float32", help="base weights dtype (TRL loads float32 unless told otherwise)")
    ap.add_argument("--quantization", default="none", choices=["none", "4bit", "8bit"],
                    help="QLoRA base through bitsandbytes, with kolora's own BitsAndBytesConfig (GPU)")
    args = ap.parse_args()

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from torch.utils.data import DataLoader
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from kolora.models import bnb_config, resolve
    from kolora.prompt import IGNORE

    t_begin = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run_info = read_json(Path(args.kolora_run) / "run.json")
    plan, cfg, tokenizer = load_plan(Path(args.kolora_run), args.steps)
    dataset = Dataset.from_list([
        {"input_ids": r.input_ids, "completion_mask": [int(x != IGNORE) for x in r.labels]} for r in plan.rows])

    seen: list[tuple[list[int], int, int]] = []  # per collated micro-batch: row lengths, tokens, answer tokens

    def counting(collate):
        def wrapped(examples):
            batch = collate(examples)
            seen.append(([len(e["input_ids"]) for e in examples], int(batch["attention_mask"].sum()),
                         int((batch["labels"][:, 1:] != IGNORE).sum())))
            return batch
        return wrapped

    class PlannedSFTTrainer(SFTTrainer):
        """SFTTrainer fed kolora's micro-batches in kolora's order (nothing else changes)."""

        def get_train_dataloader(self):
            data = self._remove_unused_columns(self.train_dataset, description="Training")
            loader = DataLoader(data, batch_sampler=plan.batches, collate_fn=counting(self.data_collator),
                                num_workers=self.args.dataloader_num_workers)
            return self.accelerator.prepare(loader)

    step_end: dict[int, float] = {}

    class StepClock(TrainerCallback):
        def on_train_begin(self, args_, state, control, **kw):
            step_end[0] = time.perf_counter()

        def on_step_end(self, args_, state, control, **kw):
            step_end[state.global_step] = time.perf_counter()

    precision = run_info.get("precision", "no")
    cuda = torch.cuda.is_available()  # TRL takes the GPU where there is one, as kolora does (bench/gpu_check.sh)
    init = {"dtype": args.dtype}
    if args.quantization != "none":
        init["quantization_config"] = bnb_config(args.quantization, torch.bfloat16 if precision == "bf16" else torch.float16)
    sft = SFTConfig(
        output_dir=str(out / "trainer"), use_cpu=not cuda, bf16=precision == "bf16", fp16=False,
        max_length=cfg.data.max_length, completion_only_loss=True,
        per_device_train_batch_size=cfg.train.batch_size, gradient_accumulation_steps=cfg.train.grad_accum,
        max_steps=args.steps, learning_rate=cfg.train.lr, lr_scheduler_type="cosine",
        warmup_steps=int(cfg.train.warmup_ratio * args.steps), weight_decay=cfg.train.weight_decay,
        max_grad_norm=cfg.train.max_grad_norm, optim="adamw_torch_fused", seed=cfg.train.seed,
        gradient_checkpointing=args.gradient_checkpointing, logging_steps=1, save_strategy="no",
        eval_strategy="no", report_to="none", dataloader_num_workers=0, disable_tqdm=True,
        model_init_kwargs=init,
    )
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=run_info["lora_targets"], use_rslora=cfg.lora.use_rslora,
                      use_dora=cfg.lora.use_dora, bias="none", task_type="CAUSAL_LM")
    trainer = PlannedSFTTrainer(model=resolve(cfg.model.name).path, args=sft, train_dataset=dataset,
                                processing_class=tokenizer, peft_config=lora, callbacks=[StepClock()])
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    t_train = time.time()
    trainer.train()
    train_s = time.time() - t_train
    trainer.model.save_pretrained(out / "adapter")

    t0 = step_end[0]
    expected = [([len(plan.rows[i].input_ids) for i in b],
                 sum(len(plan.rows[i].input_ids) for i in b), sum(plan.rows[i].answer_tokens for i in b))
                for b in plan.batches]
    timing = {
        "step_end_s": {str(k): v - t0 for k, v in sorted(step_end.items())},
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "batches_match_plan": seen[:len(expected)] == expected,
        "micro_batches_seen": len(seen),
        "train_s": round(train_s, 2),
        "setup_s": round(t_train - t_begin, 1),
        "trainable_params": trainable,
        "precision": precision,
        "base_dtype": args.dtype,
        "gradient_checkpointing": args.gradient_checkpointing,
        "torch_threads": torch.get_num_threads(),
        "internal_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "quantization": args.quantization,
    }
    if cuda:
        timing["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    (out / "timing.json").write_text(json.dumps(timing, indent=2))
    print(json.dumps({k: v for k, v in timing.items() if k != "step_end_s"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
