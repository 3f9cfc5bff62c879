"""The one generation path: chat, eval, serve, export and training's health check all answer
through it.

- `GenConfig` and `gen_config`, the one builder, from flags or from a request's fields;
- loading a run (base + adapter) or a plain model for answering, in the inference precision;
- `generate_details`: batched generation, left-padded prompts, KV cache, cut at the first EOS;
- `generate_batched`: examples → prompts in the training format → answers, batches of similar
  length (less padding), optionally with the adapter disabled (the base model);
- `health_check`: do freshly trained answers stop and not loop?
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, fields

from .data import Example
from .device import inference_dtype
from .errors import KoloraError
from .metrics import find_loop, health_warnings
from .models import load_model, resolve
from .prompt import encode_prompt
from .runs import Run


@dataclass
class GenConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy (deterministic)
    top_p: float = 0.9
    # none by default: what eval measures is what chat and serve answer, and an exported GGUF
    # answers alike (transformers penalises every earlier token, prompt and retrieved passages
    # included; llama.cpp and Ollama only the last 64, so any penalty > 1 makes them differ)
    repetition_penalty: float = 1.0
    seed: int = 0
    # grounded runs (chat, eval): an answer that fails the citation check, never ends or loops is
    # answered again by sampling up to `verify` candidates, and the first that passes replaces it (0 = off)
    verify: int = 0


GEN_FLAGS = {  # flag -> (GenConfig field, type, help)
    "--max-new-tokens": ("max_new_tokens", int, "token budget per answer"),
    "--temperature": ("temperature", float, "0 = greedy (deterministic)"),
    "--top-p": ("top_p", float, "nucleus sampling (with --temperature > 0)"),
    "--repetition-penalty": ("repetition_penalty", float, "1.0 = none"),
    "--seed": ("seed", int, "sampling seed (with --temperature > 0 or --verify)"),
}
# chat and eval only: a served answer streams as it is written and cannot be taken back
VERIFY_FLAG = ("--verify", "grounded runs: an answer that fails the citation check (an article the corpus lacks, a "
                           "number no cited article states), never ends or loops is answered again, up to N sampled "
                           "candidates, and the first that passes replaces it (0 = off)")


def add_gen_flags(p, defaults: GenConfig | None = None, helps: dict[str, str] | None = None) -> None:
    """The generation flags of chat, eval and serve; each verb may give its own defaults."""
    d = defaults or GenConfig()
    for flag, (name, kind, text) in GEN_FLAGS.items():
        p.add_argument(flag, type=kind, default=getattr(d, name), help=(helps or {}).get(flag, text))


def gen_config(values, defaults: GenConfig | None = None) -> GenConfig:
    """The one place a GenConfig is built: from parsed flags (an argparse namespace) or from a
    request's fields (a mapping); a field that is missing or None takes the default."""
    if not isinstance(values, Mapping):
        values = vars(values)
    d = defaults or GenConfig()
    gen = GenConfig(**{f.name: getattr(d, f.name) if values.get(f.name) is None else values[f.name]
                       for f in fields(GenConfig)})
    if gen.max_new_tokens < 1:
        raise KoloraError(f"--max-new-tokens must be at least 1, got {gen.max_new_tokens}")
    return gen


# --------------------------------------------------------------------------- loading
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


def load_plain(model_name: str, tokenizer_path, cfg):
    """A plain model (a merged model, or the base of one) with the given tokenizer, for answering."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    model = load_model(resolve(model_name), inference_dtype(), "none", cfg.model.trust_remote_code)
    model.eval()
    return model, tokenizer


# --------------------------------------------------------------------------- generating
@dataclass
class Generation:
    text: str
    new_tokens: int
    stopped: bool  # ended with EOS within max_new_tokens (False: cut off by the token budget)
    tries: int = 1  # with GenConfig.verify: which answer was kept (1 = the first; 0 = none passed, the first kept)
    first: str | None = None  # the first answer, where a later one replaced it


def contiguous_head_input(model) -> None:
    """Make the output layer's input contiguous (once per model).

    At the prompt's forward pass transformers hands the output layer the last position as a
    strided view (`hidden[:, -1:, :]`). torch.matmul cannot fold a strided 3-D input into one
    matrix product, so it expands the weight to the batch and multiplies batch by batch: for
    Gemma-3's 262k-row output layer a copy of ~335 MB per prompt in the batch (measured:
    9.5 s of an 18 s prefill of 8 grounded prompts on 2 cores). A contiguous copy of the
    (batch × 1 × hidden) input is a plain matrix product: the same numbers, none of the copies."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "_kolora_contiguous", False):
        return

    def contiguous(_module, args):
        return (args[0].contiguous(), *args[1:]) if args and not args[0].is_contiguous() else None

    head.register_forward_pre_hook(contiguous)
    head._kolora_contiguous = True


def decode_batch(model, ids, mask, max_new_tokens: int, eos: int, pad: int,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0):
    """Decoding of a left-padded batch that drops each row from the batch, and from the KV cache,
    once it has produced EOS. `model.generate` keeps a finished row until the longest one ends:
    in `kolora eval` one looping answer kept all 32 rows of its batch decoding for the whole
    budget (tuned answers: 4,701 tokens for 9,177 decoded row-steps). Greedy (temperature 0):
    each row's tokens are the ones `generate` gives (same positions, mask and cache;
    tests/test_generation.py compares them on every architecture). With temperature > 0 each
    token is sampled as transformers samples (`sample_next`: temperature, top-k 50, top-p) with
    a generator seeded by `seed` (`--verify`'s candidates: N per failing question, where a
    sampled candidate that loops would otherwise hold the other rows of its batch to the whole
    budget). Returns the new tokens, (rows × steps), padded with `pad` after EOS."""
    import inspect

    import torch
    from transformers import DynamicCache

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cache = DynamicCache(config=base.config)
    # transformers 5.25 renamed past_key_values to cache (the old name is deprecated until 5.40)
    cache_arg = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    out = torch.full((ids.shape[0], max_new_tokens), pad, dtype=torch.long)
    alive = torch.arange(ids.shape[0])  # the batch's rows, as rows of `out`
    # positions as generate makes them for left padding: count real tokens, padding at 0
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    inputs = ids
    rng = torch.Generator(device=ids.device).manual_seed(seed) if temperature > 0 else None
    with torch.no_grad():
        for step in range(max_new_tokens):
            logits = model(input_ids=inputs, attention_mask=mask, position_ids=positions, use_cache=True,
                           logits_to_keep=1, **{cache_arg: cache}).logits[:, -1]
            nxt = logits.argmax(-1) if temperature <= 0 else sample_next(logits, temperature, top_p, rng)
            out[alive, step] = nxt.cpu()
            keep = (nxt != eos).nonzero().squeeze(1)
            if len(keep) == 0 or step == max_new_tokens - 1:
                break
            if len(keep) < len(alive):
                cache.batch_select_indices(keep)
                alive, nxt, mask, positions = alive[keep.cpu()], nxt[keep], mask[keep], positions[keep]
            mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
            positions = positions[:, -1:] + 1
            inputs = nxt[:, None]
    return out


TOP_K = 50  # transformers' default for sampling, which chat's streamed path (model.generate) uses


def sample_next(logits, temperature: float, top_p: float, rng):
    """One token per row, filtered as transformers samples (temperature, then the `TOP_K` most
    likely tokens, then the smallest of those whose probability reaches `top_p`; the most likely
    token always stays in)."""
    import torch

    top, index = (logits.float() / temperature).topk(min(TOP_K, logits.shape[-1]), dim=-1)  # sorted, descending
    probs = torch.softmax(top, dim=-1)
    if top_p < 1.0:
        probs = probs.masked_fill(probs.cumsum(-1) - probs > top_p, 0.0)  # the mass before it already reaches top_p
    return index.gather(-1, torch.multinomial(probs, 1, generator=rng)).squeeze(1)


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def left_padded(prompts: list[list[int]], pad: int):
    """(ids, mask) of a left-padded batch: each prompt ends at the last column, as decoding needs."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    return ids, mask


def until_eos(row: list[int], eos: int) -> tuple[list[int], bool]:
    """A decoded row up to and including its first EOS, and whether it has one: finished rows are
    padded after their EOS (and SmolLM2's pad *is* its EOS)."""
    if eos in row:
        return row[:row.index(eos) + 1], True
    return row, False


def generate_details(model, tokenizer, prompts: list[list[int]], gen: GenConfig, streamer=None) -> tuple[list[Generation], dict]:
    """Batched generation (left-padded prompts, KV cache): per-row text, length and whether it stopped."""
    import torch

    contiguous_head_input(model)

    pad = pad_id(tokenizer)
    ids, mask = left_padded(prompts, pad)
    width = ids.shape[1]
    device = next(model.parameters()).device
    t0 = time.time()
    if len(prompts) > 1 and streamer is None and gen.repetition_penalty == 1.0:
        out = decode_batch(model, ids.to(device), mask.to(device), gen.max_new_tokens, tokenizer.eos_token_id, pad,
                           gen.temperature, gen.top_p, gen.seed)
    else:
        kwargs = dict(max_new_tokens=gen.max_new_tokens, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad,
                      repetition_penalty=gen.repetition_penalty, use_cache=True)
        if gen.temperature > 0:
            torch.manual_seed(gen.seed)
            kwargs.update(do_sample=True, temperature=gen.temperature, top_p=gen.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), streamer=streamer,
                                 **kwargs)[:, width:]
    rows, n_new = [], 0
    for row in out.tolist():
        row, stopped = until_eos(row, tokenizer.eos_token_id)
        n_new += len(row)
        rows.append(Generation(tokenizer.decode(row, skip_special_tokens=True).strip(), len(row), stopped))
    seconds = time.time() - t0
    return rows, {"new_tokens": n_new, "seconds": seconds, "tokens_per_s": n_new / max(seconds, 1e-9)}


def generate(model, tokenizer, prompts: list[list[int]], gen: GenConfig, streamer=None) -> tuple[list[str], dict]:
    """Batched generation (left-padded prompts, KV cache). Returns texts and speed figures."""
    rows, stats = generate_details(model, tokenizer, prompts, gen, streamer)
    return [r.text for r in rows], stats


def answer_prompts(tokenizer, cfg, examples: list[Example]) -> list[list[int]]:
    """The prompt token ids the model answers `examples` from: the training format with the answer
    left out (question, history, system prompt and retrieved context kept)."""
    return [encode_prompt(tokenizer, Example(ex.question, "", history=ex.history, system=ex.system, context=ex.context),
                          cfg.data.system_prompt, cfg.data.template) for ex in examples]


def generate_batched(model, tokenizer, cfg, examples: list[Example], gen: GenConfig, batch_size: int = 8,
                     progress=None, base: bool = False, check=None):
    """Answers to `examples` in the training prompt format, `batch_size` at a time. Prompts are
    sorted by length so a batch pads less; results come back in the examples' order. With
    `base` the adapter is disabled (the base model answers). With `check(answer, question)` (a
    grounded run's citation check, e.g. `partial(grounding.check, hits=[])`) and `gen.verify`, failing answers are answered again
    (`verified`). Returns (generations, speed)."""
    from contextlib import nullcontext

    prompts = answer_prompts(tokenizer, cfg, examples)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results = [None] * len(prompts)
    seconds, new_tokens = 0.0, 0
    with model.disable_adapter() if base else nullcontext():
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            rows, stats = generate_details(model, tokenizer, [prompts[i] for i in chunk], gen)
            for i, row in zip(chunk, rows):
                results[i] = row
            seconds += stats["seconds"]
            new_tokens += stats["new_tokens"]
            if progress:
                progress.update(len(chunk))
        speed = {"seconds": round(seconds, 1), "new_tokens": new_tokens,
                 "tokens_per_s": round(new_tokens / max(seconds, 1e-9), 1)}
        if check is not None and gen.verify > 0:
            results, speed["verify"] = verified(model, tokenizer, prompts, examples, results, gen, check, batch_size)
    return results, speed


VERIFY_TEMPERATURE = 0.7  # candidates differ from the greedy answer yet stay close to it


def verified(model, tokenizer, prompts, examples, first: list[Generation], gen: GenConfig, check, batch_size: int):
    """Answer again where the first answer fails the checks: the citation check, or the health
    check (it never ended with EOS within the budget, or it loops).

    A small grounded model gets the form of an answer right far more often than its article
    and paragraph numbers and figures, and the check (every cited article exists, every number
    is in a cited article or the question) finds most of those slips without a model. Greedy
    decoding also falls into a loop now and then (5 of 57 demo answers, bench/HISTORY.md
    session 34), which a sampled answer to the same prompt rarely repeats. For each answer
    that fails, `gen.verify` candidates are sampled (temperature 0.7, `gen.seed`) and the first
    that passes the citation check, stops with EOS, does not loop and still cites an article
    (where the first answer did) replaces it. Where none passes the first answer stays, so
    nothing is hidden: the caller still checks and reports what is kept. Returns (generations,
    counts; `failed_why` counts each reason once per answer that had it)."""
    import dataclasses

    def failures(g: Generation, report) -> dict[str, bool]:
        return {"claims": bool(report.unsupported), "no_eos": not g.stopped, "loop": find_loop(g.text) is not None}

    def passes(g: Generation, ex: Example, cited: bool) -> bool:
        report = check(g.text, ex.question)
        return not any(failures(g, report).values()) and (report.cites or not cited)

    failing, why = [], {"claims": 0, "no_eos": 0, "loop": 0}
    for i, (ex, g) in enumerate(zip(examples, first)):
        report = check(g.text, ex.question)
        reasons = failures(g, report)
        if any(reasons.values()):
            failing.append((i, report.cites))
            for k, v in reasons.items():
                why[k] += v
    t0, sampled, out = time.time(), 0, list(first)
    sample = dataclasses.replace(gen, temperature=VERIFY_TEMPERATURE)
    per_batch = max(1, batch_size // gen.verify)  # questions per batch: each is answered gen.verify times
    for start in range(0, len(failing), per_batch):
        chunk = failing[start:start + per_batch]
        rows, stats = generate_details(model, tokenizer, [prompts[i] for i, _ in chunk for _ in range(gen.verify)],
                                       dataclasses.replace(sample, seed=gen.seed + start))
        sampled += stats["new_tokens"]
        for n, (i, cited) in enumerate(chunk):
            tries = rows[n * gen.verify:(n + 1) * gen.verify]
            kept = next((t for t in range(len(tries)) if passes(tries[t], examples[i], cited)), None)
            if kept is None:
                out[i] = dataclasses.replace(first[i], tries=0)
            else:
                out[i] = dataclasses.replace(tries[kept], tries=kept + 2, first=first[i].text)
    return out, {"checked": len(first), "failed_first": len(failing), "failed_why": why,
                 "replaced": sum(g.tries > 1 for g in out), "sampled_tokens": sampled,
                 "seconds": round(time.time() - t0, 1)}


# --------------------------------------------------------------------------- after training
def health_check(model, tokenizer, cfg, examples, gen=None, check=None) -> list[str]:
    """Answer a handful of (validation) questions with the freshly trained adapter and return
    warnings for answers that never end with EOS or that loop, each with its likely cause.
    With `check(answer, question)` (a grounded run's citation check) also for answers that cite
    an article the corpus lacks or state a number no cited article holds. An empty list means
    the answers looked healthy."""
    if not examples:
        return []
    gen = gen or GenConfig(max_new_tokens=192, repetition_penalty=1.0)
    was_training = model.training
    model.eval()
    try:
        generations, _ = generate_batched(model, tokenizer, cfg, examples, gen, batch_size=len(examples))
    finally:
        model.train(was_training)
    rows = [{"eos": g.stopped, "loop": find_loop(g.text),
             "answer_tokens": len(tokenizer(ex.answer, add_special_tokens=False).input_ids) + 1}
            for ex, g in zip(examples, generations)]
    warnings = health_warnings(rows, gen, cfg, "health check")
    if check is not None:
        claims = [(ex, c) for ex, g in zip(examples, generations) for c in check(g.text, ex.question).unsupported]
        if claims:
            n = len({id(ex) for ex, _ in claims})
            warnings.append(f"health check: {n}/{len(examples)} answers make claims the corpus does not support "
                            f"(e.g. «{claims[0][1]}» for «{claims[0][0].question[:40]}»): the model is not yet "
                            "answering from its passages — train longer, or raise retrieval.oracle_p")
    return warnings
