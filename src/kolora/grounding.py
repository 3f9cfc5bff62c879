"""Grounded answers: retrieve the statute text, put it before the question, cite it.

A 270M model does not memorise 169 articles through LoRA ("LoRA learns the style, not the
facts"), so a grounded run gives it the article text at training and at answer time and
trains it to answer from that text (RAFT, Zhang et al. 2024):

- the corpus (`retrieval.corpus`: statutes split at 제N조, or JSONL passages) is indexed with
  BM25, each passage together with the training rows (question and answer) whose answers cite
  it (document expansion; measured on the demo split, char bigrams: recall@3 of the cited
  article 0.53 plain → 0.80 with the questions → 0.85 with questions and answers); the index is saved in the run (`<run>/index/`), so chat, eval and serve
  retrieve exactly what training did, and refuse a corpus that changed since;
- training rows get their passages from an index that does not hold their own question
  (5-fold cross-fitting): otherwise a training question would always find its own article
  through its own expansion, and the model would never see the misses it meets at test time;
- in a share `retrieval.oracle_p` of training rows the cited article is put among the k
  passages at a random position when retrieval missed it (seeded per row, so a resumed run
  sees the same prompts); the rest keep retrieval as it came, distractors only;
- the passages fill a token budget (`retrieval.context_tokens`); a long article keeps the
  paragraphs nearest the question, each labelled '제N항' as answers cite it. Context tokens
  are prompt tokens: they never carry labels.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from .citations import check_answer
from .config import RunConfig
from .corpus import CIRCLED, Corpus, Passage, cited_passages, load_corpus, paragraphs
from .data import Example
from .errors import KoloraError
from .retrieval import Hit, Index, build_index, recall_at_k, tokenize

INDEX_DIR = "index"
FOLDS = 5
NO_SOURCES = "(검색된 조문 없음)"  # what the prompt says when retrieval finds nothing


@dataclass
class Grounding:
    corpus: Corpus
    index: Index  # over all training questions: what answering uses
    k: int
    context_tokens: int
    extra: list = field(default_factory=list)  # retrieval.expand_with rows: index expansion only
    train: list = field(default_factory=list)  # the training rows the index was built from
    rows_cited: list = field(default_factory=list)  # cited passage ids of train + extra, in that order

    # ------------------------------------------------------------------ answering
    def retrieve(self, question: str) -> list[Hit]:
        return self.index.search(question, self.k)

    def ground(self, examples: list[Example], tokenizer) -> tuple[list[Example], list[list[Hit]]]:
        """The examples with their retrieved passages as context, and the hits (the sources)."""
        hits = [self.retrieve(ex.question) for ex in examples]
        return [with_context(ex, h, tokenizer, self.context_tokens) for ex, h in zip(examples, hits)], hits

    def cited(self, examples: list[Example]) -> list[list[str]]:
        """The corpus passages each example's answer cites (the oracle of RAFT)."""
        reader = self.corpus.reader()
        return [cited_passages(ex.answer, reader, reader.last_named(ex.question)) for ex in examples]

    def recall(self, examples: list[Example]) -> dict:
        """recall@1/3/5 and @k (the k answering uses) of the cited article over examples whose
        answers cite one."""
        return recall_at_k(self.index, [ex.question for ex in examples], self.cited(examples),
                           ks=tuple(sorted({1, 3, 5, self.k})))

    def check(self, answer: str, question: str, hits: list[Hit]):
        return check_answer(answer, question, self.corpus, [h.passage for h in hits])

    def save(self, run_path: Path) -> Path:
        return self.index.save(Path(run_path) / INDEX_DIR)


def corpus_paths(cfg: RunConfig) -> list[str]:
    paths = cfg.retrieval.corpus
    return [paths] if isinstance(paths, str) else list(paths or [])


def build(cfg: RunConfig, train: list[Example], held_out: list[Example] = ()) -> Grounding:
    """Load the corpus and index it, expanded with the training questions and the questions of
    retrieval.expand_with (never a held-out question)."""
    r = cfg.retrieval
    if r.k < 1 or r.context_tokens < 16 or not 0 <= r.oracle_p <= 1 or not 0 <= r.bm25_b <= 1:
        raise KoloraError(f"retrieval.k {r.k}, retrieval.context_tokens {r.context_tokens}, retrieval.oracle_p {r.oracle_p}, "
                          f"retrieval.bm25_b {r.bm25_b}", "k ≥ 1, context_tokens ≥ 16, 0 ≤ oracle_p ≤ 1 and 0 ≤ bm25_b ≤ 1")
    corpus = load_corpus(corpus_paths(cfg))
    g = Grounding(corpus, None, r.k, r.context_tokens)
    g.extra = expansion_rows(cfg, held_out, corpus.report)
    g.train = train
    rows = list(train) + g.extra
    g.rows_cited = g.cited(rows)  # ground_training reuses it for its folds
    g.index = build_index(corpus, _expansions(g.rows_cited, rows) if r.expand else None, r.tokenizer, b=r.bm25_b)
    return g


def expansion_rows(cfg: RunConfig, held_out: list[Example], report: list[str]) -> list[Example]:
    """The rows of retrieval.expand_with, less any whose question is a held-out question or a
    near-duplicate of one (it would carry that question's article into the index: a leak; the
    same rule and threshold as data.train_only), counted in `report`."""
    from .data import NEAR_DUPLICATE, _nearest_held_out, load_examples, normalise_question

    held = {normalise_question(ex.question) for ex in held_out}
    rows = []
    for path in cfg.retrieval.expand_with or []:
        examples, _ = load_examples(path)
        keys = [normalise_question(ex.question) for ex in examples]
        near = _nearest_held_out(keys, list(held_out)) if held_out else [(0.0, None)] * len(examples)
        dropped = [ex for ex, key, (score, _) in zip(examples, keys, near) if key in held or score >= NEAR_DUPLICATE]
        kept = [ex for ex in examples if ex not in dropped]
        report.append(f"{path}: {len(kept)} questions expand the index (not trained on)"
                      + (f"; {len(dropped)} dropped as the same as or a near-duplicate of a held-out question "
                         f"(lines {', '.join(str(ex.line) for ex in dropped)})" if dropped else ""))
        rows += kept
    return rows


def _expansions(cited: list[list[str]], examples: list[Example], skip=lambda i: False) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for i, (ids, ex) in enumerate(zip(cited, examples)):
        if skip(i):
            continue
        for pid in ids:  # the answer too: its wording ties the question's words to the article's
            out.setdefault(pid, []).extend([ex.question, ex.answer])
    return out


def load(run_path: Path, cfg: RunConfig) -> Grounding | None:
    """The run's saved index, checked against the corpus it names (None for an ungrounded run)."""
    if not corpus_paths(cfg):
        return None
    directory = Path(run_path) / INDEX_DIR
    if not directory.is_dir():
        raise KoloraError(f"{run_path} was trained with retrieval.corpus but has no {INDEX_DIR}/ directory",
                          "train it again; the index is written before the model loads")
    corpus = load_corpus(corpus_paths(cfg))
    index = Index.load(directory, corpus)  # refuses a corpus changed since training, naming the file
    return Grounding(corpus, index, cfg.retrieval.k, cfg.retrieval.context_tokens)


def ground_training(g: Grounding, cfg: RunConfig, train: list[Example], tokenizer) -> tuple[list[Example], dict]:
    """Training rows with context: cross-fitted retrieval, then RAFT's oracle rule. Returns the
    rows and counts for the report."""
    r = cfg.retrieval
    rows = list(train) + g.extra
    # the citations `build` resolved for these very rows (resolving them again when called on other rows)
    cited_rows = g.rows_cited if len(g.rows_cited) == len(rows) and train is g.train else g.cited(rows)
    cited = cited_rows[:len(train)]
    folds = []
    for f in range(FOLDS):  # index f holds the expansions of every training row outside fold f (and expand_with)
        expansions = (_expansions(cited_rows, rows, skip=lambda i, f=f: i < len(train) and i % FOLDS == f)
                      if r.expand else None)
        folds.append(build_index(g.corpus, expansions, r.tokenizer, b=r.bm25_b))
    out, counts = [], {"rows": len(train), "citing": 0, "retrieved": 0, "inserted": 0, "missed": 0}
    for i, (ex, ids) in enumerate(zip(train, cited)):
        hits = folds[i % FOLDS].search(ex.question, r.k)
        rng = random.Random(cfg.train.seed * 1_000_003 + i)  # per row: independent of every other row
        draw, position = rng.random(), rng.randrange(r.k)
        if ids:
            counts["citing"] += 1
            if any(h.passage.id in ids for h in hits):
                counts["retrieved"] += 1
            elif draw < r.oracle_p:
                oracle = Hit(g.corpus.get(ids[0]), 0.0, 0)
                hits = hits[:r.k - 1]
                hits.insert(min(position, len(hits)), oracle)
                counts["inserted"] += 1
            else:
                counts["missed"] += 1
        out.append(with_context(ex, hits, tokenizer, r.context_tokens))
    return out, counts


# --------------------------------------------------------------------------- the context text
def ground_splits(cfg: RunConfig, splits: dict, tokenizer) -> tuple[Grounding, dict]:
    """Put retrieved passages before every question of the train / validation / test splits (in
    place), as training does: the index learns from the training rows only, training rows get the
    seeded oracle insertion, held-out rows are retrieved for as chat and eval will. Returns the
    grounding and ground_training's counts."""
    g = build(cfg, splits["train"], splits["validation"] + splits["test"])
    splits["train"], counts = ground_training(g, cfg, splits["train"], tokenizer)
    for name in ("validation", "test"):
        splits[name], _ = g.ground(splits[name], tokenizer)
    return g, counts


def with_context(ex: Example, hits: list[Hit], tokenizer, budget: int) -> Example:
    return replace(ex, context=render_context([h.passage for h in hits], tokenizer, budget, ex.question))


def render_context(passages: list[Passage], tokenizer, budget: int, question: str = "") -> str:
    """'[header]\\ntext' per passage, in rank order, within `budget` tokens in all. The budget is
    shared out like water: a short article takes what it needs and leaves the rest to the long
    ones (an equal third each left a quarter of the demo's budget unused)."""
    if not passages:
        return NO_SOURCES
    heads = [f"[{p.header}]" for p in passages]
    paras = [model_paragraphs(p) for p in passages]
    sizes = [_size(tokenizer, "\n".join([h, *ps])) for h, ps in zip(heads, paras)]
    caps, left = [0] * len(passages), budget
    for n, i in enumerate(sorted(range(len(passages)), key=lambda i: sizes[i])):
        caps[i] = max(8, min(sizes[i], left // (len(passages) - n)))
        left -= caps[i]
    return "\n\n".join(_trimmed(h, ps, size, tokenizer, cap, question)
                       for h, ps, size, cap in zip(heads, paras, sizes, caps))


# '<개정 2013.8.13>', '[본조신설 2020.7.31]': amendment history, not law: tokens the answer never uses
_AMENDMENT = re.compile(r"\s*(?:<(?:개정|신설|전문개정|타법개정)[^>]*>|\[(?:본조신설|전문개정|종전)[^\]]*\])")
_SIZES: dict = {}


def _size(tokenizer, text: str) -> int:
    key = (getattr(tokenizer, "name_or_path", id(tokenizer)), len(tokenizer), text)
    if key not in _SIZES:
        if len(_SIZES) > 200_000:  # a long-running server: bounded
            _SIZES.clear()
        _SIZES[key] = len(tokenizer(text, add_special_tokens=False).input_ids)
    return _SIZES[key]


def model_paragraphs(p: Passage) -> list[str]:
    """The passage's paragraphs as the model reads them: '① …' becomes '제1항 …', the way answers
    cite it (a 270M model copies '제2항' from the text far more reliably than it maps '②' to it),
    and amendment notes are dropped. One element for an article without paragraph marks."""
    paras = paragraphs(p.text) or [p.text]
    out = []
    for text in paras:
        text = _AMENDMENT.sub("", text).strip()
        m = CIRCLED.match(text)
        if m:
            text = f"제{ord(m[1]) - 0x245F}항 {text[1:].lstrip()}"
        out.append(text)
    return out


def _trimmed(head: str, paras: list[str], size: int, tokenizer, cap: int, question: str = "") -> str:
    """A passage (its header line, its model_paragraphs, `size` tokens in all) within `cap` tokens.
    The whole article when it fits; else the paragraphs that share the most with the question
    (character bigrams, the retrieval tokenizer's), as many as fit, in the article's order with
    '…' where paragraphs were left out: a question about 제3조의3 제5항 must see 제5항, not the
    first paragraphs (measured on the demo's test split: the reference's facts visible in the
    context 0.42 with the first paragraphs → 0.58, `bench/context_facts.py`). When no paragraph
    fits whole, the first paragraph's first characters that do."""
    if size <= cap:
        return "\n".join([head, *paras])
    words = set(tokenize(question, "char2")) if question else set()

    def score(i: int) -> float:
        grams = set(tokenize(paras[i], "char2"))
        return len(words & grams) / (1 + len(grams)) ** 0.5

    ranked = sorted(range(len(paras)), key=lambda i: (-score(i), i))
    kept: list[int] = []
    for i in ranked:
        trial = sorted(kept + [i])
        if _size(tokenizer, _joined(head, paras, trial)) <= cap:
            kept = trial
    if kept:
        return _joined(head, paras, kept)
    best = paras[0]  # the article's main rule (validation split: 0.59 of the facts visible, 0.56 with the best-matching one)
    lo, hi = 0, len(best)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _size(tokenizer, f"{head}\n{best[:mid]} …") <= cap:
            lo = mid
        else:
            hi = mid - 1
    return f"{head}\n{best[:lo]} …"


def _joined(head: str, paras: list[str], kept: list[int]) -> str:
    lines, last = [head], -1
    for i in kept:
        if i != last + 1:
            lines.append("…")
        lines.append(paras[i])
        last = i
    if last != len(paras) - 1:
        lines.append("…")
    return "\n".join(lines)


def sources_line(hits: list[Hit], cited_ids: set[str] | None = None) -> str:
    """'근거: 주택임대차보호법 제3조의2(보증금의 회수), …' — the passages the answer cites when it
    cites any of them, else every passage it was given."""
    if not hits:
        return "근거: 검색된 조문 없음 (no sources found)"
    shown = [h for h in hits if cited_ids and h.passage.id in cited_ids] or hits
    return "근거: " + ", ".join(h.passage.header for h in shown)
