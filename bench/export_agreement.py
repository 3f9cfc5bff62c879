"""Does the exported GGUF answer like `kolora chat`? Greedy answers from llama.cpp (llama-cpp-python,
the GGUF's own chat template) against kolora's, per quant, on a run's test questions.

    python bench/export_agreement.py runs/demo                      # f16 and q8_0, all test questions
    python bench/export_agreement.py runs/demo --n 10 --quants q8_0

Needs the `[llamacpp]` extra (`make install-llamacpp`). For each quant it exports the run
(`kolora export`, round trip included), then for every test question (grounded runs: with the
passages the run's own index retrieves, as chat does):
- kolora: the tuned model as `kolora chat -q` runs it (one prompt at a time, chat's dtype, greedy,
  no repetition penalty), `--max-new-tokens` tokens;
- llama.cpp: `create_chat_completion` with the GGUF's template (the prompt ids it feeds the model
  are captured and compared with training's), and the greedy tokens of that same prompt.
It prints and writes (`--out`/agreement.json) per quant: the file size, how many answers have
identical first `--tokens` tokens, the token-level match rate (tokens equal at the same position,
over kolora's answer tokens), and how many prompts llama.cpp tokenized differently from training.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from common import cpu_name  # noqa: E402 - bench/common.py, beside this script


def kolora_answers(run, examples, max_new: int, dtype: str | None = None) -> tuple[list[list[int]], list[list[int]], str]:
    """Prompt ids and greedy answer ids, one prompt at a time, as `kolora chat -q` generates them
    (in chat's dtype, or `dtype`)."""
    import torch

    from kolora.generation import load_tuned
    from kolora.prompt import encode_prompt

    model, tokenizer, cfg = load_tuned(run, dtype=dtype)
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    prompts, answers = [], []
    for ex in examples:
        ids = encode_prompt(tokenizer, ex, cfg.data.system_prompt, cfg.data.template)
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=max_new, do_sample=False, temperature=None, top_p=None, top_k=None,
                                 repetition_penalty=1.0, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        prompts.append(ids)
        answers.append(cut_at_eos(out[0, len(ids):].tolist(), tokenizer.eos_token_id))
    return prompts, answers, dtype


def cut_at_eos(ids: list[int], eos: int) -> list[int]:
    return ids[:ids.index(eos) + 1] if eos in ids else ids


def llama_answers(gguf: Path, examples, max_new: int, eos: int) -> tuple[list[list[int]], list[list[int]], list[str]]:
    """(prompt ids create_chat_completion fed the model, greedy answer ids, its answer texts)."""
    from llama_cpp import Llama

    from kolora.export import messages_of

    llm = Llama(model_path=str(gguf), n_ctx=4096, n_threads=2, seed=0, verbose=False)
    seen: list[list[int]] = []
    complete = llm.create_completion

    def capture(prompt, *args, **kwargs):
        seen.append(list(prompt))
        return complete(prompt, *args, **kwargs)

    llm.create_completion = capture
    prompts, answers, texts = [], [], []
    for ex in examples:
        out = llm.create_chat_completion(messages=messages_of(ex), temperature=0.0, repeat_penalty=1.0,
                                         max_tokens=max_new, seed=0)
        prompts.append(seen[-1])
        texts.append(out["choices"][0]["message"]["content"])
        tokens = []
        for token in llm.generate(seen[-1], temp=0.0, repeat_penalty=1.0, reset=True):
            tokens.append(int(token))
            if token == eos or len(tokens) >= max_new:
                break
        answers.append(tokens)
    return prompts, answers, texts


def agreement(ref: list[list[int]], got: list[list[int]], first: int) -> dict:
    same_first = sum(a[:first] == b[:first] for a, b in zip(ref, got))
    matched = sum(sum(x == y for x, y in zip(a, b)) for a, b in zip(ref, got))
    total = sum(len(a) for a in ref)
    same_all = sum(a == b for a, b in zip(ref, got))
    return {"answers": len(ref), f"identical_first_{first}": same_first, "identical_whole": same_all,
            "token_match_rate": round(matched / max(total, 1), 4)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--quants", nargs="+", default=["f16", "q8_0"])
    ap.add_argument("--n", type=int, default=0, help="first N test questions (0 = all)")
    ap.add_argument("--tokens", type=int, default=20, help="the first N answer tokens must be identical")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                    help="kolora's dtype (default: chat's, bfloat16 on a CPU with bf16); float32 says whether a "
                         "difference comes from the GGUF or from chat's bf16")
    ap.add_argument("--reuse", action="store_true", help="use the exports already in --out")
    ap.add_argument("--out", default=None, help="folder for the exports and agreement.json (default: RUN-agreement)")
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from kolora import grounding
    from kolora.data import Example, read_jsonl
    from kolora.export import export
    from kolora.runs import open_run

    run = open_run(args.run)
    cfg = run.config()
    test = read_jsonl(run.split("test"))
    test = test[:args.n] if args.n else test
    examples = [Example(ex.question, "") for ex in test]
    tokenizer = AutoTokenizer.from_pretrained(run.tokenizer)
    g = grounding.load(run.path, cfg)
    if g is not None:
        examples, _ = g.ground(examples, tokenizer)
    out = Path(args.out or f"{str(run.path).rstrip('/')}-agreement")
    t0 = time.time()
    train_prompts, ref, dtype = kolora_answers(run, examples, args.max_new_tokens, args.dtype)
    kolora_s = time.time() - t0
    eos = tokenizer.eos_token_id
    rows = {}
    for quant in args.quants:
        marker = out / quant / "kolora-export.json"
        result = json.loads(marker.read_text()) if args.reuse and marker.is_file() else \
            export(str(run.path), str(out / quant), quant=quant, force=True)
        t0 = time.time()
        prompts, got, texts = llama_answers(out / quant / result["gguf"], examples, args.max_new_tokens, eos)
        rows[quant] = {"size_mb": result["size_mb"], "round_trip_max_logit_diff": result["round_trip"].get("max_logit_diff"),
                       "prompts_as_training": sum(p == t for p, t in zip(prompts, train_prompts)),
                       **agreement(ref, got, args.tokens), "llama_cpp_seconds": round(time.time() - t0, 1),
                       "first_answer": texts[0][:120]}
    report = {"run": str(run.path), "cpu": cpu_name(), "questions": len(examples), "kolora_dtype": dtype,
              "max_new_tokens": args.max_new_tokens, "kolora_seconds": round(kolora_s, 1), "quants": rows}
    name = f"agreement-{args.dtype}.json" if args.dtype else "agreement.json"
    (out / name).write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    print(f"\n{run.path}: {len(examples)} test questions, greedy, {args.max_new_tokens} new tokens; kolora chat in {dtype}; "
          f"CPU {report['cpu']}")
    print(f"| quant | size | prompts as training | identical first {args.tokens} tokens | identical answers | "
          "token match rate |")
    print("| --- | --- | --- | --- | --- | --- |")
    for quant, r in rows.items():
        n = r["answers"]
        print(f"| {quant} | {r['size_mb']} MB | {r['prompts_as_training']}/{n} | {r[f'identical_first_{args.tokens}']}/{n} | "
              f"{r['identical_whole']}/{n} | {r['token_match_rate']:.3f} |")
    print(f"written: {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
