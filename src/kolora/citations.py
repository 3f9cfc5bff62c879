"""Is an answer grounded? The articles it cites exist, and the numbers it states are in them.

A fine-tuned small model answers in the form it learned — "주택임대차보호법 제3조의2 제1항에
따라 …" — and gets article numbers and figures wrong far more often than the form. Two checks
catch most of that without a model:

- citations: every article the answer cites exists in the grounding corpus (not repealed, and
  the paragraph/item exists). A citation of a law the corpus does not hold cannot be checked
  and does not count as valid; it is listed in `unverifiable`, apart from wrong citations.
- numbers: every period, amount, fraction, percentage and count the answer states appears in
  a cited article, in the question, or in the context passages the model was shown. Both
  sides go through the same fact normalisation as `kolora eval` ('6월' = '6개월', '1억 원' =
  '100,000,000원'), and equal values match across forms ('10분의 1' = '10%', '1년' = '12개월'),
  since statutes and answers write numbers differently.

A worked example ('80만원 × 20분의 1 = 4만원') is unsupported by this definition: the
report names it so a person can check the arithmetic. No torch, no model.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from fractions import Fraction

from .corpus import Citation, Corpus, Passage, paragraphs

# The fact patterns are shared with `kolora eval` (fact recall) so both count the same facts.
# They will move to kolora.facts; this is the one place citations.py imports them from.
from .facts import extract_facts, normalize, quantities, statute_refs, won  # noqa: F401

OK = "ok"


@dataclass
class CitedArticle:
    ref: str  # '주택임대차보호법 제3조의2 제1항'
    passage_id: str | None
    status: str  # ok | no such article | repealed | no such paragraph | no such item | law not in corpus | no law named

    @property
    def ok(self) -> bool:
        return self.status == OK


@dataclass
class StatedNumber:
    value: str  # normalised: '2년', '100,000,000원', '1/10', '5%'
    source: str | None  # where it was found: a passage id, 'question' or 'context'; None: nowhere

    @property
    def supported(self) -> bool:
        return self.source is not None


@dataclass
class CitationReport:
    citations: list[CitedArticle] = field(default_factory=list)
    numbers: list[StatedNumber] = field(default_factory=list)

    @property
    def cites(self) -> bool:
        return bool(self.citations)

    @property
    def citation_valid(self) -> bool:
        """Every cited article exists in the corpus (True for an answer citing nothing; see `cites`)."""
        return all(c.ok for c in self.citations)

    @property
    def wrong(self) -> list[str]:
        """Citations the corpus shows to be wrong: its law is in the corpus, the article is not."""
        return [f"{c.ref}: {c.status}" for c in self.citations if not c.ok and c.status not in _UNCHECKABLE]

    @property
    def unverifiable(self) -> list[str]:
        return [f"{c.ref}: {c.status}" for c in self.citations if c.status in _UNCHECKABLE]

    @property
    def facts_supported(self) -> bool:
        """Every stated number is in a cited article, the question or the context."""
        return all(n.supported for n in self.numbers)

    @property
    def unsupported(self) -> list[str]:
        """What a reader should check, one line each: bad citations and unsupported numbers. A claim
        an answer repeats (a looping answer cites the same missing article again and again) is one
        line with its count, so chat, the server and the report do not print it ten times."""
        lines = [f"citation {c.ref}: {c.status}" for c in self.citations if not c.ok]
        lines += [f"number {n.value}: not in the cited articles or the question" for n in self.numbers if not n.supported]
        return [line if n == 1 else f"{line} (×{n})" for line, n in Counter(lines).items()]  # first-seen order

    def to_json(self) -> dict:
        return {"citations": [asdict(c) for c in self.citations], "numbers": [asdict(n) for n in self.numbers],
                "citation_valid": self.citation_valid, "facts_supported": self.facts_supported,
                "unsupported": self.unsupported}


_UNCHECKABLE = ("law not in corpus", "no law named")


# =========================================================================== checking
def check_answer(answer: str, question: str, corpus: Corpus,
                 context: Iterable[Passage | str] | None = None) -> CitationReport:
    """Check one answer. `context`: the passages the model was shown (Passage objects, corpus
    passage ids or plain text); a number found there counts as supported too. An article
    number without a law name resolves to the law named last in the answer, else in the question."""
    reader = corpus.reader()
    cites = reader.find(answer, default_law=reader.last_named(question))
    report = CitationReport([_check_citation(c, corpus) for c in cites])

    sources: list[tuple[str, set]] = []
    for c in cites:
        p = corpus.get(c.passage_id) if c.passage_id else None
        if p is not None and not p.deleted and all(name != p.id for name, _ in sources):
            sources.append((p.id, _values(p.text)))
    sources.append(("question", _values(question)))
    if context:
        texts = [c.text if isinstance(c, Passage) else (corpus.get(c).text if corpus.get(c) else c) for c in context]
        sources.append(("context", set().union(*(_values(t) for t in texts))))
    for fact in dict.fromkeys(quantities(normalize(answer))):
        key = _value(fact)
        report.numbers.append(StatedNumber(fact, next((name for name, vals in sources if key in vals), None)))
    return report


def _check_citation(c: Citation, corpus: Corpus) -> CitedArticle:
    if c.law is None:
        return CitedArticle(c.ref, None, "no law named")
    if not c.passage_id:
        known = c.law in corpus.laws()
        return CitedArticle(c.ref, None, "no such article" if known else "law not in corpus")
    p = corpus.get(c.passage_id)
    if p.deleted:
        return CitedArticle(c.ref, p.id, "repealed")
    paras = paragraphs(p.text)
    if c.paragraph and c.paragraph > max(len(paras), 1):
        return CitedArticle(c.ref, p.id, "no such paragraph")
    if c.item:
        where = paras[c.paragraph - 1] if c.paragraph and paras else p.text
        if not re.search(rf"^\s*{c.item}\.", where, re.M):
            return CitedArticle(c.ref, p.id, "no such item")
    return CitedArticle(c.ref, p.id, OK)


# --------------------------------------------------------------------------- numbers
_PERIOD_FACT = re.compile(r"^(\d+(?:\.\d+)?)(개월|년|주|일|시간)$")
_IN_MONTHS = {"년": (12, "개월"), "개월": (1, "개월"), "주": (7, "일"), "일": (1, "일"), "시간": (1, "시간")}


def _value(fact: str) -> tuple:
    """A comparable value for a normalised fact: '1년' and '12개월' are equal, so are '1/10'
    and '10%'; anything else compares as written."""
    m = _PERIOD_FACT.match(fact)
    if m:
        factor, unit = _IN_MONTHS[m[2]]
        return ("period", Fraction(m[1]) * factor, unit)
    if fact.endswith("원"):
        return ("money", int(fact[:-1].replace(",", "")))
    if re.fullmatch(r"\d+/\d+", fact):
        b, a = map(int, fact.split("/"))
        return ("ratio", Fraction(b, a)) if a else ("text", fact)
    if re.fullmatch(r"\d+(?:\.\d+)?%", fact):
        return ("ratio", Fraction(fact[:-1]) / 100)
    return ("text", fact)


def _values(text: str) -> set:
    return {_value(f) for f in quantities(normalize(text))}


# =========================================================================== aggregates
def summarize(reports: list[CitationReport]) -> dict:
    """Shares over many answers: answers citing anything, answers whose citations are all
    valid (of those citing), answers with a citation the corpus shows wrong, and stated
    numbers supported (micro average, and answers with every number supported)."""
    n = len(reports)
    citing = [r for r in reports if r.cites]
    with_numbers = [r for r in reports if r.numbers]
    numbers = [x for r in reports for x in r.numbers]
    cites = [c for r in reports for c in r.citations]

    def share(part: int, whole: int) -> float | None:
        return round(part / whole, 4) if whole else None

    return {
        "answers": n,
        "citing": share(len(citing), n),
        "citations": len(cites),
        "citations_ok": share(sum(c.ok for c in cites), len(cites)),
        "answers_citations_valid": share(sum(r.citation_valid for r in citing), len(citing)),
        "answers_with_wrong_citation": share(sum(bool(r.wrong) for r in reports), n),
        "numbers": len(numbers),
        "numbers_supported": share(sum(x.supported for x in numbers), len(numbers)),
        "answers_numbers_supported": share(sum(r.facts_supported for r in with_numbers), len(with_numbers)),
    }
