"""Retrieval recall on the bundled data: does BM25 find the article an answer cites?

Not part of the test suite. Usage (from the repository root):

    PYTHONPATH=src .venv/bin/python bench/retrieval_recall.py                  # seeds 42,1,2,3,4
    PYTHONPATH=src .venv/bin/python bench/retrieval_recall.py --seeds 42 --ablation

Corpus: data/statutes (one passage per article). Questions: data/civil_law_qa.csv; the gold
passages of a question are the articles its answer cites (kolora.corpus.cited_passages;
citations of laws outside the corpus are not gold). Each seed shuffles the QA rows and holds
out 20%; recall is measured on that 20% only. Document expansion indexes each article with
the training 80% questions citing it plus every row of data/civil_law_articles.csv (an
article index that is training-only in the demo), never a held-out question.

recall@k: share of a question's cited articles in the top k, averaged over questions;
hit@k: share of questions with at least one cited article in the top k.
`--ablation` adds Kiwi variants: article markers left to Kiwi ('제3조의2' → 제/3/조/의/2).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from kolora import retrieval  # noqa: E402
from kolora.citations import check_answer, summarize  # noqa: E402
from kolora.corpus import CitationReader, cited_passages, load_corpus  # noqa: E402
from kolora.data import load_examples  # noqa: E402

KS = (1, 3, 5, 10)


def gold_rows(path: Path, reader: CitationReader) -> list[tuple[str, list[str]]]:
    examples, _ = load_examples(str(path))
    return [(ex.question, cited_passages(ex.answer, reader)) for ex in examples]


def split(rows: list, seed: int, held_out: float = 0.2) -> tuple[list, list]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    cut = round(len(rows) * (1 - held_out))
    return [rows[i] for i in order[:cut]], [rows[i] for i in order[cut:]]


def expansions(rows: list[tuple[str, list[str]]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for question, gold in rows:
        for pid in gold:
            out.setdefault(pid, []).append(question)
    return out


def reference_citations(path: Path, corpus) -> dict:
    """How well the citation reader and checker do on the hand-checked reference answers."""
    examples, _ = load_examples(str(path))
    reader = corpus.reader()
    cites = [reader.find(ex.answer, default_law=reader.last_named(ex.question)) for ex in examples]
    flat = [c for cs in cites for c in cs]
    return {"rows": len(examples), "rows_all_resolved": sum(bool(cs) and all(c.passage_id for c in cs) for cs in cites),
            "citations": len(flat), "citations_resolved": sum(bool(c.passage_id) for c in flat),
            "outside_corpus": sum(1 for c in flat if not c.passage_id and c.law not in corpus.laws()),
            "check": summarize([check_answer(ex.answer, ex.question, corpus) for ex in examples])}


def lengths(corpus) -> dict:
    def stats(values: list[int]) -> dict:
        values = sorted(values)
        return {"median": statistics.median(values), "p90": values[int(0.9 * (len(values) - 1))],
                "max": values[-1], "mean": round(statistics.mean(values), 1)}

    live = [p for p in corpus.passages if not p.deleted]
    return {"articles": len(live), "text_chars": stats([len(p.text) for p in live]),
            "header_plus_text_chars": stats([len(p.header) + 1 + len(p.text) for p in live])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="42,1,2,3,4")
    ap.add_argument("--ablation", action="store_true", help="also Kiwi with article markers split by Kiwi")
    ap.add_argument("--json", type=Path, help="write all figures here")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]

    corpus = load_corpus([ROOT / "data" / "statutes"])
    reader = CitationReader(corpus)
    qa = gold_rows(ROOT / "data" / "civil_law_qa.csv", reader)
    index_rows = gold_rows(ROOT / "data" / "civil_law_articles.csv", reader)
    print(f"corpus: {len(corpus)} articles; QA rows {len(qa)} ({sum(1 for _, g in qa if not g)} without a "
          f"cited corpus article); article-index rows {len(index_rows)}")
    citations = {name: reference_citations(ROOT / "data" / name, corpus)
                 for name in ("civil_law_qa.csv", "civil_law_articles.csv")}
    for name, c in citations.items():
        print(f"{name}: rows whose cited articles all resolve to a passage {c['rows_all_resolved']}/{c['rows']}, "
              f"citations resolved {c['citations_resolved']}/{c['citations']} (unresolved: laws outside the corpus "
              f"{c['outside_corpus']}); checker on the reference answers: {json.dumps(c['check'])}")

    configs = [("plain", "kiwi"), ("plain", "char2"), ("expansion", "kiwi"), ("expansion", "char2")]
    if args.ablation:
        configs += [("plain", "kiwi-split-markers"), ("expansion", "kiwi-split-markers")]
    results: dict[str, list[dict]] = {f"{mode} {tok}": [] for mode, tok in configs}
    timings: dict[str, float] = {}
    for seed in seeds:
        train, held = split(qa, seed)
        exp = expansions(train + index_rows)
        questions, gold = [q for q, _ in held], [g for _, g in held]
        for mode, tok in configs:
            name = f"{mode} {tok}"
            t = time.perf_counter()
            with markers_split(tok.endswith("split-markers")):
                index = retrieval.build_index(corpus, exp if mode == "expansion" else None, tokenizer=tok.split("-")[0])
                r = retrieval.recall_at_k(index, questions, gold, KS)
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - t
            r["seed"] = seed
            results[name].append(r)
            print(f"seed {seed:>3} {name:<28} " + " ".join(f"R@{k} {r[f'recall@{k}']:.3f}" for k in KS)
                  + f"  (n={r['questions']})", flush=True)

    print("\nmean over seeds " + ",".join(map(str, seeds)) + f" (held-out 20% = {results[f'{configs[0][0]} {configs[0][1]}'][0]['questions']} questions per seed)")
    print("| setting | " + " | ".join(f"recall@{k}" for k in KS) + " | " + " | ".join(f"hit@{k}" for k in KS) + " |")
    print("|---" * (1 + 2 * len(KS)) + "|")
    summary = {}
    for name, rs in results.items():
        mean = {key: statistics.mean(r[key] for r in rs) for key in rs[0] if key.startswith(("recall@", "hit@"))}
        spread = {key: (min(r[key] for r in rs), max(r[key] for r in rs)) for key in mean}
        summary[name] = {"mean": mean, "min_max": spread, "per_seed": rs}
        print(f"| {name} | " + " | ".join(f"{mean[f'recall@{k}']:.3f}" for k in KS) + " | "
              + " | ".join(f"{mean[f'hit@{k}']:.3f}" for k in KS) + " |")
    lens = lengths(corpus)
    print(f"\narticle lengths in characters ({lens['articles']} articles, repealed ones excluded): "
          f"text {lens['text_chars']}; header + text {lens['header_plus_text_chars']}")
    print("seconds per setting, all seeds (build + search, Kiwi tokens cached after the first build): "
          + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "lengths": lens, "seeds": seeds, "citations": citations},
                                        ensure_ascii=False,
                                        indent=1), encoding="utf-8")


class markers_split:
    """Ablation: let Kiwi split article markers like any text (no single '제3조의2' token)."""

    def __init__(self, active: bool):
        self.active = active

    def __enter__(self):
        if self.active:
            self.saved = retrieval._articles
            retrieval._articles = lambda text: (retrieval._PARAGRAPH.sub(" ", text), [])
            retrieval._tokens.cache_clear()

    def __exit__(self, *exc):
        if self.active:
            retrieval._articles = self.saved
            retrieval._tokens.cache_clear()


if __name__ == "__main__":
    main()
