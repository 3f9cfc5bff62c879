"""The one generation path (chat, eval, serve, export checks): what it adds on top of transformers."""

import pytest
import torch
from conftest import ARCHS

from kolora.generation import GenConfig, generate_details
from kolora.models import ModelSource, load_model, load_tokenizer


@pytest.mark.parametrize("arch", ARCHS)
def test_the_output_layer_gets_a_contiguous_input_and_answers_do_not_change(tiny_models, arch):
    """transformers passes the prompt's last position to the output layer as a strided view; for
    Gemma's 262k-row head torch.matmul then copies the weight once per row. kolora's pre-hook
    hands it a contiguous copy: the same greedy tokens as plain `generate`, and no strided
    input reaches the head."""
    src = ModelSource(arch, str(tiny_models[arch]), "local")
    tok = load_tokenizer(src)
    prompts = [tok("전세 기간은 몇 년인가요?").input_ids, tok("보증금").input_ids]
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    reference = load_model(src, "float32").eval()
    with torch.no_grad():
        plain = reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[:, width:]

    model = load_model(src, "float32").eval()
    head = model.get_output_embeddings()
    raw, final = [], []
    head.register_forward_pre_hook(lambda _m, args: raw.append(args[0].is_contiguous()))  # before kolora's
    gen = GenConfig(max_new_tokens=6, repetition_penalty=1.0)
    first, _ = generate_details(model, tok, prompts, gen)
    head.register_forward_pre_hook(lambda _m, args: final.append(args[0].is_contiguous()))  # after kolora's
    second, _ = generate_details(model, tok, prompts, gen)
    assert len(head._forward_pre_hooks) == 3  # kolora's hook is added once per model
    assert not all(raw), "transformers no longer passes a strided view: the hook may be unnecessary"
    assert final and all(final)
    expected = [tok.decode(row[:list(row).index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row,
                           skip_special_tokens=True).strip() for row in plain.tolist()]
    assert [g.text for g in first] == [g.text for g in second] == expected


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("adapter", [False, True])
def test_dropping_finished_rows_gives_generates_tokens(tiny_models, arch, adapter):
    """`decode_batch` drops a row from the batch and the KV cache at its EOS; every row must still
    get exactly the tokens `model.generate` gives it, including rows that outlive the others and a
    prompt that runs past Gemma-3's sliding window (64 in the tiny config)."""
    from peft import LoraConfig, get_peft_model

    from kolora.generation import decode_batch

    src = ModelSource(arch, str(tiny_models[arch]), "local")
    tok = load_tokenizer(src)
    texts = ["전세 기간은 몇 년인가요?", "보증금", "임대차 계약 갱신 " * 12, "묵시적 갱신과 계약 해지 통지"]
    prompts = [tok(t).input_ids for t in texts]
    width, pad = max(map(len, prompts)), tok.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    model = load_model(src, "float32").eval()
    if adapter:
        torch.manual_seed(1)
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).eval()

    def reference(eos, n=24):
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                                  pad_token_id=pad, eos_token_id=eos)[:, width:]

    # an "EOS" that some rows produce early and others never: rows end at different steps
    free = reference(None).tolist()
    eos = next(t for t in free[0][1:8] if any(t not in row for row in free[1:]))
    expected = reference(eos)
    got = decode_batch(model, ids, mask, 24, eos, pad)
    ends = [row.index(eos) if eos in row else None for row in expected.tolist()]
    assert any(e is not None and e < 23 for e in ends) and None in ends  # rows really were dropped early
    width_out = expected.shape[1]  # generate stops when every row has ended
    assert got[:, :width_out].tolist() == expected.tolist()
    assert (got[:, width_out:] == pad).all()


def test_verify_replaces_a_failing_answer_with_the_first_candidate_that_passes(monkeypatch):
    """--verify: only answers the check rejects are answered again; the first sampled candidate
    that passes, stops and still cites (where the first answer cited) replaces it; where none
    passes the first answer stays, marked tries=0."""
    from types import SimpleNamespace

    from kolora import generation as G
    from kolora.data import Example

    first = [G.Generation("좋은 답 제1조", 5, True), G.Generation("나쁜 답", 5, True),
             G.Generation("나쁜 답 제5조", 5, True)]
    candidates = [G.Generation(t, 3, stopped) for t, stopped in [
        ("나쁜 후보", True), ("좋은 후보 제2조", False), ("좋은 후보 제3조", True),  # for the second question
        ("좋은 답이지만 인용 없음", True), ("나쁜 y 제6조", True), ("나쁜 z", True)]]  # for the third
    calls = []

    def fake_generate(model, tokenizer, prompts, gen, streamer=None):
        calls.append((prompts, gen))
        return candidates[:len(prompts)], {"new_tokens": 3 * len(prompts), "seconds": 0.0}

    monkeypatch.setattr(G, "generate_details", fake_generate)

    def check(answer, question):
        return SimpleNamespace(unsupported=["x"] if "나쁜" in answer else [], cites="제" in answer)

    examples = [Example(f"질문 {i}", "") for i in range(3)]
    out, counts = G.verified(None, None, [[1], [2], [3]], examples, first, G.GenConfig(verify=3, seed=5), check, 32)
    assert len(calls) == 1 and calls[0][0] == [[2], [2], [2], [3], [3], [3]]
    assert calls[0][1].temperature == G.VERIFY_TEMPERATURE and calls[0][1].seed == 5
    assert out[0] == first[0]  # passed: never answered again
    assert (out[1].text, out[1].tries, out[1].first) == ("좋은 후보 제3조", 4, "나쁜 답")  # not the unstopped one
    assert (out[2].text, out[2].tries) == ("나쁜 답 제5조", 0)  # a candidate that drops the citation does not count
    assert counts["failed_first"] == 2 and counts["replaced"] == 1


def test_verify_answers_again_an_answer_that_loops_or_never_ends(monkeypatch):
    """--verify also re-answers what the health check rejects: a first answer that passes the
    citation check but loops, or ran out of budget without EOS; a looping candidate does not
    replace it."""
    from types import SimpleNamespace

    from kolora import generation as G
    from kolora.data import Example

    loop = "제1조에 따라 " + "임차인이 그 기간 동안 주택을 사용한 경우, " * 4
    first = [G.Generation("좋은 답 제1조", 5, True), G.Generation(loop, 9, True), G.Generation("끝나지 않는 답 제2조", 9, False)]
    candidates = [G.Generation(t, 3, True) for t in [loop, "고친 답 제1조", "또 고친 답 제2조", "안 쓰임 제2조"]]
    monkeypatch.setattr(G, "generate_details", lambda model, tok, prompts, gen, streamer=None: (
        candidates[:len(prompts)], {"new_tokens": 3 * len(prompts), "seconds": 0.0}))

    def check(answer, question):
        return SimpleNamespace(unsupported=[], cites="제" in answer)

    out, counts = G.verified(None, None, [[1], [2], [3]], [Example(f"질문 {i}", "") for i in range(3)], first,
                             G.GenConfig(verify=2), check, 32)
    assert out[0] == first[0]
    assert (out[1].text, out[1].tries) == ("고친 답 제1조", 3)  # the looping candidate was passed over
    assert (out[2].text, out[2].tries) == ("또 고친 답 제2조", 2)
    assert counts["failed_first"] == 2 and counts["failed_why"] == {"claims": 0, "no_eos": 1, "loop": 1}
    assert G.find_loop(loop) is not None


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_sampled_decoding_is_seeded_and_a_tiny_nucleus_is_greedy(tiny_models, arch):
    """`decode_batch` with temperature > 0 (--verify's candidates): the same seed gives the same
    tokens, another seed other tokens; a nucleus that holds only the most likely token gives the
    greedy answer exactly."""
    from kolora.generation import decode_batch, left_padded

    src = ModelSource(arch, str(tiny_models[arch]), "local")
    tok = load_tokenizer(src)
    pad = tok.pad_token_id
    ids, mask = left_padded([tok(t).input_ids for t in ["전세 기간은 몇 년인가요?", "보증금", "묵시적 갱신과 계약 해지 통지"]], pad)
    model = load_model(src, "float32").eval()
    no_eos = -1  # every row decodes the whole budget
    greedy = decode_batch(model, ids, mask, 16, no_eos, pad)
    a = decode_batch(model, ids, mask, 16, no_eos, pad, temperature=1.0, top_p=1.0, seed=3)
    b = decode_batch(model, ids, mask, 16, no_eos, pad, temperature=1.0, top_p=1.0, seed=3)
    c = decode_batch(model, ids, mask, 16, no_eos, pad, temperature=1.0, top_p=1.0, seed=4)
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist() and a.tolist() != greedy.tolist()
    tiny = decode_batch(model, ids, mask, 16, no_eos, pad, temperature=1.0, top_p=1e-9, seed=3)
    assert tiny.tolist() == greedy.tolist()
