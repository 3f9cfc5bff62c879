"""Reading QA / instruction data, checking it, and splitting it.

Formats: CSV (UTF-8, UTF-8 with BOM, cp949/EUC-KR from Excel), JSON (a list of objects,
Alpaca/KoAlpaca `instruction,input,output` or `question,answer`), JSONL (the same, or chat
`messages`), and a Hugging Face hub dataset name when online. Nothing is dropped silently:
every skipped row is counted with its reason and line in the `DataReport`.
"""

from __future__ import annotations

import csv
import io
import json
import random
import unicodedata
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import KoloraError, nearest

QUESTION_KEYS = ("question", "질문", "instruction", "prompt", "q", "query")
ANSWER_KEYS = ("answer", "답변", "output", "response", "a", "completion")
INPUT_KEYS = ("input", "context")
CATEGORY_KEYS = ("category", "분류", "카테고리")
DIFFICULTY_KEYS = ("difficulty", "난이도", "level")
NAN_STRINGS = {"nan", "NaN", "NULL", "null", "None", "#N/A"}


@dataclass
class Example:
    question: str
    answer: str
    category: str | None = None
    difficulty: str | None = None
    history: list = field(default_factory=list)  # earlier chat turns: [{"role", "content"}]
    system: str | None = None
    line: int = 0  # line (CSV/JSONL) or index (JSON) in the source file
    source: str | None = None  # the data.train_only file it came from (None: data.path)
    context: str | None = None  # retrieved passages put before the question (retrieval.corpus); None: ungrounded

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in (None, [], "")}


@dataclass
class DataReport:
    path: str
    encoding: str = "utf-8"
    rows: int = 0
    kept: int = 0
    skipped: dict = field(default_factory=lambda: defaultdict(list))  # reason -> [line, …]
    notes: list = field(default_factory=list)  # warnings that drop nothing (unused columns)
    unit: str = "line"  # JSON lists are counted by item (0-based), CSV/JSONL by line

    def skip(self, reason: str, line: int) -> None:
        self.skipped[reason].append(line)

    def lines(self) -> list[str]:
        out = [f"{self.path}: {self.rows} rows read ({self.encoding}), {self.kept} kept"]
        for reason, where in self.skipped.items():
            shown = ", ".join(map(str, where[:10])) + (" …" if len(where) > 10 else "")
            out.append(f"  skipped {len(where)} × {reason} ({self.unit} {shown})")
        out += [f"  note: {n}" for n in self.notes]
        return out


# --------------------------------------------------------------------------- reading
def decode(raw: bytes, path: Path) -> tuple[str, str]:
    """UTF-8 (with or without BOM), UTF-16 with BOM (Excel's "Unicode text"), then cp949 — a
    superset of EUC-KR, what Korean Excel writes for "CSV" — only when the bytes look like it
    (see `_as_cp949`). No guessing beyond that: a wrong guess would silently turn text into
    mojibake, so anything else is an error naming the line and column of the first bad byte."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return raw.decode("utf-16"), "utf-16"
        except UnicodeDecodeError:
            pass
    body = raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw
    try:
        return body.decode("utf-8"), "utf-8"
    except UnicodeDecodeError as e:
        bad = e.start
    text = _as_cp949(body)
    if text is not None:
        return text, "cp949"
    line = body.count(b"\n", 0, bad) + 1
    column = len(body[body.rfind(b"\n", 0, bad) + 1:bad].decode("utf-8")) + 1  # in characters, like an editor
    raise KoloraError(f"{path}:{line}:{column}: cannot decode byte 0x{body[bad]:02x} as UTF-8 "
                      "(and the file is not cp949/EUC-KR Korean text)",
                      "save the file as UTF-8 ('CSV UTF-8' in Excel), or convert it with iconv -f <its encoding> -t utf-8")


def _as_cp949(raw: bytes) -> str | None:
    """The text when `raw` is cp949 Korean, else None.

    Decoding as cp949 without error proves little: cp949's extension (UHC) gives almost any
    byte >= 0x81 followed by an ASCII letter a meaning, so a UTF-8 file with one stray
    Windows-1252 byte "decodes" (`tenant\\x92s` -> `tenant뭩`). Korean text is overwhelmingly
    written with KS X 1001 characters (the EUC-KR set, both bytes >= 0xA1: its 2,350 Hangul
    syllables cover all but a tiny share of real text), while a stray byte before ASCII never
    makes one. So: cp949 only when it decodes, has at least one KS X 1001 Hangul syllable (lead
    byte 0xB0-0xC8), and KS X 1001 characters are most of its double-byte characters; the rare
    extension syllables (똠, 햏) in a real Korean file are then still read."""
    try:
        text = raw.decode("cp949")
    except UnicodeDecodeError:
        return None
    wide = Counter(ch for ch in text if ord(ch) > 0x7F)
    common = hangul = 0
    for ch, n in wide.items():
        b = ch.encode("cp949")
        if len(b) == 2 and b[0] >= 0xA1 and b[1] >= 0xA1:
            common += n
            hangul += n if 0xB0 <= b[0] <= 0xC8 else 0
    return text if hangul and 2 * common > sum(wide.values()) else None


def _pick(keys: list[str], names: tuple[str, ...]) -> str | None:
    lowered = {k.strip().lower(): k for k in keys if isinstance(k, str)}
    for n in names:
        if n in lowered:
            return lowered[n]
    return None


def _clean(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value != value:  # NaN
        return ""
    text = str(value).strip()
    return "" if text in NAN_STRINGS else text


def _field_problem(value, name: str) -> str | None:
    """Why a question/answer cell is unusable, as a report reason; None when it is fine."""
    if value is None or (isinstance(value, str) and value == ""):
        return f"empty {name}"
    if isinstance(value, bool) or isinstance(value, (list, dict)):
        return f"wrong type: {name} is {type(value).__name__}, expected text"
    if isinstance(value, float) and value != value or (isinstance(value, str) and value.strip() in NAN_STRINGS):
        return f"NaN/NULL {name}"
    if isinstance(value, str) and not value.strip():
        return f"whitespace-only {name}"
    return None


def load_examples(path: str) -> tuple[list[Example], DataReport]:
    p = Path(path).expanduser()
    if not p.exists():
        if "/" in path and not path.startswith((".", "/", "~")) and not p.suffix:
            return _load_hub(path)
        raise KoloraError(f"data file not found: {path}", "check the path (the bundled data is data/civil_law_qa.csv)")
    if p.is_dir():
        raise KoloraError(f"{path} is a directory", "pass a .csv, .json or .jsonl file")
    suffix = p.suffix.lower()
    if suffix not in (".csv", ".tsv", ".json", ".jsonl"):
        raise KoloraError(f"{path}: unsupported file type '{suffix}'", "use .csv, .json or .jsonl")
    text, encoding = decode(p.read_bytes(), p)
    report = DataReport(str(p), encoding)
    if suffix in (".csv", ".tsv"):
        records = _read_csv(text, p, "\t" if suffix == ".tsv" else ",")
    elif suffix == ".jsonl":
        records = _read_jsonl(text, p)
    else:
        records = _read_json(text, p)
        report.unit = "item"
    examples = _to_examples(records, p, report)
    return examples, report


def _read_csv(text: str, path: Path, delimiter: str) -> list[tuple[int, dict]]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise KoloraError(f"{path}: the file is empty", "add a header row question,answer[,category,difficulty]") from None
    header = [h.strip().lstrip("\ufeff") for h in header]
    records = []
    for row in reader:
        line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue  # blank line
        if len(row) != len(header):
            records.append((line, {"__bad__": f"has {len(row)} fields, header has {len(header)}"}))
            continue
        records.append((line, dict(zip(header, row))))
    if not records:
        _check_columns(header, path)  # a header-only file still gets the column check first
    return records


def _read_jsonl(text: str, path: Path) -> list[tuple[int, dict]]:
    records = []
    # "\n" only: str.splitlines also splits at U+2028/U+2029/U+0085, which JSON allows raw inside strings
    for i, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise KoloraError(f"{path}:{i}:{e.colno}: invalid JSON ({e.msg})", "fix that line; each line must be one JSON object") from None
        if not isinstance(obj, dict):
            raise KoloraError(f"{path}:{i}: expected a JSON object, got {type(obj).__name__}")
        records.append((i, obj))
    return records


def _read_json(text: str, path: Path) -> list[tuple[int, dict]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise KoloraError(f"{path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg})", "fix the file, or use .jsonl for one object per line") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise KoloraError(f"{path}: expected a list of examples (or an object holding one list)")
        data = lists[0]
    if not isinstance(data, list):
        raise KoloraError(f"{path}: expected a JSON list of examples")
    out = []
    for i, obj in enumerate(data):
        if not isinstance(obj, dict):
            raise KoloraError(f"{path}: item {i} is {type(obj).__name__}, expected an object")
        out.append((i, obj))
    return out


def _check_columns(keys: list[str], path: Path) -> tuple[str, str]:
    q, a = _pick(keys, QUESTION_KEYS), _pick(keys, ANSWER_KEYS)
    for found, want in ((q, "question"), (a, "answer")):
        if found is None:
            guess = nearest(want, [k for k in keys if isinstance(k, str)])
            hint = f"rename column '{guess}' to '{want}'" if guess else f"add {'an' if want[0] in 'aeiou' else 'a'} '{want}' column (or messages / instruction,output)"
            raise KoloraError(f"{path}: no '{want}' column (found: {', '.join(map(str, keys)) or 'none'})", hint)
    return q, a


KNOWN_KEYS = QUESTION_KEYS + ANSWER_KEYS + INPUT_KEYS + CATEGORY_KEYS + DIFFICULTY_KEYS + ("messages", "system", "id")


def _note_unknown_columns(keys: list, report: DataReport) -> None:
    """A misspelled optional column (`catgory`) would silently lose its values: say so."""
    for k in keys:
        if isinstance(k, str) and k.strip().lower() not in KNOWN_KEYS:
            guess = nearest(k.strip().lower(), [c for c in KNOWN_KEYS if c.isascii()])
            report.notes.append(f"column '{k}' is not used" + (f" (did you mean '{guess}'?)" if guess else ""))


def _to_examples(records: list[tuple[int, dict]], path: Path, report: DataReport) -> list[Example]:
    examples: list[Example] = []
    seen: set[tuple[str, str]] = set()
    cols = None
    for line, rec in records:
        report.rows += 1
        if "__bad__" in rec:
            report.skip(f"malformed row ({rec['__bad__']})", line)
            continue
        if "messages" in rec:
            ex = _from_messages(rec["messages"], path, line)
            if isinstance(ex, str):
                report.skip(ex, line)
                continue
        else:
            if cols is None:
                cols = _check_columns(list(rec.keys()), path)
                _note_unknown_columns(list(rec.keys()), report)
            problem = _field_problem(rec.get(cols[0]), "question") or _field_problem(rec.get(cols[1]), "answer")
            if problem:
                report.skip(problem, line)
                continue
            q = _clean(rec.get(cols[0]))
            inp = _clean(rec.get(_pick(list(rec.keys()), INPUT_KEYS) or "", ""))
            if q and inp:
                q = f"{q}\n\n{inp}"
            ex = Example(q, _clean(rec.get(cols[1])),
                         _clean(rec.get(_pick(list(rec.keys()), CATEGORY_KEYS) or "")) or None,
                         _clean(rec.get(_pick(list(rec.keys()), DIFFICULTY_KEYS) or "")) or None, line=line)
        if not ex.question:
            report.skip("empty question", line)
            continue
        if not ex.answer:
            report.skip("empty answer", line)
            continue
        key = (ex.question, ex.answer)
        if key in seen:
            report.skip("duplicate row", line)
            continue
        seen.add(key)
        examples.append(ex)
    report.kept = len(examples)
    if not examples:
        raise KoloraError(f"{path}: no usable examples ({'; '.join(x.strip() for x in report.lines()[1:]) or 'the file has no rows'})",
                          "fix the rows listed, then run `kolora prepare` again")
    return examples


TEXT_PART_TYPES = ("text", "input_text", "output_text")  # OpenAI chat / Responses API text parts


def _content_text(content) -> tuple[str, str | None]:
    """A message's text and None, or ("", the skip reason). OpenAI-style content is a list of
    parts: text parts are joined with a newline (they are usually separate passages, and
    gluing them would merge words); any other part (an image, audio) cannot be trained on as
    text, so the whole row is skipped and counted rather than trained without it."""
    if content is None:  # an assistant turn that only called a tool
        return "", None
    if isinstance(content, str):
        return content, None
    if not isinstance(content, list):
        return "", f"wrong type: message content is {type(content).__name__}, expected text or a list of parts"
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in TEXT_PART_TYPES and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif isinstance(kind, str) and kind not in TEXT_PART_TYPES:
            return "", f"message with a non-text content part ({kind})"
        else:
            return "", "message with a malformed content part (expected {type: text, text: …})"
    return "\n".join(texts), None


def _from_messages(messages, path: Path, line: int) -> Example | str:
    """The example from a chat `messages` row, or the reason to skip it."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise KoloraError(f"{path}:{line}: 'messages' must be a list of {{role, content}} objects")
    if not messages or messages[-1]["role"] != "assistant":
        return "messages without a final assistant turn"
    texts = []
    for m in messages:
        text, problem = _content_text(m["content"])
        if problem:
            return problem
        texts.append(text)
    first = 1 if messages[0]["role"] == "system" else 0
    system = texts[0] if first else None
    turns = [{"role": m["role"], "content": t} for m, t in zip(messages[first:], texts[first:])]
    users = [i for i, m in enumerate(turns) if m["role"] == "user"]
    if not users:
        return "messages without a final assistant turn"
    last_user = users[-1]
    return Example(_clean(turns[last_user]["content"]), _clean(turns[-1]["content"]),
                   history=turns[:last_user], system=system, line=line)


def _load_hub(name: str) -> tuple[list[Example], DataReport]:
    try:
        import datasets
    except ImportError:
        raise KoloraError(f"'{name}' is not a local file; loading hub datasets needs the datasets package",
                          "pip install datasets, or pass a local CSV/JSON/JSONL file") from None
    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:  # noqa: BLE001 - network, auth, missing: all end the same way
        raise KoloraError(f"cannot load dataset '{name}' from the Hugging Face hub ({type(e).__name__})",
                          "check the name and the network, or download it as CSV/JSONL and pass the file") from None
    report = DataReport(f"hub:{name}", "utf-8")
    records = [(i, dict(r)) for i, r in enumerate(ds)]
    return _to_examples(records, Path(name), report), report


# --------------------------------------------------------------------------- splitting
SPLITS = ("train", "validation", "test")


def normalise_question(text: str) -> str:
    """The key that says two questions are the same: NFC (Korean typed on a Mac arrives as
    decomposed jamo), case-folded, letters/numbers/marks only, so spacing and punctuation
    ("전세란?" vs "전세란 ") do not make it another question."""
    text = unicodedata.normalize("NFC", text).casefold()
    key = "".join(ch for ch in text if unicodedata.category(ch)[0] in "LNM")
    return key or " ".join(text.split())  # a question of only symbols still gets a key


def split_examples(examples: list[Example], fractions=(0.8, 0.1, 0.1), seed: int = 42) -> dict[str, list[Example]]:
    """Seeded, deterministic split, stratified by category when the data has one.

    The unit is a question, not a row: every row whose normalised question is the same (the
    same question with another answer) goes to the same split, or the test answer would be
    trained on. A question's rows follow the category of its first row. Each category's
    questions are shuffled with their own seeded RNG and handed out in that order until each
    split has its share of rows, so adding rows of one category never moves rows of another
    between splits; with one row per question this is exactly a shuffle-and-cut of the rows."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise KoloraError(f"data.split must be three fractions summing to 1, got {list(fractions)}", "e.g. 0.8,0.1,0.1")
    groups: dict[str, dict[str, list[Example]]] = defaultdict(dict)  # category -> question key -> rows, in file order
    category_of: dict[str, str] = {}
    for ex in examples:
        key = normalise_question(ex.question)
        cat = category_of.setdefault(key, ex.category or "")
        groups[cat].setdefault(key, []).append(ex)
    out = {s: [] for s in SPLITS}
    for cat in sorted(groups):
        units = list(groups[cat].values())
        random.Random(f"{seed}:{cat}").shuffle(units)
        n = sum(len(u) for u in units)
        n_val = round(n * fractions[1])
        n_test = round(n * fractions[2])
        if len(units) >= 3:  # every category appears in every non-empty split when it can
            n_val = max(n_val, 1 if fractions[1] > 0 else 0)
            n_test = max(n_test, 1 if fractions[2] > 0 else 0)
        val, test, train = [], [], []
        for unit in units:
            (val if len(val) < n_val else test if len(test) < n_test else train).extend(unit)
        out["validation"] += val
        out["test"] += test
        out["train"] += train
    if not out["train"]:
        raise KoloraError(f"the training split is empty ({len(examples)} examples)", "add data or change data.split")
    return out


def _trigrams(key: str) -> set[str]:
    return {key[i:i + 3] for i in range(len(key) - 2)} or {key}


# Character 3-gram Jaccard of normalised questions at or above which a training-only row counts
# as a paraphrase of a held-out question. Measured on the bundled data (articles rows vs the 114
# validation/test questions of civil_law_qa.csv, split 8:1:1 seed 42; max similarity per row:
# 71 rows < 0.05, 151 in 0.05-0.10, 102 in 0.10-0.15, 28 in 0.15-0.20, 10 in 0.20-0.25, 7 in
# 0.25-0.30, 5 >= 0.30). Above the cut, all paraphrases of a held-out question with its answer's
# article: 0.462 (articles:319 ~ qa:79, 민법 제624조), 0.400 (80 ~ 277), 0.366 (258 ~ 126), 0.310
# (235 ~ 540). Just below, 0.300 (223 ~ 108) asks about another article (제316조 vs 제646조), as
# do 0.296 (41 ~ 576) and 0.263 (124 ~ 277). Paraphrases in the same band below 0.30 (16 ~ 169 at
# 0.296, 290 ~ 136 at 0.294) cannot be told from those by the question alone and stay.
NEAR_DUPLICATE = 0.305


def _nearest_held_out(keys: list[str], held_out: list[Example]) -> list[tuple[float, Example | None]]:
    """For each question key, its highest 3-gram Jaccard with a held-out question and that row.
    An inverted index from 3-gram to held-out rows keeps this near-linear on large files."""
    grams = [_trigrams(normalise_question(ex.question)) for ex in held_out]
    index: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(grams):
        for t in g:
            index[t].append(i)
    out = []
    for key in keys:
        mine = _trigrams(key)
        shared = Counter(i for t in mine for i in index.get(t, ()))
        best = max(((n / (len(mine) + len(grams[i]) - n), i) for i, n in shared.items()), default=(0.0, None),
                   key=lambda t: (t[0], -t[1]))
        out.append((best[0], held_out[best[1]] if best[1] is not None else None))
    return out


def add_training_only(splits: dict[str, list[Example]], paths: list[str]) -> list[str]:
    """Append the rows of `data.train_only` files to the training split and return report lines.

    These files (an article index, a glossary) teach the model but are never validation or test
    rows, so they cannot make the held-out figures look better than they are. A row whose
    question is also a validation/test question, or a near-duplicate of one (a paraphrase that
    teaches the same answer), would leak the exam: it is dropped and counted."""
    held_out = [ex for name in ("validation", "test") for ex in splits[name]]
    held_keys = {normalise_question(ex.question) for ex in held_out}
    lines = []
    for path in paths:
        examples, report = load_examples(path)
        keys = [normalise_question(ex.question) for ex in examples]
        near = []
        for ex, key, (score, match) in zip(examples, keys, _nearest_held_out(keys, held_out)):
            if key in held_keys:
                report.skip("same question as a validation/test row of data.path: training on it would leak the held-out answer",
                            ex.line)
            elif score >= NEAR_DUPLICATE:
                report.skip(f"near-duplicate of a validation/test question of data.path (3-gram similarity >= {NEAR_DUPLICATE}): "
                            "training on it would leak the held-out answer", ex.line)
                near.append(f"{ex.line} ~ {match.line} ({score:.2f})")
            else:
                ex.source = str(path)
                splits["train"].append(ex)
                continue
            report.kept -= 1
        lines += [line + " (training only)" if i == 0 else line for i, line in enumerate(report.lines())]
        if near:
            lines.append(f"    near-duplicates ({report.unit} ~ data.path line, similarity): "
                         + ", ".join(near[:10]) + (" …" if len(near) > 10 else ""))
    return lines


def load_splits(cfg) -> tuple[dict[str, list[Example]], list[str]]:
    """data.path read, checked and split, plus the data.train_only rows in the training split;
    with the report lines to show the user."""
    examples, report = load_examples(cfg.data.path)
    splits = split_examples(examples, cfg.data.split, cfg.data.seed)
    lines = report.lines() + add_training_only(splits, list(cfg.data.train_only or []))
    return splits, lines


def write_jsonl(examples: list[Example], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex.to_json(), ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[Example]:
    with open(path, encoding="utf-8") as f:
        return [Example(**json.loads(line)) for line in f if line.strip()]


def count_hangul(text: str) -> int:
    return sum(1 for ch in text if "\uac00" <= ch <= "\ud7a3")


def category_table(splits: dict[str, list[Example]]) -> list[str]:
    cats = sorted({ex.category or "-" for exs in splits.values() for ex in exs})
    width = max([len(c) for c in cats] + [8])
    lines = [f"{'category':<{width}} " + " ".join(f"{s:>10}" for s in SPLITS)]
    for cat in cats:
        counts = [sum(1 for ex in splits[s] if (ex.category or "-") == cat) for s in SPLITS]
        lines.append(f"{cat:<{width}} " + " ".join(f"{c:>10}" for c in counts))
    lines.append(f"{'total':<{width}} " + " ".join(f"{len(splits[s]):>10}" for s in SPLITS))
    return lines


def difficulty_counts(examples: list[Example]) -> Counter:
    return Counter(ex.difficulty or "-" for ex in examples)
