"""BM25's length normalisation b on the bundled data, with the expansion kolora trains with.

    PYTHONPATH=src .venv/bin/python bench/bm25_b.py [--b 0.2,0.35,0.5,0.75] [--k1 1.5] [--tokenizer char2]

Same split as bench/retrieval_recall.py (each seed shuffles data/civil_law_qa.csv and holds out
20%), but each article is expanded as `kolora.grounding` does it: with the question AND the answer
of every training row citing it, plus the rows of data/civil_law_articles.csv (the demo's
retrieval.expand_with). Prints recall@1/3/5 of the cited articles, mean over seeds 42,1,2,3,4.
The result chose retrieval.bm25_b (bench/RETRIEVAL.md)."""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from retrieval_recall import split  # noqa: E402  (the same seeds and hold-out)

from kolora import retrieval  # noqa: E402
from kolora.corpus import CitationReader, cited_passages, load_corpus  # noqa: E402
from kolora.data import load_examples  # noqa: E402
from kolora.grounding import _expansions  # noqa: E402  (the expansion training builds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--b", default="0.2,0.35,0.5,0.75")
    ap.add_argument("--k1", type=float, default=1.5)
    ap.add_argument("--tokenizer", default="char2")
    ap.add_argument("--seeds", default="42,1,2,3,4")
    args = ap.parse_args()
    corpus = load_corpus([ROOT / "data" / "statutes"])
    reader = CitationReader(corpus)

    def rows(name: str):  # (example, the corpus passages its answer cites)
        examples, _ = load_examples(str(ROOT / "data" / name))
        return [(e, cited_passages(e.answer, reader, reader.last_named(e.question))) for e in examples]

    qa, article_index = rows("civil_law_qa.csv"), rows("civil_law_articles.csv")
    bs = [float(x) for x in args.b.split(",")]
    results: dict[float, list[dict]] = {b: [] for b in bs}
    for seed in (int(s) for s in args.seeds.split(",")):
        train, held = split(qa, seed)
        expanding = train + article_index
        expansions = _expansions([g for _, g in expanding], [e for e, _ in expanding])
        for b in bs:
            index = retrieval.build_index(corpus, expansions, tokenizer=args.tokenizer, k1=args.k1, b=b)
            results[b].append(retrieval.recall_at_k(index, [e.question for e, _ in held], [g for _, g in held], (1, 3, 5)))
    print(f"| b (k1 {args.k1}, {args.tokenizer}) | recall@1 | recall@3 | recall@5 |\n|---|---|---|---|")
    for b, rs in results.items():
        print(f"| {b} | " + " | ".join(f"{statistics.mean(r[f'recall@{k}'] for r in rs):.3f}" for k in (1, 3, 5)) + " |")


if __name__ == "__main__":
    main()
