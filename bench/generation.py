"""Batched answer speed: kolora's decoding against transformers' `generate` on the same prompts.

    .venv/bin/python bench/generation.py RUN [--questions 32] [--batch-sizes 1,8,32] [--out FILE]

RUN is a trained run (the demo: `runs/demo`). Its test questions are put in the prompt format
`kolora eval` answers them in (with the run's retrieved passages when it is grounded), and the
tuned model answers them greedily with the budget eval uses (1.5 × the longest reference):

- `kolora bN`: `kolora.generation.generate_details` with N questions at a time, the path of
  chat, eval and serve (left-padded batch, KV cache, a row leaves the batch at its EOS; one
  prompt alone goes to `generate`, there being no other row to drop);
- `generate bN`: `model.generate` on the same batches, the peer (a finished row keeps decoding
  until the batch's last row ends).

Prints answer tokens/s per line and checks that both give the same answers (greedy decoding of
the same batches; a difference is reported, not hidden). The result names the CPU."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_name  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a trained run directory (e.g. runs/demo)")
    ap.add_argument("--questions", type=int, default=32, help="test questions answered per line (default 32)")
    ap.add_argument("--batch-sizes", default="1,8,32", help="comma-separated batch sizes (default 1,8,32)")
    ap.add_argument("--no-peer", action="store_true", help="skip transformers' generate")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()

    import torch
    import transformers

    from kolora import grounding
    from kolora.evaluate import answer_budget, load_eval_examples
    from kolora.generation import (
        GenConfig,
        answer_prompts,
        contiguous_head_input,
        generate_details,
        left_padded,
        load_tuned,
        pad_id,
        until_eos,
    )
    from kolora.runs import open_run

    run = open_run(args.run)
    cfg = run.config()
    examples, _ = load_eval_examples(run, None, "test", None)
    model, tokenizer, cfg = load_tuned(run)
    gen = GenConfig(max_new_tokens=answer_budget(tokenizer, examples))  # eval's budget, from the whole split
    examples = examples[:args.questions]
    contiguous_head_input(model)
    found = grounding.load(run.path, cfg)
    if found is not None:
        examples, _ = found.ground(examples, tokenizer)
    prompts = answer_prompts(tokenizer, cfg, examples)
    prompts.sort(key=len)  # as eval batches them: similar lengths together
    pad = pad_id(tokenizer)
    print(f"{len(prompts)} questions, prompts {len(prompts[0])}-{len(prompts[-1])} tokens, budget "
          f"{gen.max_new_tokens} new tokens, grounded: {found is not None}; {cpu_name()}, "
          f"{torch.get_num_threads()} threads", flush=True)

    def peer(batch):
        ids, mask = left_padded(batch, pad)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=gen.max_new_tokens,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=pad, do_sample=False,
                                 temperature=None, top_p=None, top_k=None)[:, ids.shape[1]:]
        return [until_eos(row, tokenizer.eos_token_id)[0] for row in out.tolist()]

    def ours(batch):
        generations, _ = generate_details(model, tokenizer, batch, gen)
        return [g.text for g in generations], sum(g.new_tokens for g in generations)

    lines, texts = [], {}
    for bs in [int(x) for x in args.batch_sizes.split(",")]:
        for name in ["kolora"] + ([] if args.no_peer or bs == 1 else ["generate"]):
            t0, n_new, answers = time.time(), 0, []
            for start in range(0, len(prompts), bs):
                batch = prompts[start:start + bs]
                if name == "kolora":
                    got, n = ours(batch)
                else:
                    rows = peer(batch)
                    got, n = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in rows], sum(map(len, rows))
                answers += got
                n_new += n
            seconds = time.time() - t0
            texts[(name, bs)] = answers
            line = {"decoder": name, "batch": bs, "new_tokens": n_new, "seconds": round(seconds, 1),
                    "tokens_per_s": round(n_new / seconds, 1)}
            lines.append(line)
            print(f"{name:<8} b{bs:<3} {n_new:>6} answer tokens in {seconds:6.1f} s = {n_new / seconds:6.1f} tokens/s",
                  flush=True)
    for (name, bs), answers in texts.items():
        if name == "generate":
            same = sum(a == b for a, b in zip(answers, texts[("kolora", bs)]))
            print(f"b{bs}: kolora and generate give the same answer for {same}/{len(answers)} questions")
            next(x for x in lines if x["decoder"] == "generate" and x["batch"] == bs)["same_answers"] = same
    result = {"run": str(run.path), "cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "transformers": transformers.__version__, "model": cfg.model.name, "questions": len(prompts),
              "max_new_tokens": gen.max_new_tokens, "grounded": found is not None, "lines": lines,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
        print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
