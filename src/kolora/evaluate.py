"""`kolora eval RUN`: did fine-tuning help, where, and where not?

Base and tuned model answer the same held-out questions, formatted exactly as in training
(`kolora.prompt`), through the one generation path (`kolora.generation`). Per side:

- perplexity: exp(mean cross entropy over the answer tokens and the EOS), teacher-forced —
  the quantity training minimised, on questions it never saw (`kolora.loss`);
- chrF, ROUGE-L, BLEU against the reference answers, all on characters, fact recall, and
  health: EOS within the token budget, distinct-2, repetition loops, length vs reference
  (`kolora.metrics`, `kolora.facts`);

overall, per `category` and per `difficulty`. Written to `<run>/eval/`: `metrics.json`,
`samples.jsonl` and a self-contained `report.html`. An untuned base model's answers are cached.
"""

from __future__ import annotations

import gc
import json
import math
import os
import sys
import time
import unicodedata
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

from . import grounding
from .data import SPLITS, load_examples, read_jsonl
from .device import inference_dtype
from .errors import KoloraError
from .generation import VERIFY_FLAG, GenConfig, add_gen_flags, gen_config, generate_batched, load_plain, load_tuned
from .grounding import with_context
from .loss import answer_losses
from .metrics import METRIC_NOTES, METRICS, answer_metrics, delta, health_warnings, side_block, verdict
from .retrieval import recall_ks
from .runs import open_run

HELP = ("compare base and tuned model on held-out questions: answer perplexity, chrF / ROUGE-L / BLEU, "
        "fact recall, EOS and loops; writes eval/metrics.json, samples.jsonl and report.html")


SCHEMA = "kolora.eval/1"


SIDES = ("base", "tuned")



# =========================================================================== running the models


@dataclass
class Side:
    """One side of the comparison: `open()` yields (model, tokenizer, cfg) ready to answer."""

    name: str  # "base" or "tuned": the keys of metrics.json
    label: str  # what it is, for people
    source: str
    open: Callable
    untuned: bool = False  # a base model without any adapter: its loops are no training mistake
    grounded: bool = False  # answers with the run's retrieved passages before each question


@dataclass
class Plan:
    target: str
    examples: list
    data_source: str
    out_dir: Path
    sides: list[Side]
    loss_events: list[dict] = field(default_factory=list)
    cfg: object = None  # the evaluated run's config: its lr and epochs go into the warnings
    grounding: object = None  # grounding.Grounding of a grounded run (its saved index)
    hits: list = field(default_factory=list)  # retrieved passages per question
    tokenizer: Path | None = None  # the run's tokenizer (the answer budget counts reference tokens with it)
    retrieval: dict | None = None  # recall@k of the cited article on these questions


def side_examples(side: Side, plan: Plan, tokenizer) -> list:
    """The questions as this side sees them: with the run's retrieved passages when grounded."""
    if not side.grounded:
        return plan.examples
    g = plan.grounding
    return [with_context(ex, h, tokenizer, g.context_tokens) for ex, h in zip(plan.examples, plan.hits)]


def evaluate_side(side: Side, plan: Plan, gen, batch_size: int) -> tuple[list[dict], dict]:
    from tqdm.auto import tqdm

    t0 = time.time()
    with side.open() as (model, tokenizer, cfg):
        load_s = time.time() - t0
        examples = side_examples(side, plan, tokenizer)
        with tqdm(total=len(examples), desc=f"{side.name}: perplexity", unit="q", dynamic_ncols=True) as bar:
            t1 = time.time()
            losses = answer_losses(model, tokenizer, cfg, examples, bar)
            loss_s = time.time() - t1
        with tqdm(total=len(examples), desc=f"{side.name}: answers", unit="q", dynamic_ncols=True) as bar:
            # verification needs the passages it answers from; an untuned base never stops with EOS, so no
            # candidate of it can pass (measured: 186 s of sampling on the demo for nothing)
            verify = side.grounded and not side.untuned and plan.grounding is not None
            check = partial(plan.grounding.check, hits=[]) if verify else None
            generations, stats = generate_batched(model, tokenizer, cfg, examples, gen, batch_size, bar, check=check)
    rows = [answer_metrics(g.text, ex.answer, g.stopped, g.new_tokens, loss, n)
            for ex, g, (loss, n) in zip(examples, generations, losses)]
    if plan.grounding is not None:  # every answer's citations are checked, grounded side or not
        for row, ex in zip(rows, plan.examples):
            row["citation"] = citation_row(plan.grounding.check(row["answer"], ex.question, []))
    for row, g in zip(rows, generations):
        if g.tries != 1:  # --verify: which candidate was kept, and the first answer it replaced
            row["verify"] = {"tries": g.tries, "first": g.first}
    timing = {"load_s": round(load_s, 1), "perplexity_s": round(loss_s, 1), "generation_s": stats["seconds"],
              "new_tokens": stats["new_tokens"], "tokens_per_s": stats["tokens_per_s"]}
    if "verify" in stats:
        timing["verify"] = stats["verify"]
    return rows, timing


def citation_row(report) -> dict:
    """What samples.jsonl and the report keep of a citation check."""
    return {"cites": report.cites, "citation_valid": report.citation_valid, "numbers": len(report.numbers),
            "supported": sum(n.supported for n in report.numbers), "unsupported": report.unsupported,
            "cited": [c.passage_id or c.ref for c in report.citations]}


# =========================================================================== what to compare


MERGE_MARKER = "kolora-merge.json"


def run_sides(run, grounded: bool = False, four_way: bool = False) -> list[Side]:
    """A run: its base model (adapter disabled) and the tuned adapter, loaded once. A grounded
    run compares both with retrieval (the same context on both sides); `four_way` adds both
    without it."""
    loaded = {}

    def model():
        if "m" not in loaded:
            loaded["m"] = load_tuned(run)
        return loaded["m"]

    def opener(base: bool, last: bool):
        @contextmanager
        def open_side():
            m = model()
            with m[0].disable_adapter() if base else nullcontext():
                yield m
            if last:
                loaded.clear()
        return open_side

    name = run.config().model.name
    base_label, tuned_label = f"{Path(name).name} (기본 모델)", f"{run.path.name} (튜닝)"
    if not grounded:
        return [Side("base", base_label, name, opener(True, False), untuned=True),
                Side("tuned", tuned_label, str(run.path), opener(False, True))]
    sides = [Side("base", base_label + " + 검색", name, opener(True, False), untuned=True, grounded=True),
             Side("tuned", tuned_label + " + 검색", str(run.path), opener(False, not four_way), grounded=True)]
    if four_way:
        sides += [Side("base_plain", base_label + " (검색 없이)", name, opener(True, False), untuned=True),
                  Side("tuned_plain", tuned_label + " (검색 없이)", str(run.path), opener(False, True))]
    return sides


def _merged_run(path: Path):
    info = json.loads((path / MERGE_MARKER).read_text(encoding="utf-8"))
    if not info.get("run"):
        raise KoloraError(f"{path / MERGE_MARKER} does not name the run it was merged from",
                          "merge again with `kolora merge RUN --out DIR`")
    try:
        return open_run(info["run"], need_adapter=False)
    except KoloraError as e:
        raise KoloraError(f"{path} was merged from {info['run']}, which is needed for its prompt format and "
                          f"test split: {e}", "keep the run directory next to the merged model") from None


def merged_side(path: Path, name: str = "tuned") -> Side:
    """A merged model directory (`kolora merge`): a plain model, the run's prompt format."""
    run = _merged_run(path)

    @contextmanager
    def open_merged():
        cfg = run.config()
        model, tokenizer = load_plain(str(path), path, cfg)
        yield model, tokenizer, cfg
        del model  # the next side loads its own model: never two in memory
        gc.collect()

    return Side(name, f"{path.name} (병합 모델)", str(path), open_merged)


def plain_base_side(path: Path) -> Side:
    """The base of a merged model: the model named in its run's config, no adapter."""
    run = _merged_run(path)
    cfg = run.config()

    @contextmanager
    def open_base():
        model, tokenizer = load_plain(cfg.model.name, path, cfg)
        yield model, tokenizer, cfg
        del model  # the next side loads its own model: never two in memory
        gc.collect()

    return Side("base", f"{Path(cfg.model.name).name} (기본 모델)", cfg.model.name, open_base, untuned=True)


def tuned_side(path: Path, name: str) -> Side:
    """The tuned model of a run or a merged directory, as side `name` (for --against)."""
    if (path / MERGE_MARKER).is_file():
        return merged_side(path, name)
    run = open_run(str(path))

    @contextmanager
    def open_adapter():
        model, tokenizer, cfg = load_tuned(run)
        yield model, tokenizer, cfg
        del model  # the next side loads its own model: never two in memory
        gc.collect()

    return Side(name, f"{path.name} (튜닝)", str(path), open_adapter)


def load_eval_examples(run, data: str | None, split: str, max_samples: int | None):
    if data:
        examples, report = load_examples(data)
        for line in report.lines():
            print(line, file=sys.stderr)
        source = str(data)
    else:
        if split not in SPLITS:
            raise KoloraError(f"--split {split} is not one of {', '.join(SPLITS)}")
        path = run.split(split)
        if not path.is_file():
            raise KoloraError(f"{run.path} has no {split} split ({path})", "pass --data PATH to evaluate a file instead")
        examples = read_jsonl(path)
        source = f"{run.path}/data/{split}.jsonl"
    if max_samples is not None and max_samples < 1:
        raise KoloraError(f"--max-samples must be at least 1, got {max_samples}")
    examples = examples[:max_samples] if max_samples else examples
    if not examples:
        raise KoloraError(f"no questions to evaluate in {source}", "check the file or the split")
    return examples, source


def make_plan(args) -> Plan:
    from .report import read_metrics

    target = Path(args.run).expanduser()
    merged = (target / MERGE_MARKER).is_file()
    run = _merged_run(target) if merged else open_run(str(target))
    found = None if args.no_retrieval else grounding.load(run.path, run.config())
    if args.four_way and found is None:
        raise KoloraError("--four-way compares answers with and without retrieval: this run has no retrieval.corpus"
                          if not args.no_retrieval else "--four-way and --no-retrieval contradict each other",
                          "train with --retrieval.corpus data/statutes (see configs/gemma3-270m.yaml)")
    if args.against:
        other = Path(args.against).expanduser()
        if not other.is_dir():
            raise KoloraError(f"--against {args.against}: directory not found", "pass a run or a merged model directory")
        base = tuned_side(other, "base")
        tuned = tuned_side(target, "tuned")
        default_out = target / f"eval-vs-{other.resolve().name}"
    elif merged:
        base, tuned = plain_base_side(target), merged_side(target)
        default_out = target / "eval"
    if args.against or merged:
        base.grounded = tuned.grounded = found is not None
        sides = [base, tuned]
    else:
        sides = run_sides(run, grounded=found is not None, four_way=args.four_way)
        default_out = target / "eval"
    examples, source = load_eval_examples(run, args.data, args.split, args.max_samples)
    plan = Plan(str(target), examples, source, Path(args.out) if args.out else default_out, sides,
                read_metrics(run.metrics), run.config(), found, tokenizer=run.tokenizer)
    if found is not None:
        plan.hits = [found.retrieve(ex.question) for ex in examples]
        plan.retrieval = found.recall(examples)
    return plan



# =========================================================================== the verb


def add_arguments(p) -> None:
    p.add_argument("run", help="run directory (base vs its tuned adapter) or a merged model directory (kolora merge)")
    p.add_argument("--data", metavar="PATH", help="evaluate every row of this file (CSV/JSON/JSONL) instead of a split")
    p.add_argument("--split", default="test", help="split of the run to evaluate: test (default), validation, train")
    p.add_argument("--max-samples", type=int, metavar="N", help="evaluate only the first N questions")
    p.add_argument("--against", metavar="RUN2",
                   help="compare RUN (as 'tuned') with another run or merged model RUN2 (as 'base')")
    p.add_argument("--out", metavar="DIR", help="output directory (default RUN/eval, RUN/eval-vs-RUN2 with --against)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="questions answered together (decoding reads every weight once per token for the whole batch)")
    add_gen_flags(p, GEN_DEFAULTS, {
        "--max-new-tokens": "token budget per answer (default: 1.5 × the longest reference answer, 64–256); an "
                            "answer that has not ended with EOS by then counts as not stopping",
        "--temperature": "0 = greedy (default, deterministic)",
        "--repetition-penalty": "1.0 (default, as chat) measures the model as it is; a penalty would hide loops"})
    p.set_defaults(max_new_tokens=None)  # from the references (answer_budget)
    p.add_argument(VERIFY_FLAG[0], type=int, default=0, metavar="N", help=VERIFY_FLAG[1])
    p.add_argument("--no-retrieval", action="store_true",
                   help="a grounded run answers without its retrieved passages (the ungrounded answer, for comparison)")
    p.add_argument("--four-way", action="store_true",
                   help="a grounded run: base and tuned, each with and without retrieval (four answers per question)")
    p.add_argument("--no-cache", action="store_true",
                   help="answer with the base model again even when an earlier eval of the same base, questions and "
                        "settings is cached (KOLORA_CACHE/eval-base)")


GEN_DEFAULTS = GenConfig(max_new_tokens=256, repetition_penalty=1.0)  # measure the model as it is


def answer_budget(tokenizer, examples) -> int:
    """The default --max-new-tokens: 1.5 × the longest reference answer (+ EOS), within 64–256.

    A batch decodes until its last row stops, and an untuned base model rarely stops, so the
    budget is most of eval's time. Half again the longest reference leaves room for a wordier
    right answer; an answer past it is a loop or a model that never learned to stop (the demo's
    57 test questions: longest reference 106 tokens, budget 161)."""
    longest = max((len(tokenizer(ex.answer, add_special_tokens=False).input_ids) for ex in examples), default=0)
    return max(64, min(GEN_DEFAULTS.max_new_tokens, math.ceil(1.5 * (longest + 1))))


def base_cache_file(side: Side, plan: Plan, gen, batch_size: int) -> Path | None:
    """Where an untuned base model's results for exactly these questions, prompt format and
    generation settings are kept: a base model does not change between runs, so a second
    `kolora eval` (another run, more epochs) need not answer the same questions again."""
    import dataclasses
    import hashlib

    import torch

    from . import __version__
    from .checkpoint import model_fingerprint
    from .models import cache_root, resolve

    if not side.untuned or plan.cfg is None:
        return None
    try:
        model_path = resolve(side.source).path
    except KoloraError:
        return None
    key = json.dumps({"model": model_fingerprint(model_path), "kolora": __version__, "torch": torch.__version__,
                      **answering_setup(plan),
                      "dtype": inference_dtype(), "system": plan.cfg.data.system_prompt, "template": plan.cfg.data.template,
                      "gen": dataclasses.asdict(gen), "batch": batch_size,
                      "questions": [[ex.question, ex.answer, ex.system, ex.history] for ex in plan.examples],
                      # a grounded side's prompts hold the run's passages within its budget
                      "context": ([[h.passage.id for h in hits] for hits in plan.hits], plan.grounding.context_tokens,
                                  plan.grounding.corpus.fingerprint(), _render_code()) if side.grounded else None},
                     ensure_ascii=False, sort_keys=True, default=str)
    return cache_root() / "eval-base" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def _render_code() -> str:
    """A hash of the code that lays passages out in the prompt (kolora/grounding.py): the same
    hits rendered another way are other prompts, and a cached base answer to the old ones would
    be compared with tuned answers to the new ones."""
    import hashlib

    from . import grounding

    return hashlib.sha256(Path(grounding.__file__).read_bytes()).hexdigest()[:16]


def answering_setup(plan: Plan) -> dict:
    """What else decides an untuned base's answers: the quantization it is loaded with, the
    libraries that run it, the tokenizer that encodes its prompts (the run's, or the merged
    model's) and the device (GPU kernels do not round as the CPU's do)."""
    import hashlib
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from .checkpoint import WEIGHT_SUFFIXES
    from .runs import Run

    target = Path(plan.target)
    merged = (target / MERGE_MARKER).is_file()  # its base loads in full precision (load_plain), on the CPU
    quantization = "none" if merged else plan.cfg.model.quantization
    libraries = {}
    for name in ("transformers", "peft") + (("bitsandbytes",) if quantization != "none" else ()):
        try:
            libraries[name] = version(name)
        except PackageNotFoundError:
            libraries[name] = None
    tok_dir = target if merged else Run(target).tokenizer
    tokenizer = hashlib.sha256()
    for f in sorted(tok_dir.iterdir()) if tok_dir.is_dir() else []:
        if f.is_file() and f.suffix not in WEIGHT_SUFFIXES and f.name not in ("config.json", "generation_config.json",
                                                                               MERGE_MARKER):
            tokenizer.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    cuda = torch.cuda.is_available() and not merged
    device = f"cuda:{torch.cuda.get_device_name(0)}" if cuda else "cpu"
    return {"quantization": quantization, "libraries": libraries, "tokenizer": tokenizer.hexdigest(), "device": device}


def evaluate(plan: Plan, gen, batch_size: int, use_cache: bool = True) -> tuple[dict, list[dict]]:
    """Run both sides; return (metrics, samples)."""
    import dataclasses

    results, timing, n = {}, {}, len(plan.examples)
    for side in plan.sides:
        cached = base_cache_file(side, plan, gen, batch_size) if use_cache else None
        if cached and cached.is_file():
            saved = json.loads(cached.read_text(encoding="utf-8"))
            results[side.name], timing[side.name] = saved["rows"], {**saved["timing"], "cached": str(cached)}
            print(f"[{side.name}] {side.label}: {n} questions — the same base, questions and settings as an earlier "
                  f"eval: reusing {cached} (--no-cache to answer again)", file=sys.stderr, flush=True)
            continue
        print(f"[{side.name}] {side.label}: {n} questions", file=sys.stderr, flush=True)
        results[side.name], timing[side.name] = evaluate_side(side, plan, gen, batch_size)
        if cached:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(".tmp")
            tmp.write_text(json.dumps({"rows": results[side.name], "timing": timing[side.name]}, ensure_ascii=False,
                                      default=_json_default), encoding="utf-8")
            os.replace(tmp, cached)
    base = side_block(results["base"], plan.examples)
    tuned = side_block(results["tuned"], plan.examples)
    metrics = {
        "schema": SCHEMA,
        "target": plan.target,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "data": {"source": plan.data_source, "n": n},
        "generation": {**dataclasses.asdict(gen), "batch_size": batch_size},
        "sides": {s.name: {"label": s.label, "source": s.source} for s in plan.sides},
        "metric_notes": METRIC_NOTES,
        "base": base,
        "tuned": tuned,
        **{s.name: side_block(results[s.name], plan.examples) for s in plan.sides if s.name not in SIDES},
        "delta": delta(base, tuned),
        "verdict": verdict(base, tuned),
        "warnings": (health_warnings(results["tuned"], gen, plan.cfg, "tuned")
                     + health_warnings(results["base"], gen, None, "base", untuned=plan.sides[0].untuned)),
        "timing": timing,
    }
    if plan.grounding is not None:
        metrics["retrieval"] = {"k": plan.grounding.k, "context_tokens": plan.grounding.context_tokens,
                                "passages": len(plan.grounding.corpus), **(plan.retrieval or {})}
    samples = []
    for i, ex in enumerate(plan.examples):
        sample = {"id": i, "question": ex.question, "reference": ex.answer, "category": ex.category,
                  "difficulty": ex.difficulty}
        for side in plan.sides:
            row = dict(results[side.name][i])
            row.pop("loss_sum")
            sample[side.name] = row
        if plan.hits:
            sample["sources"] = [{"id": h.passage.id, "header": h.passage.header, "score": round(h.score, 3)}
                                 for h in plan.hits[i]]
        b, t = sample["base"], sample["tuned"]
        sample["delta"] = {k: t[k] - b[k] for k in ("chrf", "rouge_l", "bleu", "fact_recall")
                           if t[k] is not None and b[k] is not None}
        samples.append(sample)
    return metrics, samples


def regression_order(samples: list[dict]) -> list[dict]:
    """Worst regressions first: tuned fact recall minus base's, then chrF difference."""
    return sorted(samples, key=lambda s: (s["delta"].get("fact_recall", 0.0), s["delta"].get("chrf", 0.0)))


def write_outputs(plan: Plan, metrics: dict, samples: list[dict]) -> dict[str, Path]:
    from .html_report import render_report
    from .report import loss_series

    out = plan.out_dir
    out.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": out / "metrics.json", "samples": out / "samples.jsonl", "report": out / "report.html"}
    paths["metrics"].write_text(json.dumps(metrics, indent=2, ensure_ascii=False, default=_json_default), encoding="utf-8")
    with open(paths["samples"], "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s, ensure_ascii=False, default=_json_default) + "\n")
    html = render_report(metrics, regression_order(samples), loss_series(plan.loss_events))
    paths["report"].write_text(html, encoding="utf-8")
    return paths


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def _fmt(name: str, value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if name in ("chrf", "rouge_l", "bleu"):
        return f"{value:.1f}"
    if name == "perplexity":
        return f"{value:.2f}"
    return f"{value:.2f}" if name != "loops" else str(value)


def ljust(text: str, width: int) -> str:
    """Pad for a terminal, where Hangul takes two columns."""
    shown = sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)
    return text + " " * max(0, width - shown)


def summary_lines(metrics: dict) -> list[str]:
    base, tuned = metrics["base"], metrics["tuned"]
    lines = [f"{'':<20}{'base':>10}{'tuned':>10}{'change':>10}"]
    for v in verdict(base, tuned):
        change = (f"{100 * v['change']:+.0f}%" if v["metric"] == "perplexity"
                  else f"{v['change']:+.1f}" if v["metric"] in ("chrf", "rouge_l", "bleu") else f"{v['change']:+.2f}")
        lines.append(f"{v['label']:<20}{_fmt(v['metric'], v['base']):>10}{_fmt(v['metric'], v['tuned']):>10}"
                     f"{change:>10}  {v['result']}")
    ratio = (_fmt("length_ratio", base.get("length_ratio")), _fmt("length_ratio", tuned.get("length_ratio")))
    lines.append(f"{'length / reference':<20}{ratio[0]:>10}{ratio[1]:>10}")
    for key in ("by_category", "by_difficulty"):
        groups = tuned.get(key)
        if not groups:
            continue
        lines.append(f"{key[3:]:<20}{'n':>4}{'chrF b→t':>16}{'facts b→t':>16}{'ppl b→t':>16}")
        for g, t in groups.items():
            b = base[key][g]
            lines.append(f"  {ljust(g, 18)}{t['n']:>4}{_fmt('chrf', b['chrf']) + '→' + _fmt('chrf', t['chrf']):>16}"
                         f"{_fmt('fact_recall', b['fact_recall']) + '→' + _fmt('fact_recall', t['fact_recall']):>16}"
                         f"{_fmt('perplexity', b['perplexity']) + '→' + _fmt('perplexity', t['perplexity']):>16}")
    lines += grounded_lines(metrics)
    return lines


FOUR_WAY = (("base_plain", "base, no context"), ("base", "base + retrieval"), ("tuned_plain", "tuned, no retrieval"),
            ("tuned", "tuned + retrieval"))


def grounded_lines(metrics: dict) -> list[str]:
    """Retrieval recall, and the four answers side by side when they were all asked for."""
    lines = []
    r = metrics.get("retrieval")
    if r and r.get("questions"):
        lines.append(f"retrieval: top {r['k']} of {r['passages']} passages; cited article found for "
                     + ", ".join(f"@{k} {r[f'recall@{k}']:.2f}" for k in recall_ks(r)) + f" of {r['questions']} questions")
    if "base_plain" in metrics:
        shown = ("fact_recall", "chrf", "perplexity", "citation_valid", "facts_supported", "eos_rate")
        lines.append(f"{'':<22}" + "".join(f"{METRICS[m][1][:14]:>15}" for m in shown))
        for name, label in FOUR_WAY:
            lines.append(f"{label:<22}" + "".join(f"{_fmt(m, metrics[name].get(m)):>15}" for m in shown))
    return lines


def run(args) -> int:
    if args.batch_size < 1:
        raise KoloraError("--max-new-tokens and --batch-size must be at least 1")
    gen = gen_config(args, GEN_DEFAULTS)
    plan = make_plan(args)
    if args.max_new_tokens is None:
        from transformers import AutoTokenizer

        gen.max_new_tokens = answer_budget(AutoTokenizer.from_pretrained(plan.tokenizer), plan.examples)
    t0 = time.time()
    metrics, samples = evaluate(plan, gen, args.batch_size, use_cache=not args.no_cache)
    metrics["timing"]["total_s"] = round(time.time() - t0, 1)
    paths = write_outputs(plan, metrics, samples)
    sides = metrics["sides"]
    print(f"eval: {metrics['data']['n']} questions from {metrics['data']['source']}; "
          f"base = {sides['base']['label']}, tuned = {sides['tuned']['label']}")
    for line in summary_lines(metrics):
        print(line)
    for warning in metrics["warnings"]:
        print(f"warning: {warning}")
    print(f"({metrics['timing']['total_s']:.0f} s) report: {paths['report']}")
    print(f"metrics: {paths['metrics']}, samples: {paths['samples']}")
    return 0
