"""`kolora eval RUN`: did fine-tuning help, where, and where not?

Base and tuned model answer the same held-out questions, formatted exactly as in training
(`kolora.prompt`). Per side:

- perplexity: exp(mean cross entropy over the answer tokens and the EOS), teacher-forced —
  the quantity training minimised, on questions it never saw;
- chrF, ROUGE-L, BLEU against the reference answers, all on characters (see below);
- fact recall: the share of the reference's statute references and quantities (`제312조
  제1항`, `10년`, `6개월`, `20분의 1`, `1억 원`, …) that the answer states;
- health: EOS within the token budget, distinct-2, repetition loops, length vs reference;

overall, per `category` and per `difficulty`. Written to `<run>/eval/`: `metrics.json`,
`samples.jsonl` and a self-contained `report.html`.

Why characters: Korean words (eojeol) glue particles and endings to their stem — `제312조에`,
`제312조가`, `제312조는` are three different whitespace tokens for one article — and spacing
varies between writers. Word-level overlap therefore scores a correct answer near zero for a
different particle. chrF (character n-grams up to 6, sacrebleu's default) is the metric the
MT community recommends for morphologically rich languages; BLEU uses sacrebleu's `char`
tokenizer (syllable n-grams up to 4, whitespace ignored) because `ko-mecab` needs MeCab and a
dictionary that are not installed, and `13a`/`intl` split on whitespace only; ROUGE-L is the
longest common subsequence of non-space characters, for the same reason.
"""

from __future__ import annotations

import gc
import json
import math
import os
import re
import sys
import time
import unicodedata
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import KoloraError

HELP = ("compare base and tuned model on held-out questions: answer perplexity, chrF / ROUGE-L / BLEU, "
        "fact recall, EOS and loops; writes eval/metrics.json, samples.jsonl and report.html")
SCHEMA = "kolora.eval/1"
SIDES = ("base", "tuned")
# metric -> (higher is better, shown as). Also the fixed order of tables and charts.
METRICS = {
    "perplexity": (False, "answer perplexity"),
    "chrf": (True, "chrF"),
    "rouge_l": (True, "ROUGE-L"),
    "bleu": (True, "BLEU"),
    "fact_recall": (True, "fact recall"),
    "eos_rate": (True, "EOS rate"),
    "distinct_2": (True, "distinct-2"),
    "loop_rate": (False, "loop rate"),
    "length_ratio": (None, "length / reference"),
}
METRIC_NOTES = {
    "perplexity": "exp(mean cross entropy over answer tokens + EOS), teacher-forced, prompt formatted as in training",
    "chrf": "sacrebleu chrF (character 6-grams, beta 2), corpus-level, 0-100",
    "rouge_l": "ROUGE-L F1 of the longest common subsequence of non-space characters, mean over answers, 0-100",
    "bleu": "sacrebleu BLEU with tokenize='char' (syllables, whitespace ignored), corpus-level, 0-100",
    "fact_recall": "reference facts (statute refs, periods, amounts, fractions, percentages, counts) stated by the answer "
                   "/ all reference facts (micro average); null when the references hold no facts",
    "eos_rate": "share of answers that ended with EOS within max_new_tokens",
    "distinct_2": "unique / total word bigrams within an answer, mean over answers (1.0 = no bigram repeated)",
    "loop_rate": "share of answers with a loop: a word 4-gram occurring 3+ times, or one span of 4-50 characters "
                 "three times in a row",
    "length_ratio": "mean answer length / mean reference length, in non-space characters",
}


# =========================================================================== facts
# Law names are deliberately not part of a fact: answers and references alike elide them
# ("같은 법", "시행령", "이 법"), and the article number is what people get wrong.
_STATUTE = re.compile(
    r"제\s?(?P<art>\d+)\s?조(?:\s?의\s?(?P<sub>\d+))?"  # 제312조, 제3조의2
    r"|(?:제\s?)?(?P<para>\d+)\s?항"  # 제1항, 1항
    r"|(?:제\s?)?(?P<item>\d+)\s?호(?![실수])"  # 제2호 (not 101호실)
)
# A unit (억, 만, …) must separate the number groups: with optional units a run of digits and
# spaces could be split in exponentially many ways, and a base model's "1 2 3 4 …" ramble
# made `kolora eval` hang for minutes on one answer.
_MONEY = re.compile(r"((?:\d[\d,]*\s?[억천백십만]\s?)*\d[\d,]*\s?[억천백십만]?)\s?원")
_MONEY_PART = re.compile(r"(\d[\d,]*)\s?([억천백십만]?)")
_PERIOD = re.compile(r"(\d+(?:\.\d+)?)\s?(개월|달|년|월|주|일|시간)(?![택년간가])")
_FRACTION = re.compile(r"(\d+)\s?분의\s?(\d+)")
_PERCENT = re.compile(r"(\d+(?:\.\d+)?)\s?(?:%|퍼센트|프로)")
_TENTHS = re.compile(r"(\d+)\s?할(?![인부])")  # 1할 = 10%
_COUNT = re.compile(r"(\d+)\s?(기|회|배|촌)(?![간상])")
_UNIT = {"천": 1000, "백": 100, "십": 10}


def _number(text: str) -> str:
    value = float(text.replace(",", ""))
    return str(int(value)) if value.is_integer() else f"{value:g}"


def won(text: str) -> int:
    """'1억6천500만' → 165000000, '2천500만' → 25000000, '5,000만' → 50000000."""
    total, section = 0, 0
    for digits, unit in _MONEY_PART.findall(text):
        n = int(digits.replace(",", ""))
        if unit in _UNIT:
            section += n * _UNIT[unit]
        elif unit == "만":
            total += (section + n) * 10_000
            section = 0
        elif unit == "억":
            total += (section + n) * 100_000_000
            section = 0
        else:
            section += n
    return total + section


def statute_refs(text: str) -> list[str]:
    """Statute references in reading order, normalised: '제312조제1항' and '제312조 1항' → '제312조 제1항'.

    A paragraph or item without its own article ('같은 조 제2항', '…에 따라. 제2항은') belongs to
    the article mentioned last; one before any article stays alone ('제2항')."""
    refs, article, paragraph = [], None, None
    for m in _STATUTE.finditer(text):
        if m["art"]:
            article = f"제{int(m['art'])}조" + (f"의{int(m['sub'])}" if m["sub"] else "")
            paragraph = None
            refs.append(article)
        elif m["para"]:
            paragraph = f"제{int(m['para'])}항"
            refs.append(f"{article} {paragraph}" if article else paragraph)
        else:
            item = f"제{int(m['item'])}호"
            refs.append(" ".join(x for x in (article, paragraph, item) if x))
    return refs


def quantities(text: str) -> list[str]:
    """Periods, amounts, fractions, percentages and counts, normalised ('6월' → '6개월', '1억 원' → '100,000,000원')."""
    found = []
    for m in _MONEY.finditer(text):
        amount = won(m[1])
        if amount:
            found.append(f"{amount:,}원")
    for m in _PERIOD.finditer(text):
        unit = {"월": "개월", "달": "개월"}.get(m[2], m[2])
        found.append(f"{_number(m[1])}{unit}")
    found += [f"{int(b)}/{int(a)}" for a, b in _FRACTION.findall(text)]
    found += [f"{_number(x)}%" for x in _PERCENT.findall(text)]
    found += [f"{int(x) * 10}%" for x in _TENTHS.findall(text)]
    found += [f"{int(n)}{unit}" for n, unit in _COUNT.findall(text)]
    return found


def fact_spans(text: str) -> list[tuple[int, int]]:
    """Character spans (start, end) of the facts `extract_facts` reads, merged where they touch:
    what `train.fact_weight` weights. The same patterns, so training weights exactly what
    fact recall checks."""
    spans = [m.span() for m in _STATUTE.finditer(text)]
    spans += [m.span() for m in _MONEY.finditer(text) if won(m[1])]
    for pattern in (_PERIOD, _FRACTION, _PERCENT, _TENTHS, _COUNT):
        spans += [m.span() for m in pattern.finditer(text)]
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def normalize(text: str) -> str:
    return unicodedata.normalize("NFKC", text)  # full-width digits and ％ become ASCII


def extract_facts(text: str) -> list[str]:
    """The checkable facts of a text, deduplicated, in order. An article mentioned both alone
    and with a paragraph ('제312조 … 제312조 제1항') counts once, as the more specific one."""
    text = normalize(text)
    found = list(dict.fromkeys(statute_refs(text) + quantities(text)))
    return [f for f in found if not any(g != f and g.startswith(f + " ") for g in found)]


def states(answer_facts: list[str], fact: str) -> bool:
    """The answer states `fact` if it names it, or names it more precisely (제312조 → 제312조 제1항)."""
    return any(g == fact or g.startswith(fact + " ") for g in answer_facts)


def fact_recall(answer: str, reference: str) -> tuple[float | None, list[str], list[str]]:
    """(share of the reference's facts the answer states, reference facts, the stated ones)."""
    wanted = extract_facts(reference)
    if not wanted:
        return None, [], []
    mine = list(dict.fromkeys(statute_refs(normalize(answer)) + quantities(normalize(answer))))
    stated = [f for f in wanted if states(mine, f)]
    return len(stated) / len(wanted), wanted, stated


# =========================================================================== text health
_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Whitespace words with punctuation split off: '따릅니다.' → ['따릅니다', '.']."""
    return _WORD.findall(text)


def ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(text: str, n: int = 2) -> float | None:
    grams = ngrams(words(text), n)
    return len(set(grams)) / len(grams) if grams else None


_CHAR_LOOP = re.compile(r"(\S.{3,49}?)\1\1", re.S)


def find_loop(text: str, n: int = 4, times: int = 3) -> str | None:
    """The repeated piece if the text loops, else None.

    A loop is a word n-gram (n=4) that occurs `times` (3) or more times anywhere in the text,
    or — for loops without spaces — a span of 4 to 50 characters repeated three times in a
    row. None of the 340 reference answers of the bundled data is flagged."""
    counts = Counter(ngrams(words(text), n))
    if counts:
        gram, count = counts.most_common(1)[0]
        if count >= times:
            return " ".join(gram)
    m = _CHAR_LOOP.search(text)
    return m[1] if m else None


def chars(text: str) -> list[str]:
    return [c for c in text if not c.isspace()]


def lcs_length(a: list[str], b: list[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F1 (0-100) over non-space characters: robust to Korean spacing and particles."""
    a, r = chars(answer), chars(reference)
    if not a or not r:
        return 0.0
    lcs = lcs_length(a, r)
    if not lcs:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(r)
    return 100 * 2 * precision * recall / (precision + recall)


def chrf(answers: list[str], references: list[str]) -> float:
    """Corpus chrF (0-100): character n-gram statistics summed over all pairs, then the F-score."""
    from sacrebleu.metrics import CHRF

    return CHRF().corpus_score(answers, [references]).score if answers else float("nan")


def bleu(answers: list[str], references: list[str]) -> float:
    """Corpus BLEU (0-100) on syllables (tokenize='char'); see the module docstring for why."""
    from sacrebleu.metrics import BLEU

    return BLEU(tokenize="char").corpus_score(answers, [references]).score if answers else float("nan")


def sentence_chrf(answer: str, reference: str) -> float:
    from sacrebleu.metrics import CHRF

    return CHRF().sentence_score(answer, [reference]).score


def sentence_bleu(answer: str, reference: str) -> float:
    from sacrebleu.metrics import BLEU

    return BLEU(tokenize="char", effective_order=True).sentence_score(answer, [reference]).score


# =========================================================================== per answer, per group
def answer_metrics(answer: str, reference: str, stopped: bool, new_tokens: int,
                   loss_sum: float, answer_tokens: int) -> dict:
    """Everything we know about one answer; `aggregate` turns lists of these into a block."""
    recall, wanted, stated = fact_recall(answer, reference)
    loop = find_loop(answer)
    return {
        "answer": answer,
        "perplexity": math.exp(loss_sum / answer_tokens) if answer_tokens else None,
        "chrf": sentence_chrf(answer, reference),
        "rouge_l": rouge_l(answer, reference),
        "bleu": sentence_bleu(answer, reference),
        "fact_recall": recall,
        "facts_reference": wanted,
        "facts_stated": stated,
        "eos": stopped,
        "loop": loop,
        "distinct_2": distinct_n(answer, 2),
        "length": len(chars(answer)),
        "reference_length": len(chars(reference)),
        "new_tokens": new_tokens,
        "loss_sum": loss_sum,
        "answer_tokens": answer_tokens,
    }


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def aggregate(rows: list[dict], references: list[str]) -> dict:
    """One metric block from per-answer metrics: corpus-level where the metric is defined so
    (perplexity, chrF, BLEU, fact recall), mean over answers elsewhere."""
    answers = [r["answer"] for r in rows]
    tokens = sum(r["answer_tokens"] for r in rows)
    n_facts = sum(len(r["facts_reference"]) for r in rows)
    ref_len = _mean(r["reference_length"] for r in rows)
    length = _mean(r["length"] for r in rows)
    return {
        "n": len(rows),
        "perplexity": math.exp(sum(r["loss_sum"] for r in rows) / tokens) if tokens else None,
        "chrf": chrf(answers, references),
        "rouge_l": _mean(r["rouge_l"] for r in rows),
        "bleu": bleu(answers, references),
        "fact_recall": sum(len(r["facts_stated"]) for r in rows) / n_facts if n_facts else None,
        "facts": n_facts,
        "eos_rate": _mean(float(r["eos"]) for r in rows),
        "distinct_2": _mean(r["distinct_2"] for r in rows),
        "loop_rate": _mean(float(r["loop"] is not None) for r in rows),
        "loops": sum(r["loop"] is not None for r in rows),
        "mean_length": length,
        "reference_length": ref_len,
        "length_ratio": length / ref_len if length is not None and ref_len else None,
        "mean_new_tokens": _mean(r["new_tokens"] for r in rows),
    }


def group_by(examples, key: str) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        value = getattr(ex, key)
        if value not in (None, ""):
            groups.setdefault(str(value), []).append(i)
    return groups


def side_block(rows: list[dict], examples) -> dict:
    refs = [ex.answer for ex in examples]
    block = aggregate(rows, refs)
    for key in ("category", "difficulty"):
        groups = group_by(examples, key)
        if groups:
            block[f"by_{key}"] = {g: aggregate([rows[i] for i in idx], [refs[i] for i in idx])
                                  for g, idx in sorted(groups.items())}
    return block


def delta(base: dict, tuned: dict) -> dict:
    out = {}
    for name in METRICS:
        b, t = base.get(name), tuned.get(name)
        if isinstance(b, (int, float)) and isinstance(t, (int, float)) and math.isfinite(b) and math.isfinite(t):
            out[name] = t - b
    return out


def verdict(base: dict, tuned: dict) -> list[dict]:
    """Per metric: better, worse or same — the honest one-line answer to 'did it help?'."""
    out = []
    for name, (higher, label) in METRICS.items():
        b, t = base.get(name), tuned.get(name)
        if higher is None or b is None or t is None:
            continue
        if name == "perplexity":
            change, same = (t - b) / b if b else 0.0, abs(t - b) / max(b, 1e-9) < 0.02
        else:
            change, same = t - b, abs(t - b) < (0.5 if name in ("chrf", "rouge_l", "bleu") else 0.01)
        better = (t > b) == higher
        out.append({"metric": name, "label": label, "base": b, "tuned": t, "change": change,
                    "result": "same" if same else ("better" if better else "worse")})
    return out


UNTUNED = "usual for a base model that was never tuned to this prompt format; fine-tuning is what fixes it"


def health_warnings(rows: list[dict], gen, cfg=None, who: str = "tuned", untuned: bool = False) -> list[str]:
    """Clear warnings for answers that do not stop or that loop, each with its likely cause.
    `rows` carry `eos`, `loop` and `answer_tokens` (the reference answer's length in tokens)."""
    warnings, n = [], len(rows)
    open_ended = [r for r in rows if not r["eos"]]
    if open_ended:
        if untuned:
            cause = UNTUNED
        elif all(r.get("answer_tokens", 0) >= gen.max_new_tokens for r in open_ended):
            cause = f"their reference answers are longer than max_new_tokens={gen.max_new_tokens}: raise it"
        else:
            cause = ("the model has not learned to stop. The training targets must end with EOS in the template the "
                     "model answers in (kolora appends the tokenizer's EOS; a chat template whose end-of-turn token "
                     "is not that EOS breaks this), or training was too short"
                     + (f" (train.epochs {cfg.train.epochs:g}, train.lr {cfg.train.lr:g}: try more epochs)" if cfg else ""))
        warnings.append(f"{who}: {len(open_ended)}/{n} answers did not end with EOS within "
                        f"{gen.max_new_tokens} new tokens — likely cause: {cause}")
    loops = [r["loop"] for r in rows if r["loop"] is not None]
    if loops and untuned:
        warnings.append(f"{who}: {len(loops)}/{n} answers loop (e.g. «{loops[0][:40]}» repeated) — {UNTUNED}")
    elif loops:
        cause = ("a learning rate too high for this data" + (f" (train.lr {cfg.train.lr:g}: try half)" if cfg else "")
                 + " or too few steps to learn the answer style" + (f" (train.epochs {cfg.train.epochs:g})" if cfg else ""))
        if gen.repetition_penalty > 1.0:
            cause += f"; this is with repetition_penalty {gen.repetition_penalty:g} already"
        warnings.append(f"{who}: {len(loops)}/{n} answers loop (e.g. «{loops[0][:40]}» repeated) — likely cause: {cause}")
    return warnings


# =========================================================================== running the models
@dataclass
class Side:
    """One side of the comparison: `open()` yields (model, tokenizer, cfg) ready to answer."""

    name: str  # "base" or "tuned": the keys of metrics.json
    label: str  # what it is, for people
    source: str
    open: Callable
    untuned: bool = False  # a base model without any adapter: its loops are no training mistake


@dataclass
class Plan:
    target: str
    examples: list
    data_source: str
    out_dir: Path
    sides: list[Side]
    loss_events: list[dict] = field(default_factory=list)
    cfg: object = None  # the evaluated run's config: its lr and epochs go into the warnings


def _autocast(model):
    import torch

    p = next(model.parameters())
    if p.dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(p.device.type, dtype=p.dtype)
    return nullcontext()


def answer_losses(model, tokenizer, cfg, examples, progress=None) -> list[tuple[float, int]]:
    """Teacher-forced (summed CE, token count) over each answer + EOS, one example at a time
    (per-answer figures are wanted; the output layer runs on answer positions only)."""
    import torch

    from .prompt import encode_example
    from .train import Tokenized, answer_loss_module, collate

    loss_model = answer_loss_module(model)
    out = []
    device = next(model.parameters()).device
    with torch.no_grad(), _autocast(model):
        for ex in examples:
            ids, labels = encode_example(tokenizer, ex, cfg.data.system_prompt, cfg.data.template)
            loss_sum, n = loss_model(**collate([Tokenized(ids, labels)], tokenizer.pad_token_id, device=device))
            out.append((float(loss_sum), int(n)))
            if progress:
                progress.update(1)
    return out


def generate_answers(model, tokenizer, cfg, examples, gen, batch_size: int, progress=None):
    """Greedy (or seeded sampling) batched generation; prompts sorted by length to pad less."""
    from .chat import generate_details
    from .data import Example
    from .prompt import encode_prompt

    prompts = [encode_prompt(tokenizer, Example(ex.question, "", history=ex.history, system=ex.system),
                             cfg.data.system_prompt, cfg.data.template) for ex in examples]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results = [None] * len(prompts)
    seconds, new_tokens = 0.0, 0
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        rows, stats = generate_details(model, tokenizer, [prompts[i] for i in chunk], gen)
        for i, row in zip(chunk, rows):
            results[i] = row
        seconds += stats["seconds"]
        new_tokens += stats["new_tokens"]
        if progress:
            progress.update(len(chunk))
    return results, {"seconds": round(seconds, 1), "new_tokens": new_tokens,
                     "tokens_per_s": round(new_tokens / max(seconds, 1e-9), 1)}


def evaluate_side(side: Side, examples, gen, batch_size: int) -> tuple[list[dict], dict]:
    from tqdm.auto import tqdm

    t0 = time.time()
    with side.open() as (model, tokenizer, cfg):
        load_s = time.time() - t0
        with tqdm(total=len(examples), desc=f"{side.name}: perplexity", unit="q", dynamic_ncols=True) as bar:
            t1 = time.time()
            losses = answer_losses(model, tokenizer, cfg, examples, bar)
            loss_s = time.time() - t1
        with tqdm(total=len(examples), desc=f"{side.name}: answers", unit="q", dynamic_ncols=True) as bar:
            generations, stats = generate_answers(model, tokenizer, cfg, examples, gen, batch_size, bar)
    rows = [answer_metrics(g.text, ex.answer, g.stopped, g.new_tokens, loss, n)
            for ex, g, (loss, n) in zip(examples, generations, losses)]
    timing = {"load_s": round(load_s, 1), "perplexity_s": round(loss_s, 1), "generation_s": stats["seconds"],
              "new_tokens": stats["new_tokens"], "tokens_per_s": stats["tokens_per_s"]}
    return rows, timing


# =========================================================================== what to compare
MERGE_MARKER = "kolora-merge.json"


def run_sides(run) -> tuple[Side, Side]:
    """A run: its base model (adapter disabled) and the tuned adapter, loaded once."""
    loaded = {}

    def tuned():
        if "m" not in loaded:
            from .chat import load_tuned

            loaded["m"] = load_tuned(run)
        return loaded["m"]

    @contextmanager
    def open_base():
        model, tokenizer, cfg = tuned()
        with model.disable_adapter():
            yield model, tokenizer, cfg

    @contextmanager
    def open_tuned():
        yield tuned()
        loaded.clear()

    name = run.config().model.name
    return (Side("base", f"{Path(name).name} (기본 모델)", name, open_base, untuned=True),
            Side("tuned", f"{run.path.name} (튜닝)", str(run.path), open_tuned))


def _merged_run(path: Path):
    from .runs import open_run

    info = json.loads((path / MERGE_MARKER).read_text(encoding="utf-8"))
    if not info.get("run"):
        raise KoloraError(f"{path / MERGE_MARKER} does not name the run it was merged from",
                          "merge again with `kolora merge RUN --out DIR`")
    try:
        return open_run(info["run"], need_adapter=False)
    except KoloraError as e:
        raise KoloraError(f"{path} was merged from {info['run']}, which is needed for its prompt format and "
                          f"test split: {e}", "keep the run directory next to the merged model") from None


def merged_side(path: Path, name: str = "tuned") -> Side:
    """A merged model directory (`kolora merge`): a plain model, the run's prompt format."""
    run = _merged_run(path)

    @contextmanager
    def open_merged():
        from transformers import AutoTokenizer

        from .chat import inference_dtype
        from .models import load_model, resolve

        cfg = run.config()
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = load_model(resolve(str(path)), inference_dtype(), "none", cfg.model.trust_remote_code)
        model.eval()
        yield model, tokenizer, cfg
        del model  # the next side loads its own model: never two in memory
        gc.collect()

    return Side(name, f"{path.name} (병합 모델)", str(path), open_merged)


def plain_base_side(path: Path) -> Side:
    """The base of a merged model: the model named in its run's config, no adapter."""
    run = _merged_run(path)
    cfg = run.config()

    @contextmanager
    def open_base():
        from transformers import AutoTokenizer

        from .chat import inference_dtype
        from .models import load_model, resolve

        tokenizer = AutoTokenizer.from_pretrained(path)
        model = load_model(resolve(cfg.model.name), inference_dtype(), "none", cfg.model.trust_remote_code)
        model.eval()
        yield model, tokenizer, cfg
        del model  # the next side loads its own model: never two in memory
        gc.collect()

    return Side("base", f"{Path(cfg.model.name).name} (기본 모델)", cfg.model.name, open_base, untuned=True)


def tuned_side(path: Path, name: str) -> Side:
    """The tuned model of a run or a merged directory, as side `name` (for --against)."""
    if (path / MERGE_MARKER).is_file():
        return merged_side(path, name)
    from .runs import open_run

    run = open_run(str(path))

    @contextmanager
    def open_adapter():
        from .chat import load_tuned

        model, tokenizer, cfg = load_tuned(run)
        yield model, tokenizer, cfg
        del model  # the next side loads its own model: never two in memory
        gc.collect()

    return Side(name, f"{path.name} (튜닝)", str(path), open_adapter)


def load_eval_examples(run, data: str | None, split: str, max_samples: int | None):
    from .data import SPLITS, load_examples, read_jsonl

    if data:
        examples, report = load_examples(data)
        for line in report.lines():
            print(line, file=sys.stderr)
        source = str(data)
    else:
        if split not in SPLITS:
            raise KoloraError(f"--split {split} is not one of {', '.join(SPLITS)}")
        path = run.split(split)
        if not path.is_file():
            raise KoloraError(f"{run.path} has no {split} split ({path})", "pass --data PATH to evaluate a file instead")
        examples = read_jsonl(path)
        source = f"{run.path}/data/{split}.jsonl"
    if max_samples is not None and max_samples < 1:
        raise KoloraError(f"--max-samples must be at least 1, got {max_samples}")
    examples = examples[:max_samples] if max_samples else examples
    if not examples:
        raise KoloraError(f"no questions to evaluate in {source}", "check the file or the split")
    return examples, source


def make_plan(args) -> Plan:
    from .report import read_metrics
    from .runs import open_run

    target = Path(args.run).expanduser()
    merged = (target / MERGE_MARKER).is_file()
    run = _merged_run(target) if merged else open_run(str(target))
    if args.against:
        other = Path(args.against).expanduser()
        if not other.is_dir():
            raise KoloraError(f"--against {args.against}: directory not found", "pass a run or a merged model directory")
        base = tuned_side(other, "base")
        tuned = tuned_side(target, "tuned")
        default_out = target / f"eval-vs-{other.resolve().name}"
    elif merged:
        base, tuned = plain_base_side(target), merged_side(target)
        default_out = target / "eval"
    else:
        base, tuned = run_sides(run)
        default_out = target / "eval"
    examples, source = load_eval_examples(run, args.data, args.split, args.max_samples)
    return Plan(str(target), examples, source, Path(args.out) if args.out else default_out, [base, tuned],
                read_metrics(run.metrics), run.config())


# =========================================================================== the verb
def add_arguments(p) -> None:
    p.add_argument("run", help="run directory (base vs its tuned adapter) or a merged model directory (kolora merge)")
    p.add_argument("--data", metavar="PATH", help="evaluate every row of this file (CSV/JSON/JSONL) instead of a split")
    p.add_argument("--split", default="test", help="split of the run to evaluate: test (default), validation, train")
    p.add_argument("--max-samples", type=int, metavar="N", help="evaluate only the first N questions")
    p.add_argument("--against", metavar="RUN2",
                   help="compare RUN (as 'tuned') with another run or merged model RUN2 (as 'base')")
    p.add_argument("--out", metavar="DIR", help="output directory (default RUN/eval, RUN/eval-vs-RUN2 with --against)")
    p.add_argument("--batch-size", type=int, default=8, help="questions generated together")
    p.add_argument("--max-new-tokens", type=int, default=256, help="token budget per answer; an answer that "
                   "has not ended with EOS by then counts as not stopping")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default, deterministic)")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="1.0 (default) measures the model as it is; chat's 1.1 would hide loops")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature > 0)")
    p.add_argument("--no-cache", action="store_true",
                   help="answer with the base model again even when an earlier eval of the same base, questions and "
                        "settings is cached (KOLORA_CACHE/eval-base)")


def gen_config(args):
    from .chat import GenConfig

    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise KoloraError("--max-new-tokens and --batch-size must be at least 1")
    return GenConfig(args.max_new_tokens, args.temperature, args.top_p, args.repetition_penalty, args.seed)


def base_cache_file(side: Side, plan: Plan, gen, batch_size: int) -> Path | None:
    """Where an untuned base model's results for exactly these questions, prompt format and
    generation settings are kept: a base model does not change between runs, so a second
    `kolora eval` (another run, more epochs) need not answer the same questions again."""
    import dataclasses
    import hashlib

    import torch

    from . import __version__
    from .checkpoint import model_fingerprint
    from .chat import inference_dtype
    from .models import cache_root, resolve

    if not side.untuned or plan.cfg is None:
        return None
    try:
        model_path = resolve(side.source).path
    except KoloraError:
        return None
    key = json.dumps({"model": model_fingerprint(model_path), "kolora": __version__, "torch": torch.__version__,
                      "dtype": inference_dtype(), "system": plan.cfg.data.system_prompt, "template": plan.cfg.data.template,
                      "gen": dataclasses.asdict(gen), "batch": batch_size,
                      "questions": [[ex.question, ex.answer, ex.system, ex.history] for ex in plan.examples]},
                     ensure_ascii=False, sort_keys=True, default=str)
    return cache_root() / "eval-base" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def evaluate(plan: Plan, gen, batch_size: int, use_cache: bool = True) -> tuple[dict, list[dict]]:
    """Run both sides; return (metrics, samples)."""
    import dataclasses

    results, timing, n = {}, {}, len(plan.examples)
    for side in plan.sides:
        cached = base_cache_file(side, plan, gen, batch_size) if use_cache else None
        if cached and cached.is_file():
            saved = json.loads(cached.read_text(encoding="utf-8"))
            results[side.name], timing[side.name] = saved["rows"], {**saved["timing"], "cached": str(cached)}
            print(f"[{side.name}] {side.label}: {n} questions — the same base, questions and settings as an earlier "
                  f"eval: reusing {cached} (--no-cache to answer again)", file=sys.stderr, flush=True)
            continue
        print(f"[{side.name}] {side.label}: {n} questions", file=sys.stderr, flush=True)
        results[side.name], timing[side.name] = evaluate_side(side, plan.examples, gen, batch_size)
        if cached:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(".tmp")
            tmp.write_text(json.dumps({"rows": results[side.name], "timing": timing[side.name]}, ensure_ascii=False,
                                      default=_json_default), encoding="utf-8")
            os.replace(tmp, cached)
    base = side_block(results["base"], plan.examples)
    tuned = side_block(results["tuned"], plan.examples)
    metrics = {
        "schema": SCHEMA,
        "target": plan.target,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "data": {"source": plan.data_source, "n": n},
        "generation": {**dataclasses.asdict(gen), "batch_size": batch_size},
        "sides": {s.name: {"label": s.label, "source": s.source} for s in plan.sides},
        "metric_notes": METRIC_NOTES,
        "base": base,
        "tuned": tuned,
        "delta": delta(base, tuned),
        "verdict": verdict(base, tuned),
        "warnings": (health_warnings(results["tuned"], gen, plan.cfg, "tuned")
                     + health_warnings(results["base"], gen, None, "base", untuned=plan.sides[0].untuned)),
        "timing": timing,
    }
    samples = []
    for i, ex in enumerate(plan.examples):
        sample = {"id": i, "question": ex.question, "reference": ex.answer, "category": ex.category,
                  "difficulty": ex.difficulty}
        for name in SIDES:
            row = dict(results[name][i])
            row.pop("loss_sum")
            sample[name] = row
        b, t = sample["base"], sample["tuned"]
        sample["delta"] = {k: t[k] - b[k] for k in ("chrf", "rouge_l", "bleu", "fact_recall")
                           if t[k] is not None and b[k] is not None}
        samples.append(sample)
    return metrics, samples


def regression_order(samples: list[dict]) -> list[dict]:
    """Worst regressions first: tuned fact recall minus base's, then chrF difference."""
    return sorted(samples, key=lambda s: (s["delta"].get("fact_recall", 0.0), s["delta"].get("chrf", 0.0)))


def write_outputs(plan: Plan, metrics: dict, samples: list[dict]) -> dict[str, Path]:
    from .html_report import render_report
    from .report import loss_series

    out = plan.out_dir
    out.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": out / "metrics.json", "samples": out / "samples.jsonl", "report": out / "report.html"}
    paths["metrics"].write_text(json.dumps(metrics, indent=2, ensure_ascii=False, default=_json_default), encoding="utf-8")
    with open(paths["samples"], "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s, ensure_ascii=False, default=_json_default) + "\n")
    html = render_report(metrics, regression_order(samples), loss_series(plan.loss_events))
    paths["report"].write_text(html, encoding="utf-8")
    return paths


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def _fmt(name: str, value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if name in ("chrf", "rouge_l", "bleu"):
        return f"{value:.1f}"
    if name == "perplexity":
        return f"{value:.2f}"
    return f"{value:.2f}" if name != "loops" else str(value)


def ljust(text: str, width: int) -> str:
    """Pad for a terminal, where Hangul takes two columns."""
    shown = sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)
    return text + " " * max(0, width - shown)


def summary_lines(metrics: dict) -> list[str]:
    base, tuned = metrics["base"], metrics["tuned"]
    lines = [f"{'':<20}{'base':>10}{'tuned':>10}{'change':>10}"]
    for v in verdict(base, tuned):
        change = (f"{100 * v['change']:+.0f}%" if v["metric"] == "perplexity"
                  else f"{v['change']:+.1f}" if v["metric"] in ("chrf", "rouge_l", "bleu") else f"{v['change']:+.2f}")
        lines.append(f"{v['label']:<20}{_fmt(v['metric'], v['base']):>10}{_fmt(v['metric'], v['tuned']):>10}"
                     f"{change:>10}  {v['result']}")
    ratio = (_fmt("length_ratio", base.get("length_ratio")), _fmt("length_ratio", tuned.get("length_ratio")))
    lines.append(f"{'length / reference':<20}{ratio[0]:>10}{ratio[1]:>10}")
    for key in ("by_category", "by_difficulty"):
        groups = tuned.get(key)
        if not groups:
            continue
        lines.append(f"{key[3:]:<20}{'n':>4}{'chrF b→t':>16}{'facts b→t':>16}{'ppl b→t':>16}")
        for g, t in groups.items():
            b = base[key][g]
            lines.append(f"  {ljust(g, 18)}{t['n']:>4}{_fmt('chrf', b['chrf']) + '→' + _fmt('chrf', t['chrf']):>16}"
                         f"{_fmt('fact_recall', b['fact_recall']) + '→' + _fmt('fact_recall', t['fact_recall']):>16}"
                         f"{_fmt('perplexity', b['perplexity']) + '→' + _fmt('perplexity', t['perplexity']):>16}")
    return lines


def run(args) -> int:
    gen = gen_config(args)
    plan = make_plan(args)
    t0 = time.time()
    metrics, samples = evaluate(plan, gen, args.batch_size, use_cache=not args.no_cache)
    metrics["timing"]["total_s"] = round(time.time() - t0, 1)
    paths = write_outputs(plan, metrics, samples)
    sides = metrics["sides"]
    print(f"eval: {metrics['data']['n']} questions from {metrics['data']['source']}; "
          f"base = {sides['base']['label']}, tuned = {sides['tuned']['label']}")
    for line in summary_lines(metrics):
        print(line)
    for warning in metrics["warnings"]:
        print(f"warning: {warning}")
    print(f"({metrics['timing']['total_s']:.0f} s) report: {paths['report']}")
    print(f"metrics: {paths['metrics']}, samples: {paths['samples']}")
    return 0


# =========================================================================== after training
def health_check(model, tokenizer, cfg, examples, gen=None) -> list[str]:
    """Answer a handful of (validation) questions with the freshly trained adapter and return
    warnings for answers that never end with EOS or that loop, each with its likely cause.
    An empty list means the answers looked healthy."""
    from .chat import GenConfig

    if not examples:
        return []
    gen = gen or GenConfig(max_new_tokens=192, repetition_penalty=1.0)
    was_training = model.training
    model.eval()
    try:
        generations, _ = generate_answers(model, tokenizer, cfg, examples, gen, batch_size=len(examples))
    finally:
        model.train(was_training)
    rows = [{"eos": g.stopped, "loop": find_loop(g.text),
             "answer_tokens": len(tokenizer(ex.answer, add_special_tokens=False).input_ids) + 1}
            for ex, g in zip(examples, generations)]
    return health_warnings(rows, gen, cfg, "health check")
