"""`kolora retrieve RUN "질문"`: what a grounded run retrieves for a question — the top k
passages from the run's own index, with their BM25 scores, exactly as chat, eval and serve
will put them before the question."""

from __future__ import annotations

import json

from . import grounding
from .errors import KoloraError
from .runs import open_run

HELP = "show the passages a grounded run retrieves for a question, with scores"


def add_arguments(p) -> None:
    p.add_argument("run", help="run directory trained with retrieval.corpus")
    p.add_argument("question", help="the question, in quotes")
    p.add_argument("-k", type=int, default=None, help="how many passages (default: the run's retrieval.k)")
    p.add_argument("--full", action="store_true", help="print each passage's whole text")
    p.add_argument("--json", action="store_true", help="print the hits as JSON")


def run(args) -> int:
    run_dir = open_run(args.run, need_adapter=False)
    cfg = run_dir.config()
    g = grounding.load(run_dir.path, cfg)
    if g is None:
        raise KoloraError(f"{args.run} was trained without retrieval.corpus: it retrieves nothing",
                          "train with --retrieval.corpus data/statutes (see configs/gemma3-270m.yaml)")
    k = args.k or g.k
    if k < 1:
        raise KoloraError(f"-k {k}: must be at least 1")
    hits = g.index.search(args.question, k)
    if args.json:
        print(json.dumps([{"rank": h.rank, "id": h.passage.id, "header": h.passage.header, "score": round(h.score, 4),
                           "named": h.named, "text": h.passage.text} for h in hits], ensure_ascii=False, indent=1))
        return 0
    if not hits:
        print("no sources found (검색된 조문 없음): no word of the question occurs in the corpus")
        return 0
    for h in hits:
        how = "named in the question" if h.named else f"BM25 {h.score:.2f}"
        print(f"{h.rank}. {h.passage.header}  [{how}]")
        text = " ".join(h.passage.text.split())
        print(f"   {text if args.full else text[:160] + (' …' if len(text) > 160 else '')}")
    return 0
