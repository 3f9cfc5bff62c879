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
