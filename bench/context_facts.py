"""How many of the reference answers' facts the model can see in its retrieved context.

For each test question of a grounded run: retrieve as answering does, render the passages as
the prompt holds them, and count the reference's facts (kolora.facts: article, paragraph,
period, amount, …) that are visible there: an article when one of the passages is that article,
a paragraph when that article's paragraph is in the rendered text ('제N항 …', or '②' in older
layouts), a number when the context states that value. This is the ceiling of fact recall for a
model that copies perfectly from its passages.

It also counts, for the references that cite a paragraph ('제N조 제M항') of a shown article with
several paragraphs, how often 제M항 is the first paragraph under that article's header: a small
model copies the first label it sees (bench/HISTORY.md session 34).

    python bench/context_facts.py runs/demo [--k 3 --context-tokens 240] [--split test]

To measure another commit's layout, put its src first:
    git worktree add /tmp/old <commit> && PYTHONPATH=/tmp/old/src python bench/context_facts.py runs/demo
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from transformers import AutoTokenizer

from kolora import grounding
from kolora.citations import _value, _values
from kolora.config import load_yaml
from kolora.facts import extract_facts

try:
    from kolora.corpus import paragraphs
except ImportError:  # before it moved from citations.py
    from kolora.citations import _paragraphs as paragraphs

CIRCLED = "①②③④⑤⑥⑦⑧⑨⑩⑪⑫⑬⑭⑮⑯⑰⑱⑲⑳"
REF = re.compile(r"(제\d+조(?:의\d+)?)(?: 제(\d+)항)?(?: 제\d+호)?")


def visible(fact: str, passages, context: str) -> bool:
    m = REF.fullmatch(fact)
    if not m:
        return _value(fact) in _values(context)
    articles = [p for p in passages if p.article == m[1]]
    if not articles or not m[2]:
        return bool(articles)
    n = int(m[2])
    for p in articles:
        if not paragraphs(p.text):
            if n == 1:
                return True
        elif f"\n제{n}항 " in context or (n <= 20 and CIRCLED[n - 1] in context):
            return True
    return False


def first_label(fact: str, passages, context: str) -> bool | None:
    """Whether a paragraph fact's paragraph opens its article in the context; None when the fact
    is not a paragraph of a shown article that has several paragraphs."""
    m = REF.fullmatch(fact)
    if not m or not m[2]:
        return None
    for p in passages:
        if p.article == m[1] and len(paragraphs(p.text)) > 1:
            block = context.split(f"[{p.header}]\n", 1)
            if len(block) < 2:
                return None
            line = next((x for x in block[1].split("\n") if x != "…"), "")  # '…': paragraphs left out
            return line.startswith(f"제{m[2]}항 ") or line.startswith(CIRCLED[int(m[2]) - 1])
    return None


def render(passages, tokenizer, budget: int, question: str) -> str:
    try:
        return grounding.render_context(passages, tokenizer, budget, question)
    except TypeError:  # layouts before the question-aware one took no question
        return grounding.render_context(passages, tokenizer, budget)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--k", type=int, default=0, help="passages (0 = the run's retrieval.k)")
    ap.add_argument("--context-tokens", type=int, default=0, help="budget (0 = the run's)")
    ap.add_argument("--split", default="test")
    a = ap.parse_args()
    run = Path(a.run)
    cfg = load_yaml(run / "config.yaml")
    g = grounding.load(run, cfg)
    k, budget = a.k or cfg.retrieval.k, a.context_tokens or cfg.retrieval.context_tokens
    tok = AutoTokenizer.from_pretrained(run / "tokenizer")
    rows = [json.loads(line) for line in open(run / "data" / f"{a.split}.jsonl", encoding="utf-8")]
    facts = seen = tokens = firsts = first_right = 0
    for r in rows:
        passages = [h.passage for h in g.index.search(r["question"], k)]
        context = render(passages, tok, budget, r["question"])
        tokens += len(tok(context, add_special_tokens=False).input_ids)
        for f in extract_facts(r["answer"]):
            facts += 1
            seen += visible(f, passages, context)
            right = first_label(f, passages, context)
            if right is not None:
                firsts += 1
                first_right += right
    print(f"{run} {a.split}: k {k}, {budget} context tokens: {seen}/{facts} reference facts visible "
          f"({seen / facts:.2f}), mean context {tokens / len(rows):.0f} tokens; the cited paragraph opens its "
          f"article for {first_right}/{firsts} paragraph references")


if __name__ == "__main__":
    main()
