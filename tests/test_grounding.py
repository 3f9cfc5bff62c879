"""Grounded answers end to end on a tiny model: the index is built from the training split,
saved in the run and reused by retrieve, chat and eval; RAFT's oracle rule is seeded; the
passages are prompt, never labels; a changed corpus is refused; nothing crashes on no hits."""

import json
import shutil

import pytest
from conftest import ROOT, TINY_TRAIN, make_tokenizer, run_cli

from kolora import grounding
from kolora.config import RunConfig
from kolora.corpus import Passage
from kolora.data import Example, load_examples, split_examples
from kolora.prompt import CONTEXT_MARK, IGNORE, encode_example, render_prompt

STATUTES = ROOT / "data" / "statutes"


def grounded_cfg(data, oracle_p=0.8, seed=42) -> RunConfig:
    cfg = RunConfig()
    cfg.data.path = str(data)
    cfg.retrieval.corpus = [str(STATUTES)]
    cfg.retrieval.k = 2
    cfg.retrieval.context_tokens = 96
    cfg.retrieval.oracle_p = oracle_p
    cfg.train.seed = seed
    return cfg


@pytest.fixture(scope="module")
def train_rows(small_csv):
    examples, _ = load_examples(str(small_csv))
    return split_examples(examples)["train"]


def test_oracle_insertion_is_seeded_and_follows_oracle_p(train_rows):
    tok = make_tokenizer()
    cfg = grounded_cfg("x", oracle_p=1.0)
    g = grounding.build(cfg, train_rows)
    once, counts = grounding.ground_training(g, cfg, train_rows, tok)
    again, _ = grounding.ground_training(g, cfg, train_rows, tok)
    assert [ex.context for ex in once] == [ex.context for ex in again]  # a resumed run sees the same prompts
    assert counts["citing"] > 0 and counts["missed"] == 0
    cited = g.cited(train_rows)
    for ex, ids in zip(once, cited):  # oracle_p 1: every citing row shows (a trimmed copy of) its article
        if ids:
            assert any(f"[{g.corpus.get(pid).header}]" in ex.context for pid in ids), ex.question
    cfg0 = grounded_cfg("x", oracle_p=0.0)
    _, counts0 = grounding.ground_training(g, cfg0, train_rows, tok)
    assert counts0["inserted"] == 0 and counts0["missed"] == counts["inserted"]
    other, _ = grounding.ground_training(g, grounded_cfg("x", oracle_p=0.5, seed=7), train_rows, tok)
    assert len(other) == len(train_rows)


def test_passages_fit_the_budget_and_are_never_labels():
    tok = make_tokenizer()
    cfg = grounded_cfg("x")
    g = grounding.build(cfg, [])
    [ex], [hits] = g.ground([Example("전세권의 존속기간은 최장 몇 년인가요?", "민법 제312조 제1항에 따라 10년입니다.")], tok)
    assert hits and ex.context.startswith(f"[{hits[0].passage.header}]")
    assert len(tok(ex.context, add_special_tokens=False).input_ids) <= cfg.retrieval.context_tokens + cfg.retrieval.k
    text = render_prompt(tok, ex)
    assert text.index(CONTEXT_MARK) < text.index(ex.question)
    ids, labels = encode_example(tok, ex)
    answer = tok(ex.answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert labels[-len(answer):] == answer and all(x == IGNORE for x in labels[:-len(answer)])
    assert len(ids) - len(answer) > len(encode_example(tok, Example(ex.question, ex.answer))[0]) - len(answer) + 20


LONG = Passage(id="주택임대차보호법 제3조의3", law="주택임대차보호법", article="제3조의3", title="임차권등기명령", text=(
    "① 임대차가 끝난 후 보증금이 반환되지 아니한 경우 임차인은 법원에 임차권등기명령을 신청할 수 있다. <개정 2013.8.13>\n"
    "② 임차권등기명령의 신청서에는 다음 각 호의 사항을 적어야 한다.\n1. 신청의 취지 및 이유\n2. 임대차의 목적인 주택\n"
    "③ 임차권등기명령의 신청을 기각하는 결정에 대하여 임차인은 항고할 수 있다.\n"
    "④ 임차인은 임차권등기를 마치면 대항력과 우선변제권을 취득한다. 이미 취득한 대항력이나 우선변제권은 "
    "임차권등기 이후 이사를 가더라도 상실하지 아니한다.\n"
    "⑤ 임차권등기명령을 시행하는 데에 필요한 사항은 대법원규칙으로 정한다. <신설 2013.8.13>"))
SHORT = Passage(id="민법 제1조", law="민법", article="제1조", title="법원",
                text="민사에 관하여 법률에 규정이 없으면 관습법에 의한다.")


def test_a_long_article_keeps_the_paragraphs_the_question_is_about():
    tok = make_tokenizer()
    full = grounding.render_context([LONG], tok, 10_000, "질문")
    assert "제1항 임대차가 끝난 후" in full and "제5항 임차권등기명령을 시행" in full  # '①' → '제1항', as answers cite
    assert "①" not in full and "<개정" not in full and "<신설" not in full  # amendment notes are not law
    cap = len(tok(grounding.render_context([LONG], tok, 10_000, ""), add_special_tokens=False).input_ids) // 2
    q = "임차권등기를 마친 뒤에 이사를 가도 대항력과 우선변제권을 상실하지 않나요?"
    text = grounding.render_context([LONG], tok, cap, q)
    assert "제4항 임차인은 임차권등기를 마치면" in text  # the paragraph the question is about, though fourth
    assert len(tok(text, add_special_tokens=False).input_ids) <= cap
    lines = text.split("\n")
    assert lines[0] == f"[{LONG.header}]" and "…" in lines  # a gap is marked where paragraphs were left out
    numbers = [int(x[1:x.index("항")]) for x in lines if x.startswith("제") and "항 " in x[:5]]
    assert numbers == sorted(numbers)  # kept paragraphs stay in the article's order


def test_the_budget_is_shared_out_short_passages_whole():
    tok = make_tokenizer()
    whole_long = len(tok(grounding.render_context([LONG], tok, 10_000), add_special_tokens=False).input_ids)
    budget = whole_long  # less than both need, more than twice the short one
    text = grounding.render_context([SHORT, LONG], tok, budget, "이사를 가도 대항력을 상실하지 않나요?")
    short, long_ = text.split("\n\n")
    assert short == f"[{SHORT.header}]\n{SHORT.text}"  # whole: it needs less than half
    used = len(tok(text, add_special_tokens=False).input_ids)
    assert budget // 2 + 5 < len(tok(long_, add_special_tokens=False).input_ids) and used <= budget + 2


def test_no_hits_is_answered_with_no_sources():
    tok = make_tokenizer()
    g = grounding.build(grounded_cfg("x"), [])
    [ex], [hits] = g.ground([Example("zzqx qqzz", "")], tok)
    assert hits == [] and ex.context == grounding.NO_SOURCES
    assert "no sources found" in grounding.sources_line(hits)


@pytest.fixture(scope="module")
def grounded_run(tiny_models, small_csv, tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus") / "statutes"
    shutil.copytree(STATUTES, corpus)
    run = tmp_path_factory.mktemp("grounded") / "run"
    r = run_cli("train", "--model", str(tiny_models["llama"]), "--data", str(small_csv), "--out", str(run),
                *TINY_TRAIN, "--max-steps", "2", "--retrieval.corpus", str(corpus), "--retrieval.k", "2",
                "--retrieval.context_tokens", "96", "--train.health_check", "2")
    assert r.returncode == 0, r.stderr
    return run, corpus, r.stdout


def test_grounded_training_saves_its_index_and_reports_recall(grounded_run):
    run, corpus, out = grounded_run
    assert (run / "index" / "manifest.json").is_file()
    assert "retrieval: 1303 passages, top 2 within 96 tokens" in out
    assert "recall@3" in out
    info = json.loads((run / "run.json").read_text(encoding="utf-8"))
    assert info["fingerprints"]["retrieval"]["k"] == 2 and info["retrieval_recall"]["questions"] > 0
    first = json.loads((run / "data" / "test.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert "context" not in first  # splits stay plain: chat and eval retrieve again from the saved index


def test_retrieve_chat_and_eval_use_the_runs_index(grounded_run):
    run, _, _ = grounded_run
    r = run_cli("retrieve", str(run), "전세권의 존속기간은 최장 몇 년인가요?")
    assert r.returncode == 0, r.stderr
    assert "1. " in r.stdout and "제312조" in r.stdout
    r = run_cli("chat", str(run), "-q", "전세권의 존속기간은 최장 몇 년인가요?", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    assert "근거: " in r.stdout
    r = run_cli("chat", str(run), "-q", "zzqx qqzz", "--max-new-tokens", "4")
    assert r.returncode == 0 and "no sources found" in r.stdout
    r = run_cli("chat", str(run), "-q", "전세권의 존속기간은 최장 몇 년인가요?", "--max-new-tokens", "4", "--verify", "2")
    assert r.returncode == 0 and "근거: " in r.stdout, r.stderr  # checked before it is shown (not streamed)
    r = run_cli("eval", str(run), "--max-samples", "3", "--max-new-tokens", "4", "--four-way", "--no-cache",
                "--verify", "2")
    assert r.returncode == 0, r.stderr
    metrics = json.loads((run / "eval" / "metrics.json").read_text(encoding="utf-8"))
    assert {"base", "tuned", "base_plain", "tuned_plain"} <= set(metrics)
    assert metrics["generation"]["verify"] == 2 and metrics["timing"]["tuned"]["verify"]["checked"] == 3
    assert "verify" not in metrics["timing"]["base"]  # an untuned base is not verified
    assert metrics["retrieval"]["k"] == 2 and "recall@3" in metrics["retrieval"]
    assert "tuned + retrieval" in r.stdout
    sample = json.loads((run / "eval" / "samples.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert sample["sources"] and "citation" in sample["tuned"] and "unsupported" in sample["tuned"]["citation"]
    assert "검색과 근거" in (run / "eval" / "report.html").read_text(encoding="utf-8")


def test_a_changed_corpus_is_refused_by_name(grounded_run):
    run, corpus, _ = grounded_run
    law = corpus / "주택임대차보호법.md"
    original = law.read_text(encoding="utf-8")
    try:
        law.write_text(original.replace("2년", "3년", 1), encoding="utf-8")
        r = run_cli("chat", str(run), "-q", "질문", "--max-new-tokens", "2")
        assert r.returncode == 2
        assert "changed" in r.stderr and "주택임대차보호법.md" in r.stderr and "Traceback" not in r.stderr
    finally:
        law.write_text(original, encoding="utf-8")


def test_a_corpus_without_articles_is_one_line(tiny_models, small_csv, tmp_path):
    bad = tmp_path / "notes.md"
    bad.write_text("# 메모\n\n조문이 없는 글입니다.\n", encoding="utf-8")
    r = run_cli("train", "--model", str(tiny_models["llama"]), "--data", str(small_csv), "--out", str(tmp_path / "r"),
                *TINY_TRAIN, "--retrieval.corpus", str(bad))
    assert r.returncode == 2 and "notes.md" in r.stderr and "Traceback" not in r.stderr


def test_expansion_rows_that_paraphrase_a_held_out_question_are_dropped():
    """retrieval.expand_with must not carry a held-out question's article into the index: the
    articles row 319 paraphrases QA row 79 (both 민법 제624조)."""
    qa, _ = load_examples(str(ROOT / "data" / "civil_law_qa.csv"))
    held_out = [ex for ex in qa if ex.line == 79]
    cfg = grounded_cfg("x")
    cfg.retrieval.expand_with = [str(ROOT / "data" / "civil_law_articles.csv")]
    report: list[str] = []
    rows = grounding.expansion_rows(cfg, held_out, report)
    assert 319 not in {ex.line for ex in rows} and len(rows) == 373
    assert "dropped" in report[0] and "319" in report[0]
