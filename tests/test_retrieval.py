"""BM25 retrieval: Korean tokenisers, document expansion, save/reload, recall@k. Tiny corpora."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kolora import retrieval
from kolora.corpus import load_corpus
from kolora.errors import KoloraError
from kolora.retrieval import Index, build_index, recall_at_k, tokenize

ROOT = Path(__file__).resolve().parents[1]

ARTICLES = {
    "제1조 (전세권의 내용)": "전세권자는 전세금을 지급하고 타인의 부동산을 점유하여 사용ㆍ수익한다.",
    "제2조 (존속기간)": "전세권의 존속기간은 10년을 넘지 못한다.",
    "제3조 (차임증감청구권)": "약정한 차임이 경제사정의 변동으로 상당하지 아니하게 된 때에는 증감을 청구할 수 있다.",
    "제4조 (보증금의 회수)": "임차인은 임차주택을 양수인에게 인도하지 아니하면 보증금을 받을 수 없다.",
    "제4조의2 (계약의 해지)": "임차인은 언제든지 임대인에게 계약해지를 통지할 수 있다.",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("laws")
    text = "# 작은법\n\n" + "".join(f"##### {head}\n\n{body}\n\n" for head, body in ARTICLES.items())
    (folder / "작은법.md").write_text(text, encoding="utf-8")
    return load_corpus([folder / "작은법.md"])


@pytest.mark.parametrize("tokenizer", ["kiwi", "char2", "char2+kiwi"])
def test_tokenizers_keep_content_and_article_markers(tokenizer):
    tokens = tokenize("주택임대차보호법 제3조의2 제1항에 따라 보증금을 돌려받아요", tokenizer)
    assert tokens.count("제3조의2") == 1  # one token, not 제/3/조/의/2, and once even with two tokenizers
    assert not any(t.lstrip("~").startswith("제1") or t.lstrip("~") in ("항", "1항") for t in tokens)  # no topic
    if tokenizer == "kiwi":
        assert "보증금" in tokens and not {"을", "에", "아요"} & set(tokens)  # particles and endings dropped
    if tokenizer == "char2":
        assert {"보증", "증금"} <= set(tokens) and not any(t.startswith("~") for t in tokens)
    if tokenizer == "char2+kiwi":  # both, the morphemes marked so they never merge with a bigram
        assert {"보증", "증금", "~보증금"} <= set(tokens) and "보증금" not in tokens
        assert not {"~을", "~에"} & set(tokens)
        text = "주택임대차보호법 제3조의2 제1항에 따라 보증금을 돌려받아요"
        morphemes = ["~" + t for t in tokenize(text, "kiwi") if t != "제3조의2"]
        assert sorted(tokens) == sorted(tokenize(text, "char2") + morphemes)


def test_kiwi_runs_without_network(monkeypatch):
    # the model ships in the kiwipiepy_model package: nothing is fetched (conftest sets this too)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "전세금" in tokenize("전세권자는 전세금을 지급하고", "kiwi")


@pytest.mark.parametrize("tokenizer", ["kiwi", "char2", "char2+kiwi"])
def test_search_save_reload_identical(corpus, tmp_path, tokenizer):
    index = build_index(corpus, {"작은법 제3조": ["월세를 올려 달래요"]}, tokenizer=tokenizer)
    hits = index.search("전세권 존속기간은 몇 년까지인가요?", k=3)
    assert hits[0].passage.id == "작은법 제2조" and [h.rank for h in hits] == list(range(1, len(hits) + 1))
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))
    index.save(tmp_path / "index")
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["format"] == retrieval.FORMAT and manifest["tokenizer"] == tokenizer
    assert manifest["corpus"]["fingerprint"] == corpus.fingerprint()
    assert not list((tmp_path / "index").rglob("*.pkl")) and not list((tmp_path / "index").rglob("*.pickle"))
    again = Index.load(tmp_path / "index", corpus)
    for q in ["전세권 존속기간은 몇 년까지인가요?", "월세를 올려 달래요", "계약 해지 통지", "보증금 돌려받기"]:
        assert [(h.passage.id, h.score, h.rank) for h in again.search(q, 5)] == \
               [(h.passage.id, h.score, h.rank) for h in index.search(q, 5)]
    assert again.search("전세권 존속기간", 1)[0].passage.header == "작은법 제2조(존속기간)"
    assert again.expansions == index.expansions == {"작은법 제3조": ["월세를 올려 달래요"]}
    assert again.passages == index.passages


def test_document_expansion_changes_ranking(corpus):
    question = "집주인이 월세를 갑자기 올려 달래요"  # everyday words the statute does not use
    plain = build_index(corpus, tokenizer="kiwi")
    assert not plain.search(question, 5) or plain.search(question, 1)[0].passage.id != "작은법 제3조"
    expanded = build_index(corpus, {"작은법 제3조": ["집주인이 월세를 올려 달라고 해요"]}, tokenizer="kiwi")
    top = expanded.search(question, 1)[0]
    assert top.passage.id == "작은법 제3조"
    assert "월세" not in top.passage.text  # expansion is indexed, never shown
    assert expanded.manifest["expansion"] == {"passages": 1, "questions": 1}
    assert expanded.expansions == {"작은법 제3조": ["집주인이 월세를 올려 달라고 해요"]}


def test_no_overlap_returns_empty_and_named_article_first(corpus):
    index = build_index(corpus, tokenizer="kiwi")
    assert index.search("ㅋㅋㅋ xyzzy", 5) == []
    assert index.search("", 5) == []
    hits = index.search("작은법 제4조의2는 무슨 내용이에요?", 3)
    assert hits[0].passage.id == "작은법 제4조의2" and hits[0].named


def test_expansion_for_unknown_id_is_reported(corpus):
    index = build_index(corpus, {"없는법 제1조": ["질문"]}, tokenizer="char2")
    assert any("없는법 제1조" in line for line in index.report)


def test_load_refuses_a_changed_corpus(corpus, tmp_path):
    build_index(corpus, tokenizer="char2").save(tmp_path / "index")
    path = Path(corpus.files[0].path)
    changed_dir = tmp_path / "changed"
    changed_dir.mkdir()
    (changed_dir / path.name).write_text(path.read_text(encoding="utf-8") + "\n##### 제5조 (신설)\n\n새 조문.\n",
                                         encoding="utf-8")
    with pytest.raises(KoloraError, match="changed: 작은법.md"):
        Index.load(tmp_path / "index", load_corpus([changed_dir / path.name]))
    with pytest.raises(KoloraError, match="no retrieval index"):
        Index.load(tmp_path / "nothing")


def test_recall_at_k(corpus):
    index = build_index(corpus, tokenizer="char2")
    r = recall_at_k(index, ["전세권 존속기간", "계약해지 통지", "아무거나"], [["작은법 제2조"], ["작은법 제4조의2"], []],
                    ks=(1, 3))
    assert r["questions"] == 2 and r["skipped"] == 1
    assert r["recall@1"] == 1.0 and r["hit@3"] == 1.0


def test_unknown_tokenizer_is_one_line():
    with pytest.raises(KoloraError, match="unknown retrieval tokenizer"):
        tokenize("x", "bpe")


def test_import_does_not_load_torch():
    code = "import sys, kolora.retrieval, kolora.citations; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
