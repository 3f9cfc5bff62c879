"""A real llama.cpp answering from kolora's exports: llama-cpp-python (the `[llamacpp]` extra,
built from source with portable flags by `make install-llamacpp`) loads the GGUF and answers
through `create_chat_completion` with the GGUF's own chat template, as a user's client would.

kolora's own round trip reads the GGUF back with transformers; these tests put the real client in
the loop. They skip where llama-cpp-python is not installed, except in CI, which installs it."""

import os

import pytest
from conftest import TINY_TRAIN, build_tiny, run_cli
from test_export import conversations

from kolora import export as ex
from kolora.prompt import encode_prompt

MISSING = "llama-cpp-python is not installed: `make install-llamacpp` builds it (~4 min on 2 cores)"


def llama_class(skip: bool = True):
    """llama_cpp.Llama; where it is not installed the test skips (or, with skip=False, gets None),
    but in CI, which installs it, the test fails: these tests must run there."""
    try:
        from llama_cpp import Llama
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("CI runs the llama.cpp tests: .ci/run installs llama-cpp-python (make install-llamacpp)")
        if skip:
            pytest.skip(MISSING)
        return None
    return Llama


def load(Llama, gguf):
    return Llama(model_path=str(gguf), n_ctx=1024, n_threads=2, seed=0, verbose=False)


def chat_prompt_ids(llm, messages) -> list[int]:
    """The ids llama-cpp-python's create_chat_completion feeds the model (its chat handler
    tokenizes the rendered template and calls create_completion with them)."""
    seen = []
    complete = llm.create_completion
    llm.create_completion = lambda prompt, *a, **k: seen.append(list(prompt)) or complete(prompt, *a, **k)
    try:
        llm.create_chat_completion(messages=messages, max_tokens=1, temperature=0.0)
    finally:
        llm.create_completion = complete
    return seen[-1]


def export_tiny(tmp_path, small_csv, name, quant, **tiny):
    model = build_tiny(tmp_path / f"model-{name}", **tiny)
    run = tmp_path / f"run-{name}"
    r = run_cli("train", "--model", str(model), "--data", str(small_csv), "--out", str(run), *TINY_TRAIN)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / f"gguf-{name}"
    r = run_cli("export", str(run), "--quant", quant, "--out", str(out))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    import json

    return run, out / json.loads((out / "kolora-export.json").read_text())["gguf"]


@pytest.mark.slow
@pytest.mark.parametrize("name, quant, tiny", [
    ("gemma3-bos", "f16", dict(arch="gemma3", bos=True)),  # kolora's fallback prompt, BOS first (like Gemma)
    ("llama-chatml", "q8_0", dict(arch="llama", chat_template=True)),  # the model's own template, no BOS
])
def test_llama_cpp_chat_completion_feeds_the_training_ids(tmp_path, small_csv, name, quant, tiny):
    """Every conversation shape, grounded ones included, reaches the model as the ids training
    used, with exactly one BOS where training had one."""
    from transformers import AutoTokenizer

    from kolora.runs import open_run

    run, gguf = export_tiny(tmp_path, small_csv, name, quant, **tiny)
    run_obj = open_run(str(run))
    cfg, tokenizer = run_obj.config(), AutoTokenizer.from_pretrained(run_obj.tokenizer)
    llm = load(llama_class(), gguf)
    for conv in conversations():
        want = encode_prompt(tokenizer, conv, cfg.data.system_prompt, cfg.data.template)
        got = chat_prompt_ids(llm, ex.messages_of(conv))
        assert got == want, (conv, got[:8], want[:8])
        assert got.count(tokenizer.bos_token_id) == int(tiny.get("bos", False))


def assert_answers_like_kolora_chat(run, gguf, n: int = 3, tokens: int = 20) -> None:
    """Greedy answers from llama.cpp's chat completion (the GGUF's own template) equal kolora's
    for the first `tokens` tokens on the run's first `n` test questions. Called by test_slow's
    real-Gemma test on its f16 export (one training run serves both).

    kolora answers here in float32, the merged weights' own numbers. `kolora chat` on a bf16 CPU
    computes in bf16, whose rounding alone flips near-ties: on the demo run (57 test questions,
    `bench/export_agreement.py`, AMD EPYC) the f16 GGUF had identical first 20 tokens on 57/57
    against float32 and 54/57 against chat's bf16; on this 2-step run a near-base model's
    answer diverged from bf16 at its 10th token."""
    from kolora.data import Example, read_jsonl
    from kolora.generation import GenConfig, generate, load_tuned
    from kolora.runs import open_run

    Llama = llama_class(skip=False)
    if Llama is None:  # the rest of the caller's test has run; say what was not
        print(f"llama.cpp comparison not run: {MISSING}")
        return
    run_obj = open_run(str(run))
    model, tokenizer, cfg = load_tuned(run_obj, dtype="float32")  # chat's loader, float32
    questions = [Example(e.question, "") for e in read_jsonl(run_obj.split("test"))[:n]]
    gen = GenConfig(max_new_tokens=tokens)  # chat's defaults: greedy, no repetition penalty
    kolora = [generate(model, tokenizer, [encode_prompt(tokenizer, q, cfg.data.system_prompt, cfg.data.template)], gen)[0][0]
              for q in questions]
    del model
    llm = load(Llama, gguf)
    for q, want in zip(questions, kolora):
        got = llm.create_chat_completion(messages=ex.messages_of(q), max_tokens=tokens, temperature=0.0,
                                         repeat_penalty=1.0)["choices"][0]["message"]["content"]
        assert got.strip() == want, (q.question, got, want)
