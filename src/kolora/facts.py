"""Facts in a legal answer: statute references and quantities, normalised so that two
answers that say the same thing compare equal.

Fact recall (`kolora eval`), the fact-weighted training loss (`train.fact_weight`) and the
citation check read the same patterns, so what training weights is what evaluation counts.

Law names are deliberately not part of a fact: answers and references alike elide them
("같은 법", "시행령", "이 법"), and the article number is what people get wrong.
"""

from __future__ import annotations

import re
import unicodedata

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
