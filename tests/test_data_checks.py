"""Every kind of bad input, through `kolora prepare` / `kolora train` as a user meets it: either
one error line naming the file (and line), exit 2, no traceback — or a counted, listed warning
in the data report, never a silent drop. `pytest -s` prints the message each kind gives."""

import json

import pytest

from kolora.cli import main

HEADER = "question,answer,category,difficulty\n"
GOOD = "전세권이란 무엇인가요?,민법 제303조 제1항에 따른 물권입니다.,전세권,쉬움\n"
GOOD2 = "보증금은 언제 돌려받나요?,임대차가 끝나면 돌려받습니다.,주택임대차,보통\n"

# kind -> (file name, bytes, "error" | "warning", fragments expected in the message)
CASES = {
    "utf-8 with BOM (Excel 'CSV UTF-8')": ("bom.csv", ("\ufeff" + HEADER + GOOD + GOOD2).encode("utf-8"), "ok", ["2 kept"]),
    "cp949 (Excel 'CSV')": ("cp949.csv", (HEADER + GOOD + GOOD2).encode("cp949"), "ok", ["(cp949)", "2 kept"]),
    "EUC-KR": ("euckr.csv", (HEADER + GOOD + GOOD2).encode("euc-kr"), "ok", ["(cp949)", "2 kept"]),
    "undecodable bytes": ("bad-enc.csv", HEADER.encode() + b"\xff\xfe\xfa,\x80\x81,a,b\n", "error",
                          ["bad-enc.csv:2:1: cannot decode byte 0xff", "CSV UTF-8"]),
    "stray byte in UTF-8 (a Windows-1252 apostrophe)": (
        "stray.csv", HEADER.encode() + GOOD.encode() + b"Can the landlord keep the tenant\x92s deposit?,No.,a,b\n", "error",
        ["stray.csv:3:33: cannot decode byte 0x92 as UTF-8", "save the file as UTF-8"]),
    "empty file": ("empty.csv", b"", "error", ["empty.csv: the file is empty"]),
    "missing column": ("nocol.csv", ("question,category\n가,나\n").encode(), "error",
                       ["nocol.csv: no 'answer' column", "add an 'answer' column"]),
    "misnamed column": ("misnamed.csv", ("question,answr,category\n가,나,다\n").encode(), "error",
                        ["no 'answer' column", "rename column 'answr' to 'answer'"]),
    "misnamed optional column": ("optcol.csv", ("question,answer,catgory\n가,나,다\n").encode(), "warning",
                                 ["column 'catgory' is not used (did you mean 'category'?)"]),
    "empty field": ("emptyfield.csv", (HEADER + GOOD + "빈 답변 질문,,전세권,쉬움\n").encode(), "warning",
                    ["skipped 1 × empty answer (line 3)"]),
    "whitespace-only field": ("ws.csv", (HEADER + GOOD + "   ,답변,전세권,쉬움\n").encode(), "warning",
                              ["skipped 1 × whitespace-only question (line 3)"]),
    "NaN cell": ("nan.csv", (HEADER + GOOD + "NaN 답변 질문,NaN,전세권,쉬움\n").encode(), "warning",
                 ["skipped 1 × NaN/NULL answer (line 3)"]),
    "duplicate row": ("dup.csv", (HEADER + GOOD + GOOD2 + GOOD).encode(), "warning",
                      ["skipped 1 × duplicate row (line 4)"]),
    "malformed CSV row": ("fields.csv", (HEADER + GOOD + "질문만,답,분류\n").encode(), "warning",
                          ["skipped 1 × malformed row (has 3 fields, header has 4) (line 3)"]),
    "malformed JSONL": ("bad.jsonl", b'{"question": "a", "answer": "b"}\n{"question": "c", "answer": }\n', "error",
                        ["bad.jsonl:2:29: invalid JSON"]),
    "JSONL line not an object": ("list.jsonl", b'{"question": "a", "answer": "b"}\n[1, 2]\n', "error",
                                 ["list.jsonl:2: expected a JSON object, got list"]),
    "malformed JSON": ("bad.json", b'[\n {"question": "a", "answer": "b"},\n {"question": "c" "answer": "d"}\n]\n',
                       "error", ["bad.json:3:19: invalid JSON"]),
    "wrong type": ("types.json", json.dumps([{"question": "전세란?", "answer": "전세권입니다."},
                                             {"question": "목록?", "answer": ["a", "b"]},
                                             {"question": True, "answer": "참"}]).encode(), "warning",
                   ["skipped 1 × wrong type: answer is list, expected text (item 1)",
                    "skipped 1 × wrong type: question is bool, expected text (item 2)"]),
    "messages without an assistant answer": (
        "chat.jsonl", (json.dumps({"messages": [{"role": "user", "content": "안녕"}, {"role": "assistant", "content": "네"}]},
                                  ensure_ascii=False) + "\n" +
                       json.dumps({"messages": [{"role": "user", "content": "질문만"}]}, ensure_ascii=False) + "\n").encode(),
        "warning", ["skipped 1 × messages without a final assistant turn (line 2)"]),
    "messages with an image part": (
        "parts.jsonl", (json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": "안녕"}]},
                                                 {"role": "assistant", "content": "네"}]}, ensure_ascii=False) + "\n" +
                        json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a.png"}}]},
                                                 {"role": "assistant", "content": "사진이네요"}]}, ensure_ascii=False) + "\n").encode(),
        "warning", ["1 kept", "skipped 1 × message with a non-text content part (image_url) (line 2)"]),
    "JSONL with U+2028 inside a string": (
        "sep.jsonl", (json.dumps({"question": "첫 줄\u2028둘째 줄", "answer": "네"}, ensure_ascii=False) + "\r\n").encode(),
        "ok", ["1 rows read", "1 kept"]),
    "empty dataset after filtering": ("allbad.csv", (HEADER + "가,,,\n나,  ,,\n").encode(), "error",
                                      ["allbad.csv: no usable examples", "empty answer", "whitespace-only answer"]),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_each_bad_input_kind(kind, tmp_path, capsys, tiny_models):
    name, raw, outcome, fragments = CASES[kind]
    path = tmp_path / name
    path.write_bytes(raw)
    code = main(["prepare", str(path), "--model", str(tiny_models["llama"])])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    if outcome == "error":
        assert code == 2, out + err
        lines = [line for line in err.splitlines() if line.startswith("kolora: error:")]
        assert len(lines) == 1, err
        message = lines[0]
    else:
        assert code == 0, err
        message = out
    for frag in fragments:
        assert frag in message, f"{frag!r} not in {message!r}"
    print(f"\n[{kind}] {outcome}: " + (message if outcome == "error" else " | ".join(
        line.strip() for line in out.splitlines() if "skipped" in line or "note:" in line or "kept" in line)))


def test_rows_over_max_length_are_counted_in_prepare_and_train(tmp_path, capsys, tiny_models):
    path = tmp_path / "long.csv"
    path.write_text(HEADER + GOOD + GOOD2 + "긴 질문," + "아주 긴 답변입니다. " * 40 + ",전세권,어려움\n", encoding="utf-8")
    assert main(["prepare", str(path), "--model", str(tiny_models["llama"]), "--max-length", "64"]) == 0
    out = capsys.readouterr().out
    assert "rows over data.max_length=64: 1 (lines 4)" in out
    # train: counted and shown; when nothing is left, one line instead of an empty run
    code = main(["train", "--model", str(tiny_models["llama"]), "--data", str(path), "--max-length", "8",
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "no training rows left after the length check" in err and "raise data.max_length" in err
