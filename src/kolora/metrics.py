"""Text metrics of an answer against its reference, torch-free: chrF, ROUGE-L, BLEU, fact
recall, EOS, distinct-2, loops, length; their aggregation overall and per group; the verdict
of base vs tuned; and the warnings for answers that never stop or that loop.

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

import math
import re
from collections import Counter

from .facts import fact_recall

# metric -> (higher is better, shown as). Also the fixed order of tables and charts.
METRICS = {
    "perplexity": (False, "answer perplexity"),
    "chrf": (True, "chrF"),
    "rouge_l": (True, "ROUGE-L"),
    "bleu": (True, "BLEU"),
    "fact_recall": (True, "fact recall"),
    "citation_valid": (True, "citations valid"),
    "facts_supported": (True, "facts supported"),
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
    "citation_valid": "grounded runs: share of answers citing an article whose every cited article exists in the corpus; "
                      "null when no answer cites one",
    "facts_supported": "grounded runs: share of the numbers answers state (periods, amounts, fractions, percentages, "
                       "counts) found in an article the answer cites, in the passages it was given, or in the question",
    "eos_rate": "share of answers that ended with EOS within max_new_tokens",
    "distinct_2": "unique / total word bigrams within an answer, mean over answers (1.0 = no bigram repeated)",
    "loop_rate": "share of answers with a loop: a word 4-gram occurring 3+ times, or one span of 4-50 characters "
                 "three times in a row",
    "length_ratio": "mean answer length / mean reference length, in non-space characters",
}


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
        **citation_block(rows),
    }


def citation_block(rows: list[dict]) -> dict:
    """citation_valid and facts_supported over rows that carry a citation check (grounded runs)."""
    checked = [r["citation"] for r in rows if r.get("citation")]
    if not checked:
        return {}
    citing = [c for c in checked if c["cites"]]
    numbers = sum(c["numbers"] for c in checked)
    return {"citation_valid": sum(c["citation_valid"] for c in citing) / len(citing) if citing else None,
            "citing": len(citing),
            "facts_supported": sum(c["supported"] for c in checked) / numbers if numbers else None,
            "numbers": numbers}


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
