"""The grounding corpus: the statute articles (or any passages) answers are grounded in.

Grounded answers need passages a model can be shown and an answer can be checked against.
Statutes come as Markdown or plain text and are split into one passage per article
(`제3조`, `제3조의2`), because an article is what answers cite and what a person checks;
other material comes as JSONL passages `{id, title, text}`. The corpus keeps a sha256 per
file so a run can later say which file changed since its index was built.

`find_citations` reads which passages an answer cites ("주택임대차보호법 제3조의2 제1항에 따라",
"같은 법 시행령 제2조", "이 법 제6조"), resolving law names the way a reader would: the name
written before the article, else the law named last in the same text.

Nothing is dropped silently: skipped sections and rows are counted in `Corpus.report`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .data import decode
from .errors import KoloraError

FORMATS = ".md, .txt (statutes with 제N조 articles) or .jsonl (one {\"id\", \"title\", \"text\"} per line)"
SUFFIXES = (".md", ".txt", ".jsonl")

# 제3조, 제3조의2, 제 3 조 의 2. The article marker everywhere in this module.
ARTICLE = re.compile(r"제\s?(\d+)\s?조(?:\s?의\s?(\d+))?")
# An article heading: the marker, then an optional (title) and nothing else but "삭제 <date>".
# Anything else after the marker ("제3조에 따라", "제3조제1항") is a reference, not a heading.
_HEADING = re.compile(r"^\s*제\s?(\d+)\s?조(?:\s?의\s?(\d+))?\s*(?:\((?P<title>.*)\))?\s*(?P<rest>.*)$")
_MD_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
# 부칙, 부칙 <제471호,1958.2.22>, 부칙(민사집행법) <제7358호,2005.1.27>: the whole line, so a
# sentence that starts with '부칙 제2조에 따라' is not taken for one
_SUPPLEMENT = re.compile(r"^\s*부\s?칙\s*(?:\([^)]*\))?\s*(?:<[^>]*>)?\s*$")
_DIVISION = re.compile(r"^\s*제\s?\d+\s?(?:편|장|절|관)(?:\s|$)")  # 제1편 총칙, 제2장 인, …
_DELETED = re.compile(r"^삭제\s*(?:<[^>]*>)?\s*$")
_PARAGRAPH_MARK = re.compile(r"^\s*([\u2460-\u2473])", re.M)  # ① … ⑳ at the start of a line
_DOC_FILE = re.compile(r"^(?:README|SOURCES?|LICEN[CS]E|NOTICE)(?:\.|$)", re.I)
_MD_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|>~])")


def article_key(number: int | str, sub: int | str | None = None) -> str:
    """Normalised article number: (3, 2) → '제3조의2', (312, None) → '제312조'."""
    return f"제{int(number)}조" + (f"의{int(sub)}" if sub else "")


def law_key(name: str) -> str:
    """Law names compare without spaces: '상가건물 임대차보호법' is '상가건물임대차보호법'."""
    return re.sub(r"\s+", "", name)


@dataclass
class Passage:
    id: str
    text: str
    title: str = ""
    law: str | None = None
    article: str | None = None  # normalised, '제3조의2'
    source: str = ""  # corpus file (its key, see CorpusFile.name)
    line: int = 0  # where the article heading / JSONL row is, 1-based
    deleted: bool = False  # '삭제 <2015.2.3>': kept so a citation of it can be called repealed

    @property
    def header(self) -> str:
        """'주택임대차보호법 제3조의2(보증금의 회수)': how the passage is named to a model or a reader."""
        name = f"{self.law} {self.article}" if self.law and self.article else self.id
        return f"{name}({self.title})" if self.title else name

    def paragraphs(self) -> int:
        """How many numbered paragraphs (①, ②, …) the article has; 0 when it has none."""
        marks = _PARAGRAPH_MARK.findall(self.text)
        return max((ord(m) - 0x245F for m in marks), default=0)

    def to_json(self) -> dict:
        return asdict(self)


CIRCLED = re.compile(r"^([\u2460-\u2473])", re.M)  # ① … ⑳ opening a line: a paragraph (항)


def paragraphs(text: str) -> list[str]:
    """The article split at its paragraph marks (①, ②, …); [] when it has none. A single-
    paragraph article has no mark, and '제1항' of it is accepted: people cite it that way."""
    starts = [m.start() for m in CIRCLED.finditer(text)]
    return [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]


@dataclass
class CorpusFile:
    name: str  # key in fingerprints: file name, or path inside the folder that was passed
    path: str
    sha256: str
    kind: str  # 'markdown', 'text' or 'jsonl'
    passages: int = 0
    law: str | None = None


@dataclass
class Corpus:
    passages: list[Passage] = field(default_factory=list)
    files: list[CorpusFile] = field(default_factory=list)
    report: list[str] = field(default_factory=list)  # one line per file, plus what was skipped

    def __post_init__(self) -> None:
        self._by_id = {p.id: p for p in self.passages}
        self._by_article = {(law_key(p.law), p.article): p for p in self.passages if p.law and p.article}
        self._reader: CitationReader | None = None

    def reader(self) -> CitationReader:
        """The citation reader for this corpus, built once (it compiles the law names)."""
        if self._reader is None:
            self._reader = CitationReader(self)
        return self._reader

    def __len__(self) -> int:
        return len(self.passages)

    def get(self, passage_id: str) -> Passage | None:
        return self._by_id.get(passage_id)

    def article(self, law: str, article: str) -> Passage | None:
        return self._by_article.get((law_key(law), article))

    def laws(self) -> list[str]:
        """Law names in corpus order, each once."""
        return list(dict.fromkeys(p.law for p in self.passages if p.law))

    def file_hashes(self) -> dict[str, str]:
        return {f.name: f.sha256 for f in self.files}

    def fingerprint(self) -> str:
        """One sha256 over the file names and contents: equal fingerprints, equal corpus."""
        h = hashlib.sha256()
        for name, digest in sorted(self.file_hashes().items()):
            h.update(f"{name}\0{digest}\n".encode())
        return h.hexdigest()

    def changes(self, recorded: dict[str, str]) -> list[str]:
        """What differs from file hashes recorded earlier (e.g. in an index manifest), one line
        per file: 'changed: 민법.md', 'added: …', 'removed: …'. Empty when nothing changed."""
        now = self.file_hashes()
        out = [f"changed: {n}" for n in now if n in recorded and recorded[n] != now[n]]
        out += [f"added: {n}" for n in now if n not in recorded]
        out += [f"removed: {n}" for n in recorded if n not in now]
        return out


# =========================================================================== loading
def load_corpus(paths: list[str | Path] | str | Path) -> Corpus:
    """Read statute files (.md, .txt) and passage files (.jsonl); folders are read for those
    suffixes, sorted, recursively. Passage ids must be unique across all files."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise KoloraError("no grounding corpus given", f"pass files or folders with {FORMATS}")
    passages: list[Passage] = []
    files: list[CorpusFile] = []
    report: list[str] = []
    seen: dict[str, Passage] = {}
    notes: list[str] = []
    for name, path in _files(paths, notes):
        cfile, found, lines = _load_file(name, path)
        for p in found:
            if p.id in seen:
                other = seen[p.id]
                raise KoloraError(f"{path}:{p.line}: passage id '{p.id}' is already used in {other.source}:{other.line}",
                                  "give every passage a unique id (or do not pass the same statute twice)")
            seen[p.id] = p
        passages += found
        files.append(cfile)
        report += lines
    return Corpus(passages, files, report + notes)


def _files(paths, notes: list[str]) -> list[tuple[str, Path]]:
    """(name, path) per file. A folder's files are named by their path inside the folder's
    parent ('statutes/민법.md') so the names do not depend on where the data lives. Inside a
    folder, README/SOURCES/LICENSE/NOTICE files document the corpus and are not part of it
    (listed in `notes`); any other file there must parse."""
    out = []
    for raw in paths:
        p = Path(raw).expanduser()
        if not p.exists():
            raise KoloraError(f"grounding corpus not found: {raw}", "check the path (the bundled statutes are in data/statutes/)")
        if p.is_dir():
            inside = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES)
            if not inside:
                raise KoloraError(f"{raw}: no corpus files in this folder", f"put {FORMATS} files there")
            docs = [f for f in inside if _DOC_FILE.match(f.name)]
            notes += [f"not read (documentation): {f.relative_to(p.parent).as_posix()}" for f in docs]
            out += [(f.relative_to(p.parent).as_posix(), f) for f in inside if f not in docs]
        else:
            if p.suffix.lower() not in SUFFIXES:
                raise KoloraError(f"{raw}: unsupported corpus file type '{p.suffix}'", f"use {FORMATS}")
            out.append((p.name, p))
    return out


def _load_file(name: str, path: Path) -> tuple[CorpusFile, list[Passage], list[str]]:
    raw = path.read_bytes()
    if not raw.strip():
        raise KoloraError(f"{path}: the file is empty", f"a grounding corpus file holds {FORMATS}")
    if b"\0" in raw[:8192]:  # no text encoding we read has NUL bytes; PDF, HWP, DOCX, zip do
        raise KoloraError(f"{path}: this is a binary file, not text",
                          f"convert it to text first; accepted: {FORMATS}")
    text, _ = decode(raw, path)
    digest = hashlib.sha256(raw).hexdigest()
    if path.suffix.lower() == ".jsonl":
        passages, lines = _parse_jsonl(text, name, path)
        kind, law = "jsonl", None
    else:
        law = _law_name(text, path)
        passages, lines, kind = parse_statute(text, law, name)
    if not passages:
        raise KoloraError(f"{path}: no articles (제N조 …) or passages found",
                          f"accepted: {FORMATS}")
    cfile = CorpusFile(name, str(path), digest, kind, len(passages), law)
    deleted = sum(p.deleted for p in passages)
    head = f"{name}: {len(passages)} {'passages' if kind == 'jsonl' else 'articles'}"
    head += f" ({deleted} repealed, kept so citing them is reported as such)" if deleted else ""
    return cfile, passages, [head] + [f"  {line}" for line in lines]


# --------------------------------------------------------------------------- statutes
def _law_name(text: str, path: Path) -> str:
    """The law's name: front matter `제목:`, else the first '# ' heading that is not a division
    (제1편 …), else the file name ('주택임대차보호법_시행령.md' → '주택임대차보호법 시행령')."""
    front = re.match(r"\ufeff?---\s*\n(.*?)\n---\s*\n", text, re.S)
    if front:
        m = re.search(r"^제목:\s*['\"]?(.+?)['\"]?\s*$", front[1], re.M)
        if m:
            return m[1].strip()
    for line in text.splitlines():
        m = _MD_HEADING.match(line)
        if m and len(m[1]) == 1 and not _DIVISION.match(m[2]) and not _HEADING.match(m[2]):
            return m[2].strip()
    return path.stem.replace("_", " ").strip()


def _strip_front_matter(lines: list[str]) -> int:
    """Index of the first line after a '---' front-matter block (0 when there is none)."""
    if lines and lines[0].lstrip("\ufeff").strip() == "---":
        for i in range(1, len(lines)):
            if lines[i].strip() == "---":
                return i + 1
    return 0


def _heading(text: str) -> re.Match | None:
    """An article heading, or None for a reference that merely starts a line."""
    m = _HEADING.match(text)
    if not m:
        return None
    rest = m["rest"].strip()
    if m["title"] is None and rest and not rest.startswith("삭제"):
        return None
    return m


def parse_statute(text: str, law: str, source: str = "") -> tuple[list[Passage], list[str], str]:
    """Split a statute into article passages: (passages, report lines, 'markdown' | 'text').

    Markdown (law.go.kr via legalize-kr): an article is a heading `##### 제3조의2 (보증금의 회수)`
    and its body runs to the next heading of any level (편/장/절 headings end it too).
    Plain text (copied from law.go.kr): an article starts a line, `제3조의2(보증금의 회수) 본문…`.

    부칙 (supplementary provisions) are skipped and counted: every 부칙 block restarts at
    제1조, so their articles would collide with the law's own, and they hold transitional
    rules of past amendments that answers do not cite. Repealed articles ('삭제 <date>') are
    kept, marked `deleted`; an article heading with no text at all is skipped and reported."""
    lines = text.splitlines()
    start = _strip_front_matter(lines)
    markdown = any((m := _MD_HEADING.match(line)) and _heading(m[2]) for line in lines[start:])
    passages: list[Passage] = []
    report: list[str] = []
    current: dict | None = None
    supplement_level: int | None = None  # markdown level of the 부칙 heading we are inside
    supplement_from, supplement_lines = 0, 0

    def close() -> None:
        nonlocal current
        if current is None:
            return
        body = _clean_body(current["body"])
        if not body:
            report.append(f"skipped {law} {current['article']} (line {current['line']}): heading without text")
        else:
            passages.append(Passage(
                id=f"{law} {current['article']}", text=body, title=current["title"], law=law,
                article=current["article"], source=source, line=current["line"],
                deleted=bool(_DELETED.match(body))))
        current = None

    for i, line in enumerate(lines[start:], start=start + 1):
        md = _MD_HEADING.match(line) if markdown else None
        body_line = md[2] if md else line
        if supplement_level is not None:
            # a markdown heading at the 부칙's level or above that is not another 부칙 ends it
            if md and len(md[1]) <= supplement_level and not _SUPPLEMENT.match(md[2]):
                supplement_level = None
            else:
                supplement_lines += bool(line.strip())
                continue
        if _SUPPLEMENT.match(body_line) and (md or not markdown):
            close()
            supplement_level = len(md[1]) if md else 0  # plain text: 부칙 runs to the end
            supplement_from = supplement_from or i
            continue
        m = _heading(body_line) if (md or not markdown) else None
        if m:
            close()
            rest = m["rest"].strip()
            current = {"article": article_key(m[1], m[2]), "title": (m["title"] or "").strip(),
                       "line": i, "body": [rest] if rest else []}
        elif md or (not markdown and _DIVISION.match(line)):
            close()  # 편/장/절/관 headings, the law's title: not part of any article's text
        elif current is not None:
            current["body"].append(line)
    close()
    if supplement_from:
        report.append(f"skipped 부칙 (supplementary provisions) from line {supplement_from}: "
                      f"{supplement_lines} non-empty lines, not indexed")
    return passages, report, "markdown" if markdown else "text"


def _clean_body(lines: list[str]) -> str:
    """Article text without Markdown markup ('**①**' → '①', '1\\.' → '1.'), one line per
    paragraph or item, blank lines dropped."""
    out = []
    for line in lines:
        line = _MD_ESCAPE.sub(r"\1", line.replace("**", "")).strip()
        if line:
            out.append(line)
    return "\n".join(out)


# --------------------------------------------------------------------------- JSONL
def _parse_jsonl(text: str, name: str, path: Path) -> tuple[list[Passage], list[str]]:
    """Passages `{"id", "title", "text"}` as they are; `law` and `article` are optional (read
    from the id when it looks like '민법 제312조', so citations of them resolve)."""
    passages: list[Passage] = []
    skipped: dict[str, list[int]] = {}
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise KoloraError(f"{path}:{i}:{e.colno}: invalid JSON ({e.msg})",
                              'each line must be one object {"id": …, "title": …, "text": …}') from None
        if not isinstance(obj, dict):
            raise KoloraError(f"{path}:{i}: expected a JSON object, got {type(obj).__name__}",
                              'each line must be one object {"id": …, "title": …, "text": …}')
        pid, body = obj.get("id"), obj.get("text")
        if pid is None or str(pid).strip() == "":
            skipped.setdefault("no id", []).append(i)
            continue
        if not isinstance(body, str) or not body.strip():
            skipped.setdefault("no text", []).append(i)
            continue
        pid = str(pid).strip()
        law, article = obj.get("law"), obj.get("article")
        if article:
            m = ARTICLE.fullmatch(str(article).strip())
            article = article_key(m[1], m[2]) if m else str(article).strip()
        if not law and not article:  # '민법 제312조' as the id: make it citable
            m = re.fullmatch(r"(.+?)\s*제\s?(\d+)\s?조(?:\s?의\s?(\d+))?", pid)
            if m:
                law, article = m[1].strip(), article_key(m[2], m[3])
        passages.append(Passage(id=pid, text=body.strip(), title=str(obj.get("title") or "").strip(),
                                law=law or None, article=article or None, source=name, line=i))
    lines = [f"skipped {len(v)} × {why} (line {', '.join(map(str, v[:10]))}{' …' if len(v) > 10 else ''})"
             for why, v in skipped.items()]
    return passages, lines


# =========================================================================== citations
# Short names people use for the laws, mapped to the names law.go.kr gives them. Used only
# when the full name is in the corpus.
ALIASES = {
    "주임법": "주택임대차보호법",
    "상임법": "상가건물 임대차보호법",
    "상가임대차법": "상가건물 임대차보호법",
    "상가임대차보호법": "상가건물 임대차보호법",
    "주택임대차법": "주택임대차보호법",
}
_DECREE_SUFFIX = r"(?:\s?(?P<decree>시행령|시행규칙))?"
# Words before an article that refer to a law without naming it.
_SAME = r"같은\s?법|이\s?법|동법|본법|법"


@dataclass
class Citation:
    written: str  # the reference as in the text: '제3조의2 제1항' (the law is resolved separately)
    law: str | None  # resolved law name (the corpus spelling when the corpus has it)
    article: str  # '제3조의2'
    paragraph: int | None = None
    item: int | None = None
    start: int = 0  # offset in the (NFKC-normalised) text
    how: str = "named"  # named | alias | same law | last named | earlier named | default | only law with it | none
    passage_id: str | None = None  # None: not in the corpus

    @property
    def ref(self) -> str:
        """'주택임대차보호법 제3조의2 제1항' in normal form."""
        parts = [self.law or "?", self.article]
        parts += [f"제{self.paragraph}항"] if self.paragraph else []
        parts += [f"제{self.item}호"] if self.item else []
        return " ".join(parts)


class CitationReader:
    """Finds the articles a text cites and resolves them against a corpus. Build once per
    corpus (it compiles the corpus's law names into one pattern)."""

    def __init__(self, corpus: Corpus, aliases: dict[str, str] | None = None):
        self.corpus = corpus
        self.names: dict[str, str] = {law_key(n): n for n in corpus.laws()}  # key → corpus spelling
        for short, full in {**ALIASES, **(aliases or {})}.items():
            if law_key(full) in self.names and law_key(short) not in self.names:
                self.names[law_key(short)] = self.names[law_key(full)]
        # Spaces inside a name are optional ('상가건물임대차보호법'); longest names first so
        # '주택임대차보호법 시행령' wins over '주택임대차보호법'.
        spelled = sorted(self.names, key=len, reverse=True)
        known = "|".join(r"\s?".join(map(re.escape, key)) for key in spelled) or r"(?!x)x"
        self._known = re.compile(rf"(?<![가-힣])(?P<name>{known}){_DECREE_SUFFIX}")
        self._quoted = re.compile(r"「(?P<name>[^」]{2,60})」")
        # The law written right before an article: a known name, 「any name」, '같은 법' & co.,
        # '시행령' alone, or an unknown '…법' written as one word ('소액사건심판법').
        self._before = re.compile(
            rf"(?:(?<![가-힣])(?P<known>{known})|「(?P<quoted>[^」]{{2,60}})」|(?<![가-힣])(?P<same>{_SAME})"
            rf"|(?<![가-힣])(?P<other>[가-힣]{{1,30}}법))?{_DECREE_SUFFIX}\s*$")
        self._ref = re.compile(ARTICLE.pattern + r"(?:\s?(?:제\s?)?(\d+)\s?항)?(?:\s?(?:제\s?)?(\d+)\s?호(?![실수]))?")

    def canonical(self, name: str) -> tuple[str, bool]:
        """(corpus spelling, True) for a known name or alias, else (name as written, False)."""
        name = " ".join(name.split())
        hit = self.names.get(law_key(name))
        return (hit, True) if hit else (name, False)

    def _with_decree(self, base: str | None, decree: str | None) -> str | None:
        if not decree or base is None:
            return base
        if base.endswith((" 시행령", " 시행규칙")):
            base = base.rsplit(" ", 1)[0]
        return self.canonical(f"{base} {decree}")[0]

    @staticmethod
    def _parent(law: str | None) -> str | None:
        """'법' inside a decree means the law it implements: 시행령 → its law."""
        return law.rsplit(" ", 1)[0] if law and law.endswith((" 시행령", " 시행규칙")) else law

    def find(self, text: str, default_law: str | None = None) -> list[Citation]:
        """Citations in reading order. A range '제643조부터 제648조까지' cites its two ends."""
        from .facts import normalize  # NFKC: full-width digits; the same as fact checks

        text = normalize(text)
        mentions = self._mentions(text)
        out: list[Citation] = []
        named: list[str] = []  # laws named so far, in order; the last one is the context
        mi = 0
        for m in self._ref.finditer(text):
            while mi < len(mentions) and mentions[mi][0] < m.start():
                named.append(mentions[mi][1])
                mi += 1
            # before any law is named, `default_law` (e.g. the question's) is the context
            last = named[-1] if named else (self.canonical(default_law)[0] if default_law else None)
            law, how = self._law_before(text[max(0, m.start() - 80):m.start()], last)
            if not named and how == "last named":
                how = "default"
            article = article_key(m[1], m[2])
            if how == "last named" and self.canonical(law)[1] and not self.corpus.article(law, article):
                # '주택임대차보호법 제3조의4는 민법 제621조에 따른 등기에 제3조의3을 준용': not 민법's
                # 제3조의3 (it has none) but the law named before it, as a reader takes it. Only
                # when the corpus holds the last law: of other laws we cannot tell what exists.
                earlier = [n for n in reversed(named[:-1]) if self.corpus.article(n, article)]
                if earlier:
                    law, how = earlier[0], "earlier named"
            if law is None:
                owners = [p for p in self.corpus.passages if p.article == article and p.law]
                if len({law_key(p.law) for p in owners}) == 1:
                    law, how = owners[0].law, "only law with it"
                else:
                    how = "none"
            if law is not None and how not in ("only law with it", "earlier named") and law != last:
                named.append(law)  # '소액사건심판법 제6조, 제7조': 제7조 is that law's too
            hit = self.corpus.article(law, article) if law else None
            out.append(Citation(written=m[0], law=law, article=article,
                                paragraph=int(m[3]) if m[3] else None, item=int(m[4]) if m[4] else None,
                                start=m.start(), how=how, passage_id=hit.id if hit else None))
        return out

    def last_named(self, text: str) -> str | None:
        """The law named last in a text ('주택임대차보호법에서 …' → that law), or None."""
        from .facts import normalize

        mentions = self._mentions(normalize(text))
        return mentions[-1][1] if mentions else None

    def _mentions(self, text: str) -> list[tuple[int, str]]:
        """(offset, law) of every explicit law name in the text, known or in 「」."""
        found = []
        for m in self._known.finditer(text):
            found.append((m.start(), self._with_decree(self.canonical(m["name"])[0], m["decree"])))
        for m in self._quoted.finditer(text):
            found.append((m.start(), self.canonical(m["name"])[0]))
        return sorted(found)

    def _law_before(self, before: str, last: str | None) -> tuple[str | None, str]:
        m = self._before.search(before)
        if not m or not m[0].strip():
            return last, "last named" if last else "none"
        if m["known"]:
            name, _ = self.canonical(m["known"])
            how = "named" if law_key(m["known"]) == law_key(name) else "alias"
            return self._with_decree(name, m["decree"]), how
        if m["quoted"]:
            return self._with_decree(self.canonical(m["quoted"])[0], m["decree"]), "named"
        if m["other"]:
            return self._with_decree(m["other"], m["decree"]), "named"
        if m["same"]:  # '같은 법', '이 법': the law named last; inside a decree, its law
            return self._with_decree(self._parent(last), m["decree"]), "same law"
        # '시행령 제2조' alone: the decree of the law named last
        return self._with_decree(self._parent(last), m["decree"]), "same law"


def find_citations(text: str, corpus: Corpus, default_law: str | None = None) -> list[Citation]:
    """The articles `text` cites, each resolved to a corpus passage where possible
    (`Citation.passage_id`)."""
    return corpus.reader().find(text, default_law)


def cited_passages(text: str, reader: CitationReader, default_law: str | None = None) -> list[str]:
    """Ids of the corpus passages a text cites, each once, in order."""
    return list(dict.fromkeys(c.passage_id for c in reader.find(text, default_law) if c.passage_id))
