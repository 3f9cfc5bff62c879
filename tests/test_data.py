import csv
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from kolora.data import load_examples, split_examples
from kolora.errors import KoloraError

ROOT = Path(__file__).resolve().parents[1]
ROWS = [("전세권이란 무엇인가요?", "민법 제303조 제1항에 따라 …", "전세권", "쉬움"),
        ("집주인이 보증금을 안 돌려줘요", "주택임대차보호법 제3조의3에 따라 …", "주택임대차", "보통")]


def write_csv(path: Path, rows, encoding="utf-8", header=("question", "answer", "category", "difficulty")):
    with open(path, "w", encoding=encoding, newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "cp949", "euc-kr", "utf-16"])
def test_csv_encodings_from_excel_just_work(tmp_path, encoding):
    path = write_csv(tmp_path / "qa.csv", ROWS, encoding)
    examples, report = load_examples(str(path))
    assert [e.question for e in examples] == [r[0] for r in ROWS]
    assert examples[0].category == "전세권"
    assert report.encoding in ("utf-8", "cp949", "utf-16")


def test_bom_does_not_end_up_in_the_first_column(tmp_path):
    path = write_csv(tmp_path / "qa.csv", ROWS, "utf-8-sig")
    examples, _ = load_examples(str(path))
    assert examples[0].question == ROWS[0][0]


def test_missing_answer_column_suggests_nearest(tmp_path):
    path = write_csv(tmp_path / "qa.csv", ROWS, header=("question", "answers", "category", "difficulty"))
    with pytest.raises(KoloraError) as e:
        load_examples(str(path))
    assert "no 'answer' column" in str(e.value) and "answers" in e.value.hint


def test_empty_nan_and_duplicate_rows_are_counted_not_silently_dropped(tmp_path):
    rows = ROWS + [("빈 답변", "   ", "", ""), ("NaN 답변", "nan", "", ""), ROWS[0]]
    path = write_csv(tmp_path / "qa.csv", rows)
    examples, report = load_examples(str(path))
    assert len(examples) == 2
    assert report.rows == 5 and report.kept == 2
    assert report.skipped["whitespace-only answer"] == [4]
    assert report.skipped["NaN/NULL answer"] == [5]
    assert report.skipped["duplicate row"] == [6]
    assert any("whitespace-only answer (line 4)" in line for line in report.lines())


def test_all_rows_empty_is_one_error(tmp_path):
    path = write_csv(tmp_path / "qa.csv", [("질문", "", "", "")])
    with pytest.raises(KoloraError, match="no usable examples"):
        load_examples(str(path))


def test_undecodable_file(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_bytes(b"question,answer\n\xff\xfe\xfa\xfb,\x80\x81\x82\n")
    with pytest.raises(KoloraError, match="cannot decode"):
        load_examples(str(path))


def test_alpaca_json_and_messages_jsonl(tmp_path):
    alpaca = tmp_path / "ko_alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "요약하세요", "input": "전세권은 …", "output": "전세권 요약"},
                                  {"instruction": "전세란?", "input": "", "output": "전세는 …"}], ensure_ascii=False),
                      encoding="utf-8")
    examples, _ = load_examples(str(alpaca))
    assert examples[0].question == "요약하세요\n\n전세권은 …" and examples[1].answer == "전세는 …"

    chat = tmp_path / "chat.jsonl"
    chat.write_text("\n".join(json.dumps({"messages": m}, ensure_ascii=False) for m in [
        [{"role": "system", "content": "법률 도우미"}, {"role": "user", "content": "안녕"},
         {"role": "assistant", "content": "안녕하세요"}, {"role": "user", "content": "전세란?"},
         {"role": "assistant", "content": "전세는 …"}],
    ]), encoding="utf-8")
    (ex,), _ = load_examples(str(chat))
    assert ex.system == "법률 도우미" and ex.question == "전세란?" and len(ex.history) == 2


def test_malformed_jsonl_names_line_and_column(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "a", "answer": "b"}\n{"question": "c", "answer": }\n', encoding="utf-8")
    with pytest.raises(KoloraError, match=r"bad.jsonl:2:\d+: invalid JSON"):
        load_examples(str(path))


def test_missing_file_and_unsupported_type(tmp_path):
    with pytest.raises(KoloraError, match="not found"):
        load_examples(str(tmp_path / "nope.csv"))
    (tmp_path / "x.xlsx").write_bytes(b"PK")
    with pytest.raises(KoloraError, match="unsupported file type"):
        load_examples(str(tmp_path / "x.xlsx"))


def test_split_is_deterministic_stratified_8_1_1():
    examples, _ = load_examples(str(ROOT / "data" / "civil_law_qa.csv"))
    a = split_examples(examples, (0.8, 0.1, 0.1), seed=42)
    b = split_examples(examples, (0.8, 0.1, 0.1), seed=42)
    c = split_examples(examples, (0.8, 0.1, 0.1), seed=7)
    key = lambda s: [e.question for e in s["test"]]  # noqa: E731
    assert key(a) == key(b) and key(a) != key(c)
    n = len(examples)
    assert abs(len(a["train"]) - 0.8 * n) <= 6 and abs(len(a["test"]) - 0.1 * n) <= 6
    questions = [e.question for s in a.values() for e in s]
    assert len(questions) == len(set(questions)) == n  # a partition
    for cat, count in Counter(e.category for e in examples).items():
        in_test = sum(1 for e in a["test"] if e.category == cat)
        assert abs(in_test - 0.1 * count) <= 1, cat  # stratified


def test_bundled_dataset_quality():
    with open(ROOT / "data" / "civil_law_qa.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) >= 300
    assert list(rows[0].keys()) == ["question", "answer", "category", "difficulty"]
    assert len({r["question"] for r in rows}) == len(rows), "duplicate questions"
    assert len({r["answer"] for r in rows}) == len(rows), "duplicate answers"
    cite = re.compile(r"(민법|주택임대차보호법( 시행령)?|상가건물 임대차보호법) 제\d+조(의\d+)?")
    for r in rows:
        assert cite.search(r["answer"]), f"no article cited: {r['question']}"
        assert r["difficulty"] in ("쉬움", "보통", "어려움")
    cats = Counter(r["category"] for r in rows)
    assert {"전세권", "민법임대차", "주택임대차", "상가임대차"} <= set(cats)
    colloquial = sum(1 for r in rows if re.search(r"(요\?|요\.|요$|줘요|대요|네요)", r["question"]))
    assert colloquial > 100, "everyday phrasings, not only textbook ones"


def test_training_only_rows_join_the_training_split_only(tmp_path):
    from types import SimpleNamespace

    from kolora.data import load_splits

    main = write_csv(tmp_path / "qa.csv", [(f"질문 {i}번?", f"민법 제{600 + i}조에 따라 답 {i}.", "민법임대차", "보통")
                                           for i in range(20)])
    cfg = SimpleNamespace(data=SimpleNamespace(path=str(main), split=[0.8, 0.1, 0.1], seed=42, train_only=[]))
    plain, _ = load_splits(cfg)
    held_out = plain["test"][0].question
    extra = write_csv(tmp_path / "index.csv", [("제618조는 무엇을 정하나요?", "민법 제618조(임대차의 의의)입니다.", "민법임대차", "쉬움"),
                                               (held_out, "새어 나간 답", "민법임대차", "쉬움")])
    cfg.data.train_only = [str(extra)]
    splits, lines = load_splits(cfg)
    # validation and test are exactly what they were without the extra file
    for name in ("validation", "test"):
        assert [e.question for e in splits[name]] == [e.question for e in plain[name]]
    added = [e for e in splits["train"] if e.source == str(extra)]
    assert [e.question for e in added] == ["제618조는 무엇을 정하나요?"]  # the held-out question is not trained on
    assert len(splits["train"]) == len(plain["train"]) + 1
    text = "\n".join(lines)
    assert "2 rows read" in text and "(training only)" in text
    assert "skipped 1 × same question as a validation/test row" in text and "line 3" in text


# --------------------------------------------------------------------------- review items 10-14
def test_messages_content_parts_are_joined_and_other_parts_counted(tmp_path):
    text = lambda t: {"type": "text", "text": t}  # noqa: E731
    chat = tmp_path / "parts.jsonl"
    chat.write_text("\n".join(json.dumps({"messages": m}, ensure_ascii=False) for m in [
        [{"role": "system", "content": [text("법률 도우미")]},
         {"role": "user", "content": [text("계약서 첫 줄"), text("전세란?")]},
         {"role": "assistant", "content": [text("전세는 …")]}],
        [{"role": "user", "content": [text("이 사진의 계약서는?"), {"type": "image_url", "image_url": {"url": "x.png"}}]},
         {"role": "assistant", "content": "임대차 계약서예요."}],
        [{"role": "user", "content": "안녕"}, {"role": "assistant", "content": "안녕하세요"},
         {"role": "user", "content": [text("보증금은?")]}, {"role": "assistant", "content": "돌려받아요."}],
    ]) + "\n", encoding="utf-8")
    examples, report = load_examples(str(chat))
    assert [e.question for e in examples] == ["계약서 첫 줄\n전세란?", "보증금은?"]
    assert examples[0].system == "법률 도우미" and examples[0].answer == "전세는 …"
    assert examples[1].history == [{"role": "user", "content": "안녕"}, {"role": "assistant", "content": "안녕하세요"}]
    assert report.rows == 3 and report.kept == 2
    assert dict(report.skipped) == {"message with a non-text content part (image_url)": [2]}
    assert not any("'type'" in e.question + e.answer + (e.system or "") for e in examples)  # no Python repr


def test_stray_byte_in_a_utf8_file_is_located_not_read_as_cp949(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_bytes(b"question,answer\nIs the tenant\x92s deposit safe?,Yes: article 3.\n")
    with pytest.raises(KoloraError) as e:
        load_examples(str(path))
    assert "qa.csv:2:14: cannot decode byte 0x92" in str(e.value) and "UTF-8" in e.value.hint
    # the same in a Korean UTF-8 file (not decodable as cp949 either): line and column in characters
    path.write_bytes("question,answer\n전세란?,민법 제303조\n보증금".encode() + b"\x92" + "은?,돌려받아요\n".encode())
    with pytest.raises(KoloraError, match=r"qa\.csv:3:4: cannot decode byte 0x92"):
        load_examples(str(path))


def test_cp949_with_rare_syllables_still_decodes(tmp_path):
    # 똠, 햏, 뷁 are outside KS X 1001: cp949's extension encodes them (the bytes a stray byte makes)
    rows = ROWS + [("똠방각하와 햏 그리고 뷁은 무슨 뜻인가요?", "흔하지 않은 글자도 그대로 읽혀요.", "전세권", "쉬움")]
    path = write_csv(tmp_path / "qa.csv", rows, "cp949")
    examples, report = load_examples(str(path))
    assert report.encoding == "cp949" and [e.question for e in examples] == [r[0] for r in rows]


def test_same_question_with_other_answers_stays_in_one_split():
    import unicodedata

    from kolora.data import Example

    variants = ["{}이란 무엇인가요?", "{}이란  무엇인가요", " {}이란 무엇인가요?!", unicodedata.normalize("NFD", "{}이란 무엇인가요?")]
    examples = [Example(v.format(f"용어{i}"), f"답 {i}-{k}", "전세권" if i % 2 else "민법임대차")
                for i in range(12) for k, v in enumerate(variants)]
    for seed in (42, 7):
        a = split_examples(examples, (0.8, 0.1, 0.1), seed=seed)
        assert a == split_examples(examples, (0.8, 0.1, 0.1), seed=seed)  # deterministic
        where = {}
        for name, rows in a.items():
            for e in rows:
                where.setdefault(e.answer.split("-")[0], set()).add(name)
        assert all(len(s) == 1 for s in where.values()), where
        assert len(a["validation"]) == len(a["test"]) == 8 and len(a["train"]) == 32  # one question per category each


def test_bundled_article_paraphrasing_a_held_out_question_is_not_trained_on():
    from kolora.config import load_yaml
    from kolora.data import load_splits

    cfg = load_yaml(ROOT / "configs" / "gemma3-270m.yaml")
    cfg.data.train_only = [str(ROOT / "data" / "civil_law_articles.csv")]  # the grounded preset only indexes it
    splits, lines = load_splits(cfg)
    held = {e.line for name in ("validation", "test") for e in splits[name]}
    assert 79 in held  # civil_law_qa.csv:79, the outer-wall repair question
    trained = {e.line for e in splits["train"] if e.source}
    assert 319 not in trained  # its paraphrase in civil_law_articles.csv (same 민법 제624조 answer)
    assert 223 in trained  # 0.300 similar to qa:108 but another article: kept
    text = "\n".join(lines)
    assert "near-duplicate of a validation/test question" in text and "319" in text


def test_jsonl_with_unicode_line_separators_inside_strings(tmp_path):
    path = tmp_path / "sep.jsonl"
    rows = [{"question": "첫 줄\u2028둘째 줄?", "answer": "단락\u2029끝\x85."}, {"question": "q2", "answer": "a2"}]
    path.write_bytes("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode() + b"\r\n")
    examples, _ = load_examples(str(path))
    assert [(e.question, e.answer, e.line) for e in examples] == [(r["question"], r["answer"], i + 1) for i, r in enumerate(rows)]
