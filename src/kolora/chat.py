"""`kolora chat RUN`: talk to a trained adapter (or its base model) with the training prompt
format; `--quick-test N` answers N test-split questions, `--compare` beside the base model's."""

from __future__ import annotations

import sys
from contextlib import nullcontext
from functools import partial

from . import grounding
from .data import Example, read_jsonl
from .errors import KoloraError
from .generation import VERIFY_FLAG, GenConfig, add_gen_flags, gen_config, generate, generate_batched, load_tuned
from .grounding import sources_line
from .prompt import encode_prompt
from .runs import open_run

HELP = "chat with a trained run"


def add_arguments(p) -> None:
    p.add_argument("run")
    p.add_argument("--question", "-q", help="answer one question and exit")
    p.add_argument("--quick-test", type=int, metavar="N", nargs="?", const=3, help="answer N test-split questions")
    p.add_argument("--base", action="store_true", help="use the base model (adapter disabled)")
    p.add_argument("--compare", action="store_true", help="with --quick-test: base and tuned answers side by side")
    p.add_argument("--no-retrieval", action="store_true",
                   help="a grounded run answers without retrieved passages (the ungrounded answer, for comparison)")
    add_gen_flags(p)
    p.add_argument(VERIFY_FLAG[0], type=int, default=0, metavar="N", help=VERIFY_FLAG[1])


def run(args) -> int:
    if args.quick_test:
        quick_test(args.run, args.quick_test, gen_config(args), compare=args.compare, base=args.base,
                   retrieval=not args.no_retrieval)
    else:
        interactive(args.run, gen_config(args), base=args.base, question=args.question, retrieval=not args.no_retrieval)
    return 0


def sources(g, answer: str, question: str, hits) -> list[str]:
    """The lines printed under a grounded answer: its sources, then what the citation check
    could not find in the corpus (a wrong article, a number no cited article states)."""
    report = g.check(answer, question, [])
    cited = {c.passage_id for c in report.citations if c.passage_id}
    lines = [sources_line(hits, cited)]
    lines += [f"  확인 필요 (check): {claim}" for claim in report.unsupported]
    return lines


def verify_line(answer) -> str:
    if answer.tries == 0:
        return "검증 (--verify): 다시 답한 후보도 모두 확인에 실패해 첫 답변을 그대로 둡니다 (no candidate passed)"
    return (f"검증 (--verify): 첫 답변이 확인에 실패해 {answer.tries - 1}번째 후보로 바꿨습니다 "
            f"(first answer: {clip(answer.first, 200)})")


def clip(text: str, limit: int = 400) -> str:
    """Long (often looping) answers are cut for display, saying how much was cut."""
    text = " ".join(text.split())
    return text if len(text) <= limit else f"{text[:limit]} … (+{len(text) - limit}자)"


def quick_test(run_path: str, n: int, gen: GenConfig, compare: bool = False, base: bool = False,
               retrieval: bool = True) -> list[dict]:
    run = open_run(run_path)
    test = read_jsonl(run.split("test")) if run.split("test").is_file() else []
    if not test:
        raise KoloraError(f"{run_path} has no test split (data/test.jsonl)", "use --question instead")
    picked = test[:n]
    model, tokenizer, cfg = load_tuned(run)
    g = grounding.load(run.path, cfg) if retrieval else None
    hits = []
    if g is not None:
        picked, hits = g.ground(picked, tokenizer)
    questions = [ex.question for ex in picked]
    rows = [{"question": ex.question, "reference": ex.answer} for ex in picked]
    check = partial(g.check, hits=[]) if g is not None else None  # what --verify answers again by
    if compare or base:
        print(f"generating base-model answers for {len(questions)} test questions …", file=sys.stderr, flush=True)
        # the untuned base is not verified: it never ends with EOS, so no candidate of it could pass
        base_answers, bstats = generate_batched(model, tokenizer, cfg, picked, gen, base=True)
        for r, a in zip(rows, base_answers):
            r["base"] = a.text
    if not base:
        print(f"generating tuned answers for {len(questions)} test questions …", file=sys.stderr, flush=True)
        tuned, tstats = generate_batched(model, tokenizer, cfg, picked, gen, check=check)
        for r, a in zip(rows, tuned):
            r["tuned"] = a.text
            if a.tries != 1:
                r["verify"] = verify_line(a)
    for i, r in enumerate(rows, 1):
        print(f"\n[{i}/{len(rows)}] 질문: {r['question']}")
        print(f"  참고 답변: {r['reference']}")
        if "base" in r:
            print(f"  기본 모델: {clip(r['base'])}")
        if "tuned" in r:
            print(f"  튜닝 모델: {clip(r['tuned'])}")
        if g is not None:
            for line in sources(g, r.get("tuned", r.get("base", "")), r["question"], hits[i - 1]):
                print(f"  {line}")
        if "verify" in r:
            print(f"  {r['verify']}")
    speed = tstats if not base else bstats
    print(f"\n(generation: {speed['new_tokens']} tokens, {speed['tokens_per_s']:.1f} tokens/s)")
    return rows


def interactive(run_path: str, gen: GenConfig, base: bool = False, question: str | None = None,
                retrieval: bool = True) -> None:
    from transformers import TextStreamer

    run = open_run(run_path)
    model, tokenizer, cfg = load_tuned(run)
    g = grounding.load(run.path, cfg) if retrieval else None
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)

    def ask(q: str, use_base: bool) -> None:
        ex, hits = Example(q, ""), []
        if g is not None:
            [ex], [hits] = g.ground([ex], tokenizer)
        if g is not None and gen.verify > 0:  # checked before it is shown: not streamed
            [answer], s = generate_batched(model, tokenizer, cfg, [ex], gen, base=use_base, check=partial(g.check, hits=[]))
            print(answer.text)
            if answer.tries != 1:
                print(f"  {verify_line(answer)}")
            texts = [answer.text]
        else:
            prompt = encode_prompt(tokenizer, ex, cfg.data.system_prompt, cfg.data.template)
            with model.disable_adapter() if use_base else nullcontext():
                texts, s = generate(model, tokenizer, [prompt], gen, streamer)
        if g is not None:
            for line in sources(g, texts[0], q, hits):
                print(line)
        print(f"  ({s['new_tokens']} tokens, {s['tokens_per_s']:.1f} tokens/s)", file=sys.stderr)

    if question is not None:
        ask(question, base)
        return
    print(f"kolora chat — {run.path} ({'base model' if base else 'tuned'}). "
          "/base, /tuned to switch, /exit to leave.", file=sys.stderr)
    while True:
        try:
            q = input("질문> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        if not q:
            continue
        if q in ("/exit", "/quit", "exit", "quit"):
            return
        if q in ("/base", "/tuned"):
            base = q == "/base"
            print(f"now answering with the {'base' if base else 'tuned'} model", file=sys.stderr)
            continue
        ask(q, base)
