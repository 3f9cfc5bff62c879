"""Grounding corpus: statute and JSONL parsing, bad input, fingerprints, citation reading."""

import json
from pathlib import Path

import pytest

from kolora.corpus import cited_passages, find_citations, load_corpus
from kolora.errors import KoloraError

ROOT = Path(__file__).resolve().parents[1]
STATUTES = ROOT / "data" / "statutes"

# The shape of the law.go.kr → legalize-kr Markdown: front matter, division headings,
# '##### 제N조 (제목)' articles, '**①**' paragraphs, escaped item numbers, a repealed article, 부칙.
STATUTE = """---
제목: 작은임대차법
공포일자: 2026-01-01
---

# 작은임대차법

## 제1장 총칙

##### 제1조 (목적)

이 법은 작은 집의 임대차를 정한다.

##### 제2조 (존속기간)

**①** 임대차의 존속기간은 2년으로 본다. <개정 2020.7.31>

**②** 임차인은 2년 미만으로 정한 기간이 유효함을 주장할 수 있다.

## 제2장 보증금

##### 제3조

삭제 <2015.2.3>

##### 제3조의2 (보증금의 회수)

**①** 임차인은 보증금을 돌려받을 때까지 집을 비우지 아니할 수 있다.

**②** 다음 각 호의 어느 하나에 해당하면 그러하지 아니하다.

  1\\. 차임을 3기 연체한 경우
  2\\. 보증금이 1억원을 넘는 경우

## 부칙

부칙 <제1호,2026.1.1>

제1조 (시행일) 이 법은 공포한 날부터 시행한다.
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def small(tmp_path):
    return load_corpus([write(tmp_path / "작은임대차법.md", STATUTE)])


def test_markdown_statute_splits_into_articles(small):
    assert [p.id for p in small.passages] == ["작은임대차법 제1조", "작은임대차법 제2조", "작은임대차법 제3조",
                                              "작은임대차법 제3조의2"]
    p = small.get("작은임대차법 제3조의2")
    assert (p.law, p.article, p.title) == ("작은임대차법", "제3조의2", "보증금의 회수")
    assert p.header == "작은임대차법 제3조의2(보증금의 회수)"
    # markdown markup gone, one line per paragraph / item, division headings not in the text
    assert p.text.splitlines() == ["① 임차인은 보증금을 돌려받을 때까지 집을 비우지 아니할 수 있다.",
                                   "② 다음 각 호의 어느 하나에 해당하면 그러하지 아니하다.",
                                   "1. 차임을 3기 연체한 경우", "2. 보증금이 1억원을 넘는 경우"]
    assert p.paragraphs() == 2
    assert "제2장" not in small.get("작은임대차법 제2조").text
    assert small.get("작은임대차법 제3조").deleted and not p.deleted


def test_supplementary_provisions_are_skipped_and_reported(small):
    # 부칙 restarts at 제1조: it must not overwrite or duplicate the law's own 제1조
    assert small.get("작은임대차법 제1조").title == "목적"
    assert any("부칙" in line and "skipped" in line for line in small.report)
    assert any("1 repealed" in line for line in small.report)


def test_plain_text_statute(tmp_path):
    text = ("상가법\n제1조(목적) 이 법은 상가를 정한다.\n제2조(적용범위) ① 이 법은 상가건물에 적용한다.\n"
            "② 제1조에 따른 목적에 맞게 해석한다.\n제3조 삭제 <2001.1.1>\n제3조의2(권리금) 권리금은 보호된다.\n")
    corpus = load_corpus([write(tmp_path / "상가법.txt", text)])
    assert [p.article for p in corpus.passages] == ["제1조", "제2조", "제3조", "제3조의2"]
    assert corpus.get("상가법 제2조").text == "① 이 법은 상가건물에 적용한다.\n② 제1조에 따른 목적에 맞게 해석한다."
    assert corpus.get("상가법 제3조").deleted
    assert corpus.files[0].kind == "text" and corpus.files[0].law == "상가법"


def test_law_name_from_heading_or_file_name(tmp_path):
    body = "##### 제1조 (목적)\n\n목적을 정한다.\n"
    assert load_corpus([write(tmp_path / "a.md", "# 어느 법\n\n" + body)]).passages[0].law == "어느 법"
    assert load_corpus([write(tmp_path / "주택임대차보호법_시행령.md", body)]).passages[0].law == "주택임대차보호법 시행령"


def test_jsonl_passages_read_as_they_are(tmp_path):
    rows = [{"id": "faq-1", "title": "보증금", "text": "보증금은 계약 끝에 돌려받는다."},
            {"id": "민법 제312조", "title": "전세권의 존속기간", "text": "10년을 넘지 못한다."},
            {"id": "faq-2", "text": ""},
            {"title": "no id", "text": "x"}]
    path = write(tmp_path / "faq.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    corpus = load_corpus([path])
    assert [p.id for p in corpus.passages] == ["faq-1", "민법 제312조"]
    assert corpus.get("faq-1").law is None and corpus.get("faq-1").header == "faq-1(보증금)"
    assert corpus.article("민법", "제312조").id == "민법 제312조"  # an id like '민법 제312조' is citable
    assert any("no text" in line for line in corpus.report) and any("no id" in line for line in corpus.report)


@pytest.mark.parametrize("name,content,words", [
    ("empty.md", b"", "empty"),
    ("blank.txt", b"\n  \n", "empty"),
    ("scan.md", b"%PDF-1.7\x00\x01\x02binary", "binary"),
    ("notes.md", "# 메모\n\n법 이야기지만 조문은 없다.\n".encode(), "no articles"),
    ("none.jsonl", b'{"id": "a"}\n', "no articles"),
])
def test_bad_files_get_one_clear_line(tmp_path, name, content, words):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(KoloraError) as e:
        load_corpus([path])
    line = e.value.one_line()
    assert words in line and name in line and ".jsonl" in line and "\n" not in line


def test_other_errors(tmp_path):
    with pytest.raises(KoloraError, match="not found"):
        load_corpus([tmp_path / "missing.md"])
    with pytest.raises(KoloraError, match="unsupported"):
        load_corpus([write(tmp_path / "x.pdf", "x")])
    with pytest.raises(KoloraError, match="invalid JSON"):
        load_corpus([write(tmp_path / "bad.jsonl", "{nope\n")])
    twice = write(tmp_path / "b.md", STATUTE)
    with pytest.raises(KoloraError, match="already used"):
        load_corpus([twice, write(tmp_path / "c.md", STATUTE)])


def test_folder_fingerprint_and_changes(tmp_path):
    folder = tmp_path / "laws"
    folder.mkdir()
    write(folder / "작은임대차법.md", STATUTE)
    write(folder / "README.md", "# notes\n")
    corpus = load_corpus([folder])
    assert [f.name for f in corpus.files] == ["laws/작은임대차법.md"]
    assert any("README.md" in line for line in corpus.report)  # documentation, listed as not read
    before = corpus.fingerprint()
    assert load_corpus([folder]).fingerprint() == before
    write(folder / "작은임대차법.md", STATUTE.replace("2년으로", "3년으로"))
    after = load_corpus([folder])
    assert after.fingerprint() != before
    assert after.changes(corpus.file_hashes()) == ["changed: laws/작은임대차법.md"]


def test_citations_resolve_like_a_reader(small):
    cites = find_citations("작은임대차법 제3조의2 제1항에 따라 돌려받을 수 있고, 제2조 제2항과 같은 법 제1조도 봅니다.", small)
    assert [(c.ref, c.passage_id, c.how) for c in cites] == [
        ("작은임대차법 제3조의2 제1항", "작은임대차법 제3조의2", "named"),
        ("작은임대차법 제2조 제2항", "작은임대차법 제2조", "last named"),
        ("작은임대차법 제1조", "작은임대차법 제1조", "same law")]
    other = find_citations("민사집행법 제41조, 제42조와 작은임대차법 제9999조", small)
    assert [(c.law, c.passage_id) for c in other] == [("민사집행법", None), ("민사집행법", None), ("작은임대차법", None)]
    # no law named anywhere: the only law with that article
    assert find_citations("제3조의2에 따라", small)[0].passage_id == "작은임대차법 제3조의2"


def test_citations_on_bundled_statutes():
    corpus = load_corpus([STATUTES])
    reader = corpus.reader()
    text = ("주택임대차보호법 제3조 제1항에 따라 대항력이 생기고, 같은 법 시행령 제2조가 법인을 정합니다. "
            "민법 제621조에 따른 등기에는 제3조의3 제5항이 준용됩니다. 상가건물임대차보호법 제10조도 봅니다.")
    assert cited_passages(text, reader) == ["주택임대차보호법 제3조", "주택임대차보호법 시행령 제2조", "민법 제621조",
                                            "주택임대차보호법 제3조의3", "상가건물 임대차보호법 제10조"]
    assert [c.passage_id for c in reader.find("시행령 제10조", default_law="주택임대차보호법")] == \
        ["주택임대차보호법 시행령 제10조"]


def test_bundled_statutes_parse_to_plausible_articles():
    corpus = load_corpus([STATUTES])
    counts = {f.law: f.passages for f in corpus.files}
    assert counts["민법"] > 1000
    assert 30 <= counts["주택임대차보호법"] <= 60 and 30 <= counts["상가건물 임대차보호법"] <= 60
    assert 25 <= counts["주택임대차보호법 시행령"] <= 60
    assert corpus.get("민법 제312조").title == "전세권의 존속기간"
    assert "10년을 넘지 못한다" in corpus.get("민법 제312조").text
    assert corpus.get("주택임대차보호법 제3조의2").title == "보증금의 회수"
    assert all(p.text and "부칙 <" not in p.text for p in corpus.passages)
