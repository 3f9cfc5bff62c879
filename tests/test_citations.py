"""Citation checker: cited articles exist, stated numbers are in them. Bundled statutes, hand-written answers."""

from pathlib import Path

import pytest

from kolora.citations import check_answer, summarize
from kolora.corpus import load_corpus

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus():
    return load_corpus([ROOT / "data" / "statutes"])


def test_valid_answer(corpus):
    r = check_answer("민법 제312조 제1항에 따라 전세권의 존속기간은 10년을 넘지 못하고, 같은 조 제2항에 따라 건물은 1년 미만이면 "
                     "1년으로 봅니다.", "전세권은 몇 년까지 설정할 수 있나요?", corpus)
    assert [(c.ref, c.status) for c in r.citations] == [("민법 제312조 제1항", "ok")]
    assert r.citation_valid and r.facts_supported and r.unsupported == []
    assert [(n.value, n.source) for n in r.numbers] == [("10년", "민법 제312조"), ("1년", "민법 제312조")]


def test_nonexistent_and_repealed_articles(corpus):
    r = check_answer("민법 제9999조에 따라 가능하고, 민법 제436조와 민법 제312조 제9항도 같습니다.", "질문", corpus)
    assert [(c.ref, c.status) for c in r.citations] == [
        ("민법 제9999조", "no such article"), ("민법 제436조", "repealed"), ("민법 제312조 제9항", "no such paragraph")]
    assert not r.citation_valid and len(r.wrong) == 3
    assert "citation 민법 제9999조: no such article" in r.unsupported


def test_a_repeated_claim_is_one_line_with_its_count(corpus):
    # a looping answer cites the same missing article again and again: one line to check, not nine
    r = check_answer("민법 제9999조에 따라 " * 9 + "민법 제312조 제9항도 같습니다.", "질문", corpus)
    assert len(r.citations) == 10 and not r.citation_valid
    assert r.unsupported == ["citation 민법 제9999조: no such article (×9)", "citation 민법 제312조 제9항: no such paragraph"]


def test_law_outside_the_corpus_is_unverifiable_not_wrong(corpus):
    r = check_answer("소액사건심판법 제6조, 제7조가 준용됩니다.", "보증금 소송은?", corpus)
    assert [c.status for c in r.citations] == ["law not in corpus"] * 2
    assert not r.citation_valid and r.wrong == [] and len(r.unverifiable) == 2


def test_unsupported_number(corpus):
    r = check_answer("주택임대차보호법 제4조 제1항에 따라 기간을 정하지 않은 임대차는 3년으로 봅니다.", "계약기간을 안 정했어요", corpus)
    assert r.citation_valid
    assert not r.facts_supported
    assert r.unsupported == ["number 3년: not in the cited articles or the question"]


def test_numbers_written_differently_still_match(corpus):
    # statute: '약정한 차임등의 20분의 1의 금액을 초과하지 못한다' (제7조 제2항); the question gives 80만원
    r = check_answer("주택임대차보호법 제7조 제2항에 따라 증액은 5%를 넘지 못하니 80만원이면 최대 4만원이에요.",
                     "월세 80만원인데 얼마나 올릴 수 있나요?", corpus)
    by_value = {n.value: n.source for n in r.numbers}
    assert by_value["5%"] == "주택임대차보호법 제7조"  # 5% = 20분의 1
    assert by_value["800,000원"] == "question"
    assert by_value["40,000원"] is None  # a worked example: named for a person to check
    # a number shown in the context passages counts as supported
    ctx = check_answer("최대 4만원이에요.", "월세 80만원", corpus, context=["계산하면 4만원이다."])
    assert ctx.facts_supported and ctx.numbers[0].source == "context"


def test_article_without_law_name_uses_the_question(corpus):
    r = check_answer("제6조의3 제1항에 따라 계약갱신을 요구할 수 있어요.", "주택임대차보호법에서 갱신요구권은?", corpus)
    assert [(c.ref, c.status) for c in r.citations] == [("주택임대차보호법 제6조의3 제1항", "ok")]


def test_summary_over_answers(corpus):
    reports = [check_answer(a, "질문", corpus) for a in [
        "민법 제312조 제1항에 따라 10년을 넘지 못해요.",
        "민법 제9999조에 따라 3년이에요.",
        "그냥 그래요.",
    ]]
    s = summarize(reports)
    assert s["answers"] == 3 and s["citing"] == pytest.approx(2 / 3, abs=1e-3)
    assert s["answers_citations_valid"] == 0.5 and s["answers_with_wrong_citation"] == pytest.approx(1 / 3, abs=1e-3)
    assert s["numbers"] == 2 and s["numbers_supported"] == 0.5
    assert reports[0].to_json()["citation_valid"] is True
