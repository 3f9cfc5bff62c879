"""BM25 retrieval over the grounding corpus, with Korean tokenisers and document expansion.

Why BM25 and not embeddings: it runs on two CPU cores in milliseconds, needs no model
download, and statute questions share their key nouns with the article (보증금, 전세권,
갱신). Why our own tokenisers: bm25s' default regex keeps whole eojeol, particles attached
('보증금을', '보증금은' are different words), which ruins Korean recall; so we pass
pre-tokenised input:

- `kiwi`: Kiwi morphemes (kiwipiepy, model from the kiwipiepy_model package, works offline),
  content morphemes only: nouns, verb/adjective stems, roots, numbers, foreign words;
- `char2`: character bigrams inside each word, no dictionary at all;
- `char2+kiwi`: both in one index, morphemes as terms of their own ('~보증금' besides the
  bigrams '보증', '증금'), so a document matching both ways scores both. On the bundled data's
  held-out questions (5 seeds) recall@3 0.848 (char2) → 0.862 at the same b 0.35, higher on every
  seed, and 0.871 at b 0.2 (the demo presets'); kiwi alone gives 0.854 (bench/RETRIEVAL.md).
  Costs Kiwi's tokenisation (~2 s load, then milliseconds per text).

Both keep an article marker ('제3조의2') as one token: morphemes would cut it into
제 / 3 / 조 / 의 / 2, which matches every article with a 3 or a 2 in it.

Document expansion: an article is also indexed with the training questions whose answers
cite it, because people ask in everyday words ('집주인이 보증금을 안 돌려줘요') that the
statute's language does not use. The expansion text is indexed, never shown as the passage.
The caller passes training rows only; validation/test questions would leak.

`Index.save(dir)` writes JSON plus bm25s' own .npy arrays (saved without pickle) and a
manifest with the tokenizer, the corpus fingerprint and a format version.
"""

from __future__ import annotations

import json
import re
import unicodedata
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from .config import RetrievalConfig
from .corpus import ARTICLE, CitationReader, Corpus, Passage, article_key
from .errors import KoloraError

FORMAT = "kolora.index/1"
TOKENIZERS = ("kiwi", "char2", "char2+kiwi")
MANIFEST = "manifest.json"
PASSAGES = "passages.jsonl"
EXPANSIONS = "expansions.json"
BM25_DIR = "bm25"

# Content morphemes (Sejong tags as Kiwi uses them): common/proper nouns, numerals, verb and
# adjective stems (with their irregular variants VV-I, VA-R, …), roots, numbers, foreign
# words, hanja. Particles, endings, bound nouns (것, 수, 조) and affixes carry no topic.
_KEEP = ("NNG", "NNP", "NR", "VV", "VA", "XR", "SN", "SL", "SH")
_PARAGRAPH = re.compile(r"제\s?\d+\s?(?:항|호)")
_WORD = re.compile(r"[0-9A-Za-z\u3131-\u318E\uAC00-\uD7A3\u4E00-\u9FFF]+")


@lru_cache(maxsize=1)
def _kiwi():
    """One Kiwi per process: loading the model takes ~2 s and ~100 MB."""
    try:
        from kiwipiepy import Kiwi
    except ImportError:
        raise KoloraError("the kiwi tokenizer needs kiwipiepy",
                          "pip install kiwipiepy kiwipiepy_model, or use tokenizer char2") from None
    with warnings.catch_warnings():  # num_workers=0 (one thread) warns about a changed default
        warnings.simplefilter("ignore")
        return Kiwi(num_workers=0)


def _articles(text: str) -> tuple[str, list[str]]:
    """('…에 따라 …', ['제3조의2']): article markers as tokens, the rest of the text without
    them and without paragraph/item numbers ('제1항', '제2호': in nearly every article, no topic)."""
    tokens = [article_key(m[1], m[2]) for m in ARTICLE.finditer(text)]
    return _PARAGRAPH.sub(" ", ARTICLE.sub(" ", text)), tokens


def _kiwi_words(rest: str) -> list[str]:
    return [t.form.lower() for t in _kiwi().tokenize(rest) if t.tag.split("-")[0] in _KEEP]


def _char2_words(rest: str) -> list[str]:
    """Bigrams inside each word; a one-character word is its own token."""
    tokens = []
    for word in _WORD.findall(rest.lower()):
        tokens += [word] if len(word) == 1 else [word[i:i + 2] for i in range(len(word) - 1)]
    return tokens


def tokenize(text: str, tokenizer: str = "kiwi") -> list[str]:
    """The tokens BM25 sees for a text (NFKC first: full-width digits, compatibility jamo)."""
    if tokenizer not in TOKENIZERS:
        raise KoloraError(f"unknown retrieval tokenizer '{tokenizer}'", f"use one of {', '.join(TOKENIZERS)}")
    return list(_tokens(text, tokenizer))


@lru_cache(maxsize=16384)
def _tokens(text: str, tokenizer: str) -> tuple[str, ...]:
    # cached: Kiwi takes ~10 ms per article on a busy 2-core CPU, and rebuilding an index
    # with other expansions (each split, each seed) tokenises the same articles again
    rest, tokens = _articles(unicodedata.normalize("NFKC", text))
    if tokenizer == "kiwi":
        return tuple(tokens + _kiwi_words(rest))
    tokens += _char2_words(rest)
    if tokenizer == "char2+kiwi":  # '~': never part of a bigram or an article marker
        tokens += ["~" + w for w in _kiwi_words(rest)]
    return tuple(tokens)


def _tokenizer_version(tokenizer: str) -> str:
    """What the tokens depend on, so a reloaded index can say its queries are tokenised differently."""
    if "kiwi" not in tokenizer:
        return "kolora"
    import kiwipiepy

    try:
        import kiwipiepy_model

        model = getattr(kiwipiepy_model, "__version__", "?")
    except ImportError:
        model = "missing"
    return f"kiwipiepy {kiwipiepy.__version__}, model {model}"


@dataclass
class Hit:
    passage: Passage
    score: float  # BM25 score (0.0 for a named article without token overlap)
    rank: int  # 1-based
    named: bool = False  # the question cites this article exactly


@dataclass
class Index:
    passages: list[Passage]  # the indexed ones, in index order
    tokenizer: str
    bm25: object  # bm25s.BM25
    manifest: dict = field(default_factory=dict)
    report: list[str] = field(default_factory=list)  # what was not indexed, and why
    expansions: dict = field(default_factory=dict)  # passage id → questions indexed with it (saved, for "why this hit")
    _reader: CitationReader | None = field(default=None, repr=False, compare=False)
    _position: dict = field(default_factory=dict, repr=False, compare=False)

    def search(self, question: str, k: int = 5) -> list[Hit]:
        """The k best passages, best first: articles the question names exactly ('민법 제312조가
        뭐예요?') first, marked `named`, then BM25 hits with a positive score (ties keep corpus
        order). [] when nothing is named and no query token occurs in the index.

        Why the named ones first: BM25 cannot find them reliably, since '제3조의2' also occurs in
        every article referring to it and long articles are length-penalised."""
        if k <= 0:
            return []
        named = self._named(question)
        ids = self.bm25.get_tokens_ids(tokenize(question, self.tokenizer))
        scores = (np.asarray(self.bm25.get_scores_from_ids(ids), dtype=np.float64) if ids
                  else np.zeros(len(self.passages)))
        best = np.lexsort((np.arange(len(scores)), -scores))[:k + len(named)]  # score, then position
        order = named + [int(i) for i in best if scores[i] > 0 and int(i) not in named]
        return [Hit(self.passages[i], float(scores[i]), rank, i in named)
                for rank, i in enumerate(order[:k], start=1)]

    def _named(self, question: str) -> list[int]:
        """Positions of the indexed articles the question cites (law resolved as in answers)."""
        if not ARTICLE.search(question):
            return []
        if self._reader is None:
            self._reader = Corpus(self.passages).reader()
            self._position = {p.id: i for i, p in enumerate(self.passages)}
        ids = dict.fromkeys(c.passage_id for c in self._reader.find(question) if c.passage_id)
        return [self._position[pid] for pid in ids if pid in self._position]

    # ----------------------------------------------------------------------- disk
    def save(self, directory: str | Path) -> Path:
        """Write the index to a directory (e.g. `<run>/index/`); the manifest is written last,
        so a directory without one is an interrupted save."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / MANIFEST).unlink(missing_ok=True)
        self.bm25.save(str(d / BM25_DIR), allow_pickle=False, show_progress=False)
        with open(d / PASSAGES, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(p.to_json(), ensure_ascii=False) + "\n" for p in self.passages)
        (d / EXPANSIONS).write_text(json.dumps(self.expansions, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
        (d / MANIFEST).write_text(json.dumps(self.manifest, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        return d

    @classmethod
    def load(cls, directory: str | Path, corpus: Corpus | None = None) -> Index:
        """Read a saved index. With `corpus`, refuse one built from a different corpus and
        name the files that changed."""
        import bm25s

        d = Path(directory)
        if not (d / MANIFEST).is_file():
            raise KoloraError(f"{d}: no retrieval index here ({MANIFEST} missing)",
                              "build it again; an interrupted save leaves no manifest")
        manifest = json.loads((d / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT:
            raise KoloraError(f"{d}: index format {manifest.get('format')!r}, this kolora reads {FORMAT!r}",
                              "rebuild the index with this version of kolora")
        if corpus is not None and corpus.fingerprint() != manifest["corpus"]["fingerprint"]:
            changes = corpus.changes(manifest["corpus"]["files"])
            raise KoloraError(f"{d}: the grounding corpus changed since this index was built ({'; '.join(changes)})",
                              "rebuild the index (or restore the corpus files it was built from)")
        passages = [Passage(**json.loads(line)) for line in
                    (d / PASSAGES).read_text(encoding="utf-8").splitlines() if line.strip()]
        bm25 = bm25s.BM25.load(str(d / BM25_DIR), allow_pickle=False)
        report = []
        now = _tokenizer_version(manifest["tokenizer"])
        if now != manifest.get("tokenizer_version"):
            report.append(f"note: index tokenised with {manifest.get('tokenizer_version')}, queries now with {now}")
        expansions = json.loads((d / EXPANSIONS).read_text(encoding="utf-8"))
        return cls(passages, manifest["tokenizer"], bm25, manifest, report, expansions)


# =========================================================================== building
def build_index(corpus: Corpus, expansions: dict[str, list[str]] | None = None, tokenizer: str = "kiwi",
                k1: float = 1.5, b: float = RetrievalConfig.bm25_b) -> Index:
    """BM25 over the corpus's passages: header + text, plus `expansions[passage_id]` (training
    questions citing it), indexed but never shown. Repealed articles are not indexed (their
    text is '삭제 <date>'); expansions for ids the corpus lacks are counted, not indexed.

    b defaults to retrieval.bm25_b's 0.35, not the textbook 0.75: statute articles range from one line to a page, and an
    expanded article grows with every training question citing it, so full length
    normalisation buries exactly the long, often-cited articles (bench/RETRIEVAL.md: recall@3
    0.800 → 0.848 on the bundled data's held-out questions)."""
    import bm25s

    if tokenizer not in TOKENIZERS:
        tokenize("", tokenizer)  # raises the one-line error
    expansions = expansions or {}
    passages = [p for p in corpus.passages if not p.deleted]
    report = []
    if len(passages) < len(corpus.passages):
        report.append(f"not indexed: {len(corpus.passages) - len(passages)} repealed articles (삭제)")
    unknown = [pid for pid in expansions if corpus.get(pid) is None]
    if unknown:
        report.append(f"expansions ignored for {len(unknown)} ids not in the corpus: {', '.join(unknown[:5])}"
                      + (" …" if len(unknown) > 5 else ""))
    if not passages:
        raise KoloraError("the grounding corpus has no passages to index (all repealed)", "add statute or passage files")
    # BM25 sees a bag of tokens, so tokenising the parts one by one gives the same document
    # and lets the (cached) article tokens be reused across builds
    docs = [[t for part in (p.header, p.text, *expansions.get(p.id, [])) for t in tokenize(part, tokenizer)]
            for p in passages]
    bm25 = bm25s.BM25(k1=k1, b=b)
    bm25.index(docs, show_progress=False)
    expanded = [pid for pid in expansions if corpus.get(pid) is not None and expansions[pid]]
    manifest = {
        "format": FORMAT,
        "tokenizer": tokenizer,
        "tokenizer_version": _tokenizer_version(tokenizer),
        "bm25": {"k1": k1, "b": b, "method": bm25.method, "bm25s": bm25s.__version__},
        "corpus": {"fingerprint": corpus.fingerprint(), "files": corpus.file_hashes(),
                   "passages": len(corpus.passages), "indexed": len(passages)},
        "expansion": {"passages": len(expanded), "questions": sum(len(expansions[p]) for p in expanded)},
    }
    kept = {pid: list(expansions[pid]) for pid in expanded}
    return Index(passages, tokenizer, bm25, manifest, report, kept)


def recall_ks(result: dict) -> list[int]:
    """The k values a recall_at_k result holds, ascending."""
    return sorted(int(key[len("recall@"):]) for key in result if key.startswith("recall@"))


def recall_at_k(index: Index, questions: list[str], cited_ids: list, ks=(1, 3, 5)) -> dict:
    """Retrieval quality on questions whose answers cite known passages.

    recall@k: the share of a question's cited passages in the top k, averaged over questions;
    hit@k: the share of questions with at least one cited passage in the top k. Questions
    without a cited passage are not scored, and counted as `skipped`."""
    if len(questions) != len(cited_ids):
        raise ValueError(f"{len(questions)} questions but {len(cited_ids)} cited-id lists")
    depth = max(ks)
    recall = {k: 0.0 for k in ks}
    hit = {k: 0 for k in ks}
    scored = 0
    for question, gold in zip(questions, cited_ids):
        gold = set(gold)
        if not gold:
            continue
        scored += 1
        ranked = [h.passage.id for h in index.search(question, depth)]
        for k in ks:
            found = gold & set(ranked[:k])
            recall[k] += len(found) / len(gold)
            hit[k] += bool(found)
    out: dict = {"questions": scored, "skipped": len(questions) - scored}
    for k in ks:
        out[f"recall@{k}"] = recall[k] / scored if scored else None
        out[f"hit@{k}"] = hit[k] / scored if scored else None
    return out
