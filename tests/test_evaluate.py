"""`kolora eval`: metric functions on hand-computed cases, the report, the JSON schema, the verb end to end."""

import csv
import json
import math
import re

import pytest
from conftest import DATA, TINY_TRAIN, run_cli

from kolora.data import Example
from kolora.evaluate import regression_order
from kolora.facts import extract_facts, fact_recall, statute_refs, won
from kolora.html_report import render_report
from kolora.metrics import (
    aggregate,
    answer_metrics,
    bleu,
    chrf,
    distinct_n,
    find_loop,
    health_warnings,
    lcs_length,
    rouge_l,
    sentence_bleu,
    verdict,
)

# ----------------------------------------------------------------------------- facts


@pytest.mark.parametrize("text, facts", [
    ("민법 제312조 제1항에 따라 전세권의 존속기간은 10년을 넘지 못합니다.", ["제312조 제1항", "10년"]),
    # spacing variants normalise to one form; a bare article implied by a longer reference counts once
    ("제565조제1항, 제565조 1항, 그리고 제565조", ["제565조 제1항"]),
    # 같은 조 / a later paragraph attaches to the article mentioned last
    ("민법 제312조 제1항 … 같은 조 제2항에 따라 1년 미만이면 1년으로 봅니다.", ["제312조 제1항", "제312조 제2항", "1년"]),
    ("주택임대차보호법 제3조의2 제2항, 시행령 제10조 제1항 제2호", ["제3조의2 제2항", "제10조 제1항 제2호"]),
    ("보증금 1억6천500만원 이하, 차임의 20분의 1, 5%와 2퍼센트, 연 1할", ["165,000,000원", "1/20", "5%", "2%", "10%"]),
    ("6월 전부터 1개월 전까지, 2주 이내, 차임 2기 연체", ["6개월", "1개월", "2주", "2기"]),
    ("1억 원과 5,000만 원", ["100,000,000원", "50,000,000원"]),
    ("제3자에게 대항할 수 있고, 1주택자와 101호실은 사실이 아닙니다.", []),  # 제3자 is a third party, not an article
    ("１０년", ["10년"]),  # full-width digits (NFKC)
])
def test_extract_facts(text, facts):
    assert extract_facts(text) == facts


def test_won_reads_korean_amounts():
    assert won("1억6천500만") == 165_000_000
    assert won("2천500만") == 25_000_000
    assert won("5,000만") == 50_000_000
    assert won("3억") == 300_000_000
    assert won("700") == 700


def test_paragraph_before_any_article_stays_alone():
    assert statute_refs("제2항에 따르면 … 제7조") == ["제2항", "제7조"]


def test_fact_recall_hand_computed():
    ref = "민법 제312조 제1항에 따라 10년을 넘지 못하고, 갱신은 6개월 전부터 1개월 전까지 합니다."
    # states the article with its paragraph and the 10 years, misses both periods of the renewal window
    recall, wanted, stated = fact_recall("전세권은 제312조 제1항에 따라 10년까지입니다.", ref)
    assert wanted == ["제312조 제1항", "10년", "6개월", "1개월"]
    assert stated == ["제312조 제1항", "10년"] and recall == pytest.approx(2 / 4)
    # a wrong article or paragraph is not a partial hit
    assert fact_recall("제312조 제2항과 제313조 제1항", "제312조 제1항")[0] == 0.0
    # naming the article more precisely than the reference still states it
    assert fact_recall("제312조 제1항", "제312조")[0] == 1.0
    # '6월' (statute style) equals '6개월'; '6개월' is not '16개월'
    assert fact_recall("6월 전", "6개월")[0] == 1.0
    assert fact_recall("16개월", "6개월")[0] == 0.0
    assert fact_recall("아무 답", "사실 없는 참고 답변") == (None, [], [])


def test_no_reference_answer_in_the_bundled_data_is_flagged_as_a_loop():
    with open(DATA, encoding="utf-8") as f:
        answers = [row["answer"] for row in csv.DictReader(f)]
    assert len(answers) > 300
    assert [a for a in answers if find_loop(a)] == []
    # and the fact extractor finds something to check in almost every answer
    assert sum(bool(extract_facts(a)) for a in answers) / len(answers) > 0.9


# ----------------------------------------------------------------------------- text health


def test_find_loop():
    assert find_loop("임대인은 보증금을 반환해야 합니다 임대인은 보증금을 반환해야 합니다 임대인은 보증금을 반환해야 합니다") \
        == "임대인은 보증금을 반환해야 합니다"
    assert find_loop("가 나 다 라 가 나 다 라 마") is None  # twice is not a loop
    assert find_loop("임대차계약서임대차계약서임대차계약서") == "임대차계약서"  # no spaces: the character rule
    assert find_loop("했습니다했습니다") is None
    assert find_loop("민법 제312조 제1항에 따라 전세권의 존속기간은 10년을 넘지 못합니다.") is None


def test_distinct_2_hand_computed():
    assert distinct_n("a b a b a b") == pytest.approx(2 / 5)  # bigrams ab ba ab ba ab: 2 distinct of 5
    assert distinct_n("전세권 은 10년 입니다") == 1.0
    assert distinct_n("한단어") is None


def test_rouge_l_on_characters():
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # the textbook example
    # 전세권존속기간 (7) vs 전세권의존속기간 (8): LCS 7, P 1, R 7/8 -> F1 = 14/15
    assert rouge_l("전세권 존속기간", "전세권의 존속기간") == pytest.approx(100 * 14 / 15)
    assert rouge_l("전세권의존속기간", "전세권의 존속기간") == pytest.approx(100.0)  # spacing does not matter
    assert rouge_l("", "무엇") == 0.0


def test_chrf_and_char_bleu():
    assert chrf(["전세권의 존속기간"], ["전세권의 존속기간"]) == pytest.approx(100.0)
    assert chrf(["임대차"], ["전세권"]) == pytest.approx(0.0)
    # char tokenization: spacing differences cost nothing, a different particle costs something
    assert bleu(["전세권의존속기간은10년"], ["전세권의 존속기간은 10년"]) == pytest.approx(100.0)
    assert 0 < sentence_bleu("전세권의 존속기간이 10년", "전세권의 존속기간은 10년") < 100
    # word-level BLEU would give this pair 0 (no shared 4-gram of eojeol); on characters it is clearly related
    assert sentence_bleu("임대인은 보증금을 반환해야 합니다", "임대인이 보증금을 반환하여야 합니다") > 20


# ----------------------------------------------------------------------------- aggregation


def _row(answer, reference, stopped=True, loss=2.0, tokens=4):
    return answer_metrics(answer, reference, stopped, 10, loss, tokens)


def test_aggregate_is_token_weighted_and_micro_averaged():
    refs = ["제312조 제1항에 따라 10년", "6개월", "사실 없음"]
    rows = [_row("제312조 제1항에 따라 10년", refs[0], loss=4.0, tokens=2),  # 2/2 facts
            _row("1개월", refs[1], stopped=False, loss=2.0, tokens=6),  # 0/1 facts
            _row("a b a b a b a b", refs[2])]  # no facts; loops? 'a b a b' occurs 3 times
    block = aggregate(rows, refs)
    assert block["n"] == 3
    assert block["perplexity"] == pytest.approx(math.exp((4.0 + 2.0 + 2.0) / (2 + 6 + 4)))
    assert block["fact_recall"] == pytest.approx(2 / 3) and block["facts"] == 3  # micro: 2 of 3 facts
    assert block["eos_rate"] == pytest.approx(2 / 3)
    assert block["loops"] == 1 and block["loop_rate"] == pytest.approx(1 / 3)
    assert block["chrf"] == pytest.approx(chrf([r["answer"] for r in rows], refs))


def test_health_warnings_name_the_likely_cause():
    from kolora.generation import GenConfig

    gen = GenConfig(max_new_tokens=64, repetition_penalty=1.0)
    rows = [{"eos": False, "loop": None, "answer_tokens": 20}, {"eos": True, "loop": "가 나 다 라", "answer_tokens": 20}]
    warnings = health_warnings(rows, gen)
    assert len(warnings) == 2
    assert "1/2 answers did not end with EOS" in warnings[0] and "EOS" in warnings[0].split("likely cause")[1]
    assert "1/2 answers loop" in warnings[1] and "learning rate" in warnings[1]
    long_refs = [{"eos": False, "loop": None, "answer_tokens": 100}]
    assert "raise it" in health_warnings(long_refs, gen)[0]  # the budget, not the model
    assert health_warnings([{"eos": True, "loop": None, "answer_tokens": 5}], gen) == []
    # an untuned base model is expected to ramble: no training advice for it
    base = health_warnings(rows, gen, who="base", untuned=True)
    assert len(base) == 2 and all("never tuned" in w and "learning rate" not in w for w in base)


def test_verdict_and_regression_order():
    base = {"perplexity": 10.0, "chrf": 20.0, "fact_recall": 0.5, "eos_rate": 1.0}
    tuned = {"perplexity": 4.0, "chrf": 20.2, "fact_recall": 0.2, "eos_rate": 1.0}
    results = {v["metric"]: v["result"] for v in verdict(base, tuned)}
    assert results == {"perplexity": "better", "chrf": "same", "fact_recall": "worse", "eos_rate": "same"}
    samples = [{"id": 0, "delta": {"chrf": -5.0, "fact_recall": 0.0}}, {"id": 1, "delta": {"chrf": 3.0, "fact_recall": -1.0}},
               {"id": 2, "delta": {"chrf": -9.0}}]
    assert [s["id"] for s in regression_order(samples)] == [1, 2, 0]


# ----------------------------------------------------------------------------- the report


def _fake_eval():
    refs = ["민법 제312조 제1항에 따라 10년입니다.", "6개월 전부터 1개월 전까지입니다."]
    questions = ["전세권 존속기간은?", "갱신 거절 통지 기간은?"]
    base = [_row("모르겠습니다 <script>alert(1)</script>", refs[0], stopped=False), _row("1년", refs[1])]
    tuned = [_row("민법 제312조 제1항에 따라 10년입니다.", refs[0]), _row("6개월 전부터입니다.", refs[1])]
    metrics = {"target": "runs/x", "created": "now", "data": {"source": "test", "n": 2},
               "generation": {"max_new_tokens": 8, "temperature": 0.0, "repetition_penalty": 1.0},
               "sides": {"base": {"label": "base-model", "source": "b"}, "tuned": {"label": "tuned-run", "source": "t"}},
               "base": aggregate(base, refs), "tuned": aggregate(tuned, refs), "warnings": ["base: 1/2 answers …"],
               "metric_notes": {"chrf": "character F-score"}, "timing": {"total_s": 3.0}}
    for side, rows in (("base", base), ("tuned", tuned)):
        metrics[side]["by_category"] = {"전세권": aggregate(rows[:1], refs[:1]), "임대차": aggregate(rows[1:], refs[1:])}
    metrics["verdict"] = verdict(metrics["base"], metrics["tuned"])
    samples = [{"id": i, "question": q, "reference": r, "category": c, "difficulty": None, "base": b, "tuned": t,
                "delta": {"chrf": t["chrf"] - b["chrf"]}}
               for i, (q, r, c, b, t) in enumerate(zip(questions, refs, ["전세권", "임대차"], base, tuned))]
    return metrics, samples


def test_report_renders_every_section_self_contained():
    metrics, samples = _fake_eval()
    loss = {"train": [(1, 2.5), (5, 2.0), (10, 1.6)], "validation": [(0, 2.7), (10, 1.8)]}
    html = render_report(metrics, regression_order(samples), loss)
    for section in ("summary", "health", "loss", "metrics", "by-category", "samples", "definitions"):
        assert f'id="{section}"' in html, section
    assert "by-difficulty" not in html  # the data had no difficulty
    assert "<script" not in html.replace("&lt;script", "")  # answers are escaped, the page has no scripts
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert not re.search(r'(src|href)="(https?:)?//', html)  # nothing fetched from the network
    assert html.count('class="series-train"') == 1 and html.count('class="series-validation"') == 1
    assert html.count("<tr class=sample>") == 2
    for metric in ("perplexity", "chrf", "rouge_l", "bleu", "fact_recall", "eos_rate", "distinct_2"):
        assert html.count(f"bars-{metric}") == 2  # overall and by category
    assert "✗ 10년" in html and "✓ 10년" in html  # base misses the fact, tuned states it
    assert "base: 1/2 answers" in html


def test_report_without_loss_curve_or_groups():
    metrics, samples = _fake_eval()
    for side in ("base", "tuned"):
        metrics[side].pop("by_category")
    html = render_report(metrics, samples, {"train": [], "validation": []})
    assert "no loss curve" in html and "by-category" not in html


# ----------------------------------------------------------------------------- the verb, end to end

SIDE_KEYS = {"n", "perplexity", "chrf", "rouge_l", "bleu", "fact_recall", "facts", "eos_rate", "distinct_2",
             "loop_rate", "loops", "mean_length", "reference_length", "length_ratio", "mean_new_tokens"}
SAMPLE_KEYS = {"id", "question", "reference", "category", "difficulty", "base", "tuned", "delta"}
ANSWER_KEYS = {"answer", "perplexity", "chrf", "rouge_l", "bleu", "fact_recall", "facts_reference", "facts_stated",
               "eos", "loop", "distinct_2", "length", "reference_length", "new_tokens", "answer_tokens"}


@pytest.fixture(scope="module")
def tiny_run(tiny_models, small_csv, tmp_path_factory):
    run = tmp_path_factory.mktemp("eval") / "run"
    r = run_cli("train", "--model", str(tiny_models["llama"]), "--data", str(small_csv), "--out", str(run), *TINY_TRAIN)
    assert r.returncode == 0, r.stderr
    return run


@pytest.mark.slow
def test_eval_writes_metrics_samples_and_report_with_a_stable_schema(tiny_run):
    r = run_cli("eval", str(tiny_run), "--max-new-tokens", "6", "--max-samples", "5", "--batch-size", "3")
    assert r.returncode == 0, r.stderr
    assert "chrF" in r.stdout and "report:" in r.stdout
    out = tiny_run / "eval"
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["schema"] == "kolora.eval/1"
    assert {"data", "generation", "sides", "base", "tuned", "delta", "verdict", "warnings", "timing"} <= set(metrics)
    assert metrics["data"]["n"] == 5 and metrics["generation"]["max_new_tokens"] == 6
    for side in ("base", "tuned"):
        assert SIDE_KEYS <= set(metrics[side]), SIDE_KEYS - set(metrics[side])
        assert metrics[side]["perplexity"] > 1
        for block in metrics[side]["by_category"].values():
            assert SIDE_KEYS <= set(block)
        assert sum(b["n"] for b in metrics[side]["by_category"].values()) == 5
        assert sum(b["n"] for b in metrics[side]["by_difficulty"].values()) == 5
    # a random tiny model never stops within 6 tokens: the report says so
    assert metrics["tuned"]["eos_rate"] == 0.0 and any("did not end with EOS" in w for w in metrics["warnings"])
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(samples) == 5
    test_split = [json.loads(line) for line in (tiny_run / "data" / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [s["question"] for s in samples] == [row["question"] for row in test_split[:5]]
    for s in samples:
        assert set(s) == SAMPLE_KEYS
        assert ANSWER_KEYS == set(s["base"]) == set(s["tuned"])
        assert s["tuned"]["new_tokens"] <= 6
    # the adapter changed something the teacher-forced loss can see
    assert metrics["base"]["perplexity"] != metrics["tuned"]["perplexity"]
    html = (out / "report.html").read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and html.count("<tr class=sample>") == 5


@pytest.mark.slow
def test_eval_own_data_merged_model_and_against(tiny_run, small_csv, tmp_path):
    # --data: every row of the file, no split
    exam = tmp_path / "exam.jsonl"
    exam.write_text("\n".join(json.dumps({"question": q, "answer": a}, ensure_ascii=False) for q, a in
                              [("전세권이란?", "민법 제303조 제1항의 권리입니다."), ("존속기간은?", "10년입니다."),
                               ("갱신은?", "6개월 전부터 1개월 전까지 통지합니다.")]), encoding="utf-8")
    r = run_cli("eval", str(tiny_run), "--data", str(exam), "--max-new-tokens", "4", "--out", str(tmp_path / "own"))
    assert r.returncode == 0, r.stderr
    metrics = json.loads((tmp_path / "own" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["data"]["n"] == 3 and "by_category" not in metrics["tuned"]
    assert metrics["tuned"]["facts"] == 4  # 제303조 제1항, 10년, 6개월, 1개월

    # a merged model: tuned = the merged directory, base = the run's base model
    merged = tmp_path / "merged"
    assert run_cli("merge", str(tiny_run), "--out", str(merged)).returncode == 0
    r = run_cli("eval", str(merged), "--max-samples", "3", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    m_merged = json.loads((merged / "eval" / "metrics.json").read_text(encoding="utf-8"))
    r = run_cli("eval", str(tiny_run), "--max-samples", "3", "--max-new-tokens", "4", "--out", str(tmp_path / "adapter"))
    m_adapter = json.loads((tmp_path / "adapter" / "metrics.json").read_text(encoding="utf-8"))
    for side in ("base", "tuned"):  # merged == adapter, up to bf16 rounding
        assert m_merged[side]["perplexity"] == pytest.approx(m_adapter[side]["perplexity"], rel=0.02)

    # --against: RUN as tuned, RUN2 as base; the same run against itself changes nothing
    r = run_cli("eval", str(tiny_run), "--against", str(tiny_run), "--max-samples", "3", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    m = json.loads((tiny_run / f"eval-vs-{tiny_run.name}" / "metrics.json").read_text(encoding="utf-8"))
    assert m["sides"]["base"]["source"] == m["sides"]["tuned"]["source"]
    assert m["base"]["perplexity"] == pytest.approx(m["tuned"]["perplexity"])
    assert m["delta"]["chrf"] == pytest.approx(0.0)


def test_eval_mistakes_are_one_line_errors(tiny_run, tmp_path):
    for args, fragment in [((str(tmp_path / "nope"),), "run directory not found"),
                           ((str(tiny_run), "--split", "dev"), "--split dev"),
                           ((str(tiny_run), "--max-samples", "0"), "--max-samples"),
                           ((str(tiny_run), "--data", str(tmp_path / "missing.csv")), "missing.csv"),
                           ((str(tiny_run), "--against", str(tmp_path / "other")), "--against")]:
        r = run_cli("eval", *args)
        assert r.returncode == 2, (args, r.stderr)
        lines = [line for line in r.stderr.splitlines() if line.startswith("kolora:")]
        assert len(lines) == 1 and fragment in lines[0], (args, r.stderr)
        assert "Traceback" not in r.stderr


def test_health_check_warns_about_a_model_that_does_not_stop(tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kolora.config import RunConfig
    from kolora.data import Example
    from kolora.generation import GenConfig, health_check

    model = AutoModelForCausalLM.from_pretrained(tiny_models["gemma3"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["gemma3"])
    model.train()
    examples = [Example("전세권이란?", "네."), Example("존속기간은?", "10년")]  # shorter than the budget
    warnings = health_check(model, tokenizer, RunConfig(), examples, GenConfig(max_new_tokens=6, repetition_penalty=1.0))
    assert model.training  # its mode is restored for whatever comes next
    assert len(warnings) >= 1 and "2/2 answers did not end with EOS" in warnings[0]
    assert "train.epochs" in warnings[0]  # names the knob
    long = [Example("전세권이란?", "민법 제303조 제1항에 따라 전세권자는 전세금을 지급하고 타인의 부동산을 점유합니다.")]
    assert "raise it" in health_check(model, tokenizer, RunConfig(), long, GenConfig(max_new_tokens=6))[0]
    assert health_check(model, tokenizer, RunConfig(), [], None) == []


def test_second_eval_reuses_the_untuned_base_answers(tiny_run, tmp_path):
    env = {"KOLORA_CACHE": str(tmp_path / "cache")}
    args = ("eval", str(tiny_run), "--max-new-tokens", "5", "--max-samples", "3")
    first = run_cli(*args, "--out", str(tmp_path / "a"), env=env)
    assert first.returncode == 0, first.stderr
    assert len(list((tmp_path / "cache" / "eval-base").glob("*.json"))) == 1
    second = run_cli(*args, "--out", str(tmp_path / "b"), env=env)
    assert second.returncode == 0, second.stderr
    assert "reusing" in second.stderr
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text(encoding="utf-8")) for d in "ab")
    assert a["base"] == b["base"] and a["tuned"] == b["tuned"]
    # other settings are another question: answered again
    third = run_cli(*args[:-1], "2", "--out", str(tmp_path / "c"), env=env)
    assert third.returncode == 0 and "reusing" not in third.stderr
    fourth = run_cli(*args, "--no-cache", "--out", str(tmp_path / "d"), env=env)
    assert fourth.returncode == 0 and "reusing" not in fourth.stderr


def test_fact_extraction_is_linear_on_long_number_runs():
    """A base model's rambling digit runs once sent the amount pattern into exponential
    backtracking (eval hung); an alarm turns a hang into a failure."""
    import signal

    ramble = "1 2 3 4 5 6 7 8 9 0 " * 40 + "1,1,1,1,1,1,1,1,1,1 " * 40 + "그리고 2억 5,000만 원"

    def hang(*_):
        raise TimeoutError("fact extraction did not finish in 5 s")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(5)
    try:
        facts = extract_facts(ramble)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert "250,000,000원" in facts


def test_fact_spans_cover_exactly_what_fact_recall_reads():
    from kolora.facts import fact_spans

    text = "민법 제303조 제1항, 같은 조 제2호. 6개월 안에 1억 원의 20분의 1(5%)과 1할, 2회. 101호실"
    spans = fact_spans(text)
    assert [text[a:b] for a, b in spans] == ["제303조", "제1항", "제2호", "6개월", "1억 원", "20분의 1", "5%", "1할", "2회"]
    # every fact extract_facts finds comes from inside a span, and nothing outside one is a fact
    inside = " ".join(text[a:b] for a, b in spans)
    assert extract_facts(inside) == extract_facts(text)
    assert fact_spans("전세권은 물권이에요.") == []


def test_the_default_answer_budget_follows_the_longest_reference(tiny_models):
    from transformers import AutoTokenizer

    from kolora.evaluate import answer_budget

    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    short = [Example("q", "2년"), Example("q", "네")]
    assert answer_budget(tok, short) == 64  # never below 64
    answer = "민법 제312조 제1항에 따라 전세권의 존속기간은 10년을 넘지 못해요. " * 3
    n = len(tok(answer, add_special_tokens=False).input_ids)
    assert 64 < answer_budget(tok, short + [Example("q", answer)]) == -(-3 * (n + 1) // 2) <= 256
    assert answer_budget(tok, [Example("q", answer * 20)]) == 256  # never above eval's old fixed budget
