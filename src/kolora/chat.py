"""`kolora chat RUN`: talk to a trained adapter (or its base model) with the training prompt format."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from .data import Example, read_jsonl
from .errors import KoloraError
from .models import load_model, resolve
from .prompt import encode_prompt
from .runs import Run, open_run


@dataclass
class GenConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy (deterministic)
    top_p: float = 0.9
    repetition_penalty: float = 1.1
    seed: int = 0


def inference_dtype() -> str:
    from .train import cpu_has_bf16

    import torch

    if torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if cpu_has_bf16() else "float32"


def load_tuned(run: Run, dtype: str | None = None):
    """Base model + the run's adapter (PeftModel), its tokenizer and config."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    cfg = run.config()
    tokenizer = AutoTokenizer.from_pretrained(run.tokenizer)
    base = load_model(resolve(cfg.model.name), dtype or inference_dtype(), cfg.model.quantization,
                      cfg.model.trust_remote_code)
    model = PeftModel.from_pretrained(base, run.adapter)
    model.eval()
    if torch.cuda.is_available() and cfg.model.quantization == "none":
        model.to("cuda")
    return model, tokenizer, cfg


@dataclass
class Generation:
    text: str
    new_tokens: int
    stopped: bool  # ended with EOS within max_new_tokens (False: cut off by the token budget)


def generate_details(model, tokenizer, prompts: list[list[int]], gen: GenConfig, streamer=None) -> tuple[list[Generation], dict]:
    """Batched generation (left-padded prompts, KV cache): per-row text, length and whether it stopped."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    device = next(model.parameters()).device
    kwargs = dict(max_new_tokens=gen.max_new_tokens, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad,
                  repetition_penalty=gen.repetition_penalty, use_cache=True)
    if gen.temperature > 0:
        torch.manual_seed(gen.seed)
        kwargs.update(do_sample=True, temperature=gen.temperature, top_p=gen.top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    t0 = time.time()
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), streamer=streamer, **kwargs)
    rows, n_new = [], 0
    for row in out[:, width:].tolist():
        # finished rows are padded after their EOS (and SmolLM2's pad *is* its EOS): cut at the first one
        stopped = tokenizer.eos_token_id in row
        if stopped:
            row = row[:row.index(tokenizer.eos_token_id) + 1]
        n_new += len(row)
        rows.append(Generation(tokenizer.decode(row, skip_special_tokens=True).strip(), len(row), stopped))
    seconds = time.time() - t0
    return rows, {"new_tokens": n_new, "seconds": seconds, "tokens_per_s": n_new / max(seconds, 1e-9)}


def generate(model, tokenizer, prompts: list[list[int]], gen: GenConfig, streamer=None) -> tuple[list[str], dict]:
    """Batched generation (left-padded prompts, KV cache). Returns texts and speed figures."""
    rows, stats = generate_details(model, tokenizer, prompts, gen, streamer)
    return [r.text for r in rows], stats


def answer(model, tokenizer, cfg, questions: list[str], gen: GenConfig, base: bool = False, batch_size: int = 8):
    prompts = [encode_prompt(tokenizer, Example(q, ""), cfg.data.system_prompt, cfg.data.template) for q in questions]
    texts, stats = [], {"new_tokens": 0, "seconds": 0.0}
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        if base:
            with model.disable_adapter():
                t, s = generate(model, tokenizer, chunk, gen)
        else:
            t, s = generate(model, tokenizer, chunk, gen)
        texts += t
        stats["new_tokens"] += s["new_tokens"]
        stats["seconds"] += s["seconds"]
    stats["tokens_per_s"] = stats["new_tokens"] / max(stats["seconds"], 1e-9)
    return texts, stats


def clip(text: str, limit: int = 400) -> str:
    """Long (often looping) answers are cut for display, saying how much was cut."""
    text = " ".join(text.split())
    return text if len(text) <= limit else f"{text[:limit]} … (+{len(text) - limit}자)"


def quick_test(run_path: str, n: int, gen: GenConfig, compare: bool = False, base: bool = False) -> list[dict]:
    run = open_run(run_path)
    test = read_jsonl(run.split("test")) if run.split("test").is_file() else []
    if not test:
        raise KoloraError(f"{run_path} has no test split (data/test.jsonl)", "use --question instead")
    picked = test[:n]
    model, tokenizer, cfg = load_tuned(run)
    questions = [ex.question for ex in picked]
    rows = [{"question": ex.question, "reference": ex.answer} for ex in picked]
    if compare or base:
        print(f"generating base-model answers for {len(questions)} test questions …", file=sys.stderr, flush=True)
        base_answers, bstats = answer(model, tokenizer, cfg, questions, gen, base=True)
        for r, a in zip(rows, base_answers):
            r["base"] = a
    if not base:
        print(f"generating tuned answers for {len(questions)} test questions …", file=sys.stderr, flush=True)
        tuned, tstats = answer(model, tokenizer, cfg, questions, gen)
        for r, a in zip(rows, tuned):
            r["tuned"] = a
    for i, r in enumerate(rows, 1):
        print(f"\n[{i}/{len(rows)}] 질문: {r['question']}")
        print(f"  참고 답변: {r['reference']}")
        if "base" in r:
            print(f"  기본 모델: {clip(r['base'])}")
        if "tuned" in r:
            print(f"  튜닝 모델: {clip(r['tuned'])}")
    speed = tstats if not base else bstats
    print(f"\n(generation: {speed['new_tokens']} tokens, {speed['tokens_per_s']:.1f} tokens/s)")
    return rows


def interactive(run_path: str, gen: GenConfig, base: bool = False, question: str | None = None) -> None:
    from transformers import TextStreamer

    run = open_run(run_path)
    model, tokenizer, cfg = load_tuned(run)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)

    def ask(q: str, use_base: bool) -> None:
        prompt = encode_prompt(tokenizer, Example(q, ""), cfg.data.system_prompt, cfg.data.template)
        if use_base:
            with model.disable_adapter():
                _, s = generate(model, tokenizer, [prompt], gen, streamer)
        else:
            _, s = generate(model, tokenizer, [prompt], gen, streamer)
        print(f"  ({s['new_tokens']} tokens, {s['tokens_per_s']:.1f} tokens/s)", file=sys.stderr)

    if question is not None:
        ask(question, base)
        return
    print(f"kolora chat — {run.path} ({'base model' if base else 'tuned'}). "
          "/base, /tuned to switch, /exit to leave.", file=sys.stderr)
    while True:
        try:
            q = input("질문> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        if not q:
            continue
        if q in ("/exit", "/quit", "exit", "quit"):
            return
        if q in ("/base", "/tuned"):
            base = q == "/base"
            print(f"now answering with the {'base' if base else 'tuned'} model", file=sys.stderr)
            continue
        ask(q, base)
