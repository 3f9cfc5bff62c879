"""LoRA invariants, checked directly on tiny models of every architecture (as peft's own tests do)."""

import pytest
import torch
from conftest import ARCHS

from kolora.batching import Tokenized, collate
from kolora.config import RunConfig
from kolora.data import Example
from kolora.loss import answer_loss_module
from kolora.models import ModelSource, attach_lora, load_model, load_tokenizer, target_modules
from kolora.prompt import encode_example

EXPECTED = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
}
# distinct inputs of the adapted projections in one layer (q/k/v read one, gate/up read one)
INPUTS = {"gpt2": 4, "llama": 4, "gemma3": 4, "phi": 4}


def setup(path, arch):
    src = ModelSource(arch, str(path), "local")
    tok = load_tokenizer(src)
    model = load_model(src, "float32")
    cfg = RunConfig()
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = 4, 8, 0.0
    peft_model, targets = attach_lora(model, cfg)
    exs = [Example("전세권이란?", "민법 제303조에 따른 권리입니다."), Example("보증금을 안 줘요", "주택임대차보호법 제3조의3을 보세요.")]
    batch = collate([Tokenized(*encode_example(tok, e)) for e in exs], tok.pad_token_id)
    return tok, peft_model, targets, batch


@pytest.mark.parametrize("arch", ARCHS)
def test_auto_targets_per_architecture_never_lm_head(tiny_models, arch):
    model = load_model(ModelSource(arch, str(tiny_models[arch]), "local"), "float32")
    assert target_modules(model, "auto") == EXPECTED[arch]
    assert "lm_head" not in target_modules(model, "all-linear")


@pytest.mark.parametrize("arch", ARCHS)
def test_only_adapter_weights_change_and_invariants_hold(tiny_models, arch, tmp_path):
    torch.manual_seed(0)
    tok, model, _, batch = setup(tiny_models[arch], arch)
    # LoRA B starts at zero so the adapter is a no-op; make it non-trivial first.
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_model = answer_loss_module(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss_sum, n = loss_model(**batch)
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "training changed nothing"
    assert all("lora_" in n for n in changed), f"non-adapter weights changed: {changed - {n for n in changed if 'lora_' in n}}"

    model.eval()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        tuned = model(**inputs).logits
        with model.disable_adapter():
            disabled = model(**inputs).logits
    base = load_model(ModelSource(arch, str(tiny_models[arch]), "local"), "float32").eval()
    with torch.no_grad():
        base_logits = base(**inputs).logits
    assert torch.allclose(disabled, base_logits, atol=1e-5), "disabled adapter must give the base output"
    assert not torch.allclose(tuned, base_logits, atol=1e-4), "adapter had no effect"

    # the answer-only loss equals the full-logits loss on the same labels
    labels = batch["labels"]
    with torch.no_grad():
        full = torch.nn.functional.cross_entropy(tuned[:, :-1].reshape(-1, tuned.size(-1)), labels[:, 1:].reshape(-1),
                                                 ignore_index=-100, reduction="sum")
        mine, _ = loss_model(**batch)
    assert torch.allclose(full, mine, rtol=1e-4)

    # stock peft loads the saved adapter and gives the same output; merged == adapter
    from peft import PeftModel

    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    fresh = load_model(ModelSource(arch, str(tiny_models[arch]), "local"), "float32")
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        again = reloaded(**inputs).logits
        merged = reloaded.merge_and_unload()(**inputs).logits
    assert torch.allclose(again, tuned, atol=1e-5)
    assert torch.allclose(merged, tuned, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("fused", [False, True])
def test_chunked_head_matches_full_logits_loss_and_gradients(tiny_models, arch, monkeypatch, softcap, fused):
    """The output layer + CE runs in row chunks with its gradient computed in forward; loss and
    every LoRA gradient must equal plain full-logits cross entropy (and Phi's head has a bias).
    `fused`: the path training takes with compiled layers (reused buffers, `ce_and_grad` per
    chunk), here with the function uncompiled: the same arithmetic inductor is given."""
    import kolora.loss as loss_module

    monkeypatch.setattr(loss_module, "HEAD_CHUNK_ROWS", 3)  # several chunks and a ragged last one
    torch.manual_seed(0)
    tok, model, _, batch = setup(tiny_models[arch], arch)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    model.get_base_model().config.final_logit_softcapping = softcap
    loss_model = answer_loss_module(model)
    assert loss_model.chunked and loss_model.fused is None
    if fused:
        loss_model.fused = loss_module.ce_and_grad
    mine, count = loss_model(**batch)
    mine.backward()
    chunked = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    if softcap:  # Gemma's own forward applies it from the config; others' do not
        if arch != "gemma3":
            logits = torch.tanh(logits / softcap) * softcap
    full = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), batch["labels"][:, 1:].reshape(-1),
                                             ignore_index=-100, reduction="sum")
    full.backward()
    assert torch.allclose(mine, full, rtol=1e-5)
    assert chunked.keys() == {n for n, p in model.named_parameters() if p.grad is not None} and chunked
    for n, p in model.named_parameters():
        if p.grad is not None:
            scale = float(p.grad.abs().max()) + 1e-12  # float32 sums in another order: relative to the largest entry
            assert float((chunked[n] - p.grad).abs().max()) / scale < 1e-4, n


@pytest.mark.parametrize("arch", ["gpt2", "gemma3"])
@pytest.mark.parametrize("chunked", [True, False, "fused"])
def test_fact_weighted_loss_and_gradients_match_weighted_cross_entropy(tiny_models, arch, chunked, monkeypatch):
    """train.fact_weight: the loss that is backpropagated is Σ w·CE (chunked head and plain head
    alike, gradients included); the plain Σ CE comes back beside it for logging."""
    import kolora.loss as loss_module
    from kolora.batching import fact_weights

    monkeypatch.setattr(loss_module, "HEAD_CHUNK_ROWS", 3)
    torch.manual_seed(0)
    tok, model, _, _ = setup(tiny_models[arch], arch)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    exs = [Example("전세권이란?", "민법 제303조에 따른 권리입니다."), Example("기간은?", "2년이고 보증금의 20분의 1을 넘지 못해요.")]
    rows = []
    for e in exs:
        ids, labels = encode_example(tok, e)
        rows.append(Tokenized(ids, labels, fact_weights(tok, e.answer, labels, 3.0)))
    assert all(3.0 in r.weights for r in rows)  # every answer has a fact
    batch = collate(rows, tok.pad_token_id)
    loss_model = answer_loss_module(model)
    if not chunked:
        loss_model.chunked = False
    if chunked == "fused":
        loss_model.fused = loss_module.ce_and_grad
    weighted, count, plain = loss_model(**batch)
    weighted.backward()
    mine = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels, w = batch["labels"][:, 1:].reshape(-1), batch["weights"][:, 1:].reshape(-1)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels, ignore_index=-100,
                                           reduction="none")
    reference = (ce * w).sum()
    reference.backward()
    assert torch.allclose(weighted, reference, rtol=1e-5)
    assert torch.allclose(plain, ce.sum(), rtol=1e-5) and not torch.allclose(plain, weighted)
    assert int(count) == int((labels != -100).sum())
    for n, p in model.named_parameters():
        if p.grad is not None:
            scale = float(p.grad.abs().max()) + 1e-12
            assert float((mine[n] - p.grad).abs().max()) / scale < 1e-4, n


def test_compiled_fused_head_equals_the_eager_head(tiny_models):
    """The head as training runs it with compiled layers (`fused_head`: torch.compile of
    `ce_and_grad`, inductor's C++ kernels) against the eager chunked head: same loss and LoRA
    gradients. Ragged chunks make the compiled function see two row counts."""
    import shutil

    import kolora.loss as loss_module

    if not shutil.which("g++"):
        pytest.skip("torch.compile on a CPU needs a C++ compiler")
    results = []
    for fused_head in (False, True):
        torch.manual_seed(0)
        tok, model, _, batch = setup(tiny_models["gemma3"], "gemma3")
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.05)
        loss_model = answer_loss_module(model, fused_head=fused_head)
        assert (loss_model.fused is not None) == fused_head
        old = loss_module.HEAD_CHUNK_ROWS
        loss_module.HEAD_CHUNK_ROWS = 5
        try:
            loss, _ = loss_model(**batch)
            loss.backward()
        finally:
            loss_module.HEAD_CHUNK_ROWS = old
        results.append((float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (eager, eager_grads), (fused, fused_grads) = results
    assert abs(eager - fused) / abs(eager) < 1e-5
    for n, g in eager_grads.items():
        assert float((fused_grads[n] - g).abs().max()) / (float(g.abs().max()) + 1e-12) < 1e-4, n


def test_fact_token_mask_marks_the_facts_and_nothing_else(tiny_models):
    from kolora.batching import fact_token_mask

    tok = load_tokenizer(ModelSource("llama", str(tiny_models["llama"]), "local"))
    answer = "민법 제303조 제1항에 따라 6개월 안에 보증금의 20분의 1을 돌려받아요."
    ids = tok(answer, add_special_tokens=False).input_ids
    mask = fact_token_mask(tok, answer, len(ids) + 1)
    assert len(mask) == len(ids) + 1 and mask[-1] is False  # the EOS is never a fact
    # byte-level tokens may hold half a syllable: decode each run of marked / unmarked tokens whole
    runs, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or mask[i] != mask[start]:
            runs.append((mask[start], tok.decode(ids[start:i]).replace(" ", "")))
            start = i
    marked = [text for m, text in runs if m]
    assert any("303" in t for t in marked) and any("6개월" in t for t in marked) and any("20분의1" in t for t in marked)
    unmarked = "".join(text for m, text in runs if not m)
    assert not any(ch.isdigit() for ch in unmarked) and "민법" in unmarked and "돌려받아요" in unmarked


def test_validation_loss_batches_go_to_the_model_device():
    """evaluate_loss collates on the CPU; on a GPU it must move each batch to the model's
    device (the H100 run failed with 'index is on cpu' before this). A meta-device parameter
    stands in for the GPU."""
    import contextlib

    import torch

    from kolora.loss import evaluate_loss

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.empty(1, device="meta"))
            self.seen = set()

        def forward(self, input_ids, attention_mask, labels):
            self.seen |= {input_ids.device.type, attention_mask.device.type, labels.device.type}
            return torch.tensor(2.0), 4

    probe = Probe()
    data = [Tokenized([5, 6, 7], [-100, 6, 7]), Tokenized([5, 6], [-100, 6])]
    assert evaluate_loss(probe, data, pad_id=0, batch_size=1, autocast=contextlib.nullcontext) == 0.5
    assert probe.seen == {"meta"}


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_answer_losses_equal_one_example_at_a_time(tiny_models, arch):
    """`kolora eval`'s per-answer perplexity: rows of different lengths batched with right padding
    give each row the loss it gets alone, in the original order."""
    from kolora.loss import answer_losses

    torch.manual_seed(0)
    tok, model, _, _ = setup(tiny_models[arch], arch)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    model.eval()
    exs = [Example("전세권이란?", "민법 제303조에 따른 권리입니다."),
           Example("임대차 기간을 정하지 않았으면 어떻게 되나요? 아주 길게 물어봅니다.", "2년으로 봅니다."),
           Example("기간은?", "2년이고 보증금의 20분의 1을 넘지 못해요. 주택임대차보호법 제4조 제1항입니다.")]
    alone = answer_losses(model, tok, RunConfig(), exs, batch_size=1)
    batched = answer_losses(model, tok, RunConfig(), exs, batch_size=3)
    assert [n for _, n in batched] == [n for _, n in alone] and all(n > 3 for _, n in alone)
    assert len({round(loss, 3) for loss, _ in alone}) == 3  # three different answers, not one row repeated
    for (a, _), (b, _) in zip(alone, batched):
        assert abs(a - b) <= 1e-4 * abs(a), (a, b)



@pytest.mark.parametrize("arch", ARCHS)
def test_adapters_on_the_top_layers_only_and_no_backward_below(tiny_models, arch, tmp_path):
    """lora.layers N: adapters on the last N decoder layers; nothing below them keeps a gradient
    graph (that is the speed-up), the adapter reloads with stock peft on the same layers."""
    import re

    src = ModelSource(arch, str(tiny_models[arch]), "local")
    tok = load_tokenizer(src)
    cfg = RunConfig()
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.layers = 4, 8, 0.0, 1
    model, targets = attach_lora(load_model(src, "float32"), cfg)
    adapted = {int(re.search(r"\.(\d+)\.", n)[1]) for n, _ in model.named_parameters() if "lora_" in n}
    assert adapted == {1}, f"adapters on layers {adapted}, expected only the top one"

    seen = {}
    layers = [m for n, m in model.named_modules() if re.fullmatch(r".*\.(h|layers)\.\d+", n)]
    for i, layer in enumerate(layers):
        layer.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, (out[0] if isinstance(out, tuple) else out).requires_grad))
    exs = [Example("전세권이란?", "민법 제303조에 따른 권리입니다.")]
    batch = collate([Tokenized(*encode_example(tok, e)) for e in exs], tok.pad_token_id)
    loss_sum, n = answer_loss_module(model)(**batch)
    assert seen == {0: False, 1: True}, "the layer below the adapters must not build a backward graph"
    (loss_sum / n).backward()
    assert all(p.grad is not None for n_, p in model.named_parameters() if "lora_" in n_)

    from peft import PeftModel

    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load_model(src, "float32"), tmp_path / "adapter")
    assert {n for n, _ in reloaded.named_parameters() if "lora_" in n} == {n for n, _ in model.named_parameters() if "lora_" in n}

    cfg.lora.layers = 2  # as many as the model has, or more: every layer
    model, _ = attach_lora(load_model(src, "float32"), cfg)
    assert {int(re.search(r"\.(\d+)\.", n)[1]) for n, _ in model.named_parameters() if "lora_" in n} == {0, 1}


def test_cpu_lora_dropout_keeps_p_and_the_scale_and_draws_independent_masks():
    """kolora::keep_mask drops a share p of the entries (p rounded to 1/65536) and is a pure
    function of (draw, layer, salt): equal arguments give the same mask, a change in any one a
    different mask. Compiled, two equal calls run once (q/k/v share it) and backward uses the
    forward's masks without drawing again."""
    import numpy as np

    from kolora.models import keep_mask_op

    op = keep_mask_op()
    x = torch.ones(1000, 1000)
    t = torch.tensor
    a = op(x, 0.05, t(7), t(0), 0)
    assert a.shape == x.shape and a.dtype == torch.bool
    assert abs((~a).float().mean().item() - 0.05) < 0.002
    assert torch.equal(op(x, 0.05, t(7), t(0), 0), a)  # pure: recomputation gets the same mask
    for other in (op(x, 0.05, t(8), t(0), 0), op(x, 0.05, t(7), t(1), 0), op(x, 0.05, t(7), t(0), 1)):
        assert not torch.equal(other, a)
        assert abs((a & other).float().mean().item() - 0.95 ** 2) < 0.002  # independent, not shifted copies

    seeds = []
    real = np.random.SeedSequence

    def counting(entropy):
        seeds.append(entropy)
        return real(entropy)

    def dropped(v, draw):
        shared = [v * op(v, 0.5, draw, t(3), 0) * 2.0 for _ in range(3)]  # q, k, v: one mask
        own = v * op(v, 0.5, draw, t(3), 1) * 2.0
        return shared, own

    v = torch.ones(64, 64, requires_grad=True)
    compiled = torch.compile(dropped, fullgraph=True)
    compiled(v, t(1))  # compile
    np.random.SeedSequence = counting
    try:
        shared, own = compiled(v, t(2))
        assert len(seeds) == 2  # one call per salt
        (shared[0].sum() + shared[1].sum() + shared[2].sum() + 10 * own.sum()).backward()
        assert len(seeds) == 2  # backward drew nothing
    finally:
        np.random.SeedSequence = real
    assert torch.equal(shared[0], shared[1]) and torch.equal(shared[0], shared[2]) and not torch.equal(shared[0], own)
    # the gradient uses the masks of the forward: 3 × 2 where the shared mask kept, 20 where the other kept
    assert torch.equal(v.grad, (shared[0] > 0).float() * 6.0 + (own > 0).float() * 20.0)


@pytest.mark.parametrize("arch", ARCHS)
def test_cpu_lora_dropout_replaces_every_lora_dropout_and_is_off_in_eval(tiny_models, arch):
    from kolora.models import cpu_lora_dropout

    src = ModelSource(arch, str(tiny_models[arch]), "local")
    tok = load_tokenizer(src)
    cfg = RunConfig()
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = 4, 8, 0.5
    peft_model, _ = attach_lora(load_model(src, "float32"), cfg)
    for name, p in peft_model.named_parameters():  # B = 0 at init would hide the dropout
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    exs = [Example("전세권이란?", "민법 제303조에 따른 권리입니다.")]
    batch = collate([Tokenized(*encode_example(tok, e)) for e in exs], tok.pad_token_id)
    peft_model.eval()
    with torch.no_grad():
        before = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    n_lora = sum(1 for m in peft_model.modules() if hasattr(m, "lora_dropout") and "default" in m.lora_dropout)
    assert cpu_lora_dropout(peft_model) == n_lora > 0
    assert not any(isinstance(d, torch.nn.Dropout) for m in peft_model.modules() if hasattr(m, "lora_dropout")
                   for d in m.lora_dropout.values())
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, before)
        peft_model.train()
        torch.manual_seed(0)
        trained = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert not torch.allclose(trained, before)  # dropout acts in training
    with torch.no_grad():
        again = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.manual_seed(0)
        same = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert not torch.equal(again, trained) and torch.equal(same, trained)  # a new draw per pass, from torch's seed
    drops = [m for m in peft_model.modules() if type(m).__name__ == "MaskDropout"]
    # one salt per input of a layer (q/k/v share one, gate/up share one), the same in every layer
    assert len({m.salt for m in drops}) == INPUTS[arch]
    assert len({int(m.layer) for m in drops}) == peft_model.config.num_hidden_layers
    # one layer-id tensor per layer, shared by its projections: q/k/v's compiled calls then have equal
    # arguments and inductor computes their mask once (three equal tensors are three graph inputs: no merge)
    assert len({id(m.layer) for m in drops}) == peft_model.config.num_hidden_layers
    assert not any("draw" in k or k.endswith(".layer") for k in peft_model.state_dict())  # nothing saved
    peft_model.eval()
    state = torch.get_rng_state()
    with torch.no_grad():
        peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert torch.equal(torch.get_rng_state(), state)  # evaluation draws nothing


def test_cpu_lora_dropout_draws_the_same_masks_when_checkpointing_recomputes(tiny_models):
    """Gradient checkpointing runs each layer's forward again in backward: the masks must be the
    forward's (the recomputation runs inside the same forward pass, whose draw the masks are a
    function of), so the gradients equal those without checkpointing."""
    from kolora.models import cpu_lora_dropout

    src = ModelSource("llama", str(tiny_models["llama"]), "local")
    tok = load_tokenizer(src)
    exs = [Example("전세권이란?", "민법 제303조에 따른 권리입니다.")]
    batch = collate([Tokenized(*encode_example(tok, e)) for e in exs], tok.pad_token_id)
    grads = []
    for checkpointing in (False, True):
        cfg = RunConfig()
        cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = 4, 8, 0.5
        torch.manual_seed(0)
        model = load_model(src, "float32")
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        peft_model, _ = attach_lora(model, cfg)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.5, generator=torch.Generator().manual_seed(1))
        cpu_lora_dropout(peft_model)
        peft_model.train()
        torch.manual_seed(5)
        out = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in peft_model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)


def test_the_padding_mask_is_dropped_only_for_right_padded_batches():
    from kolora.loss import causal_mask_only

    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert causal_mask_only(right) is None and causal_mask_only(torch.ones(2, 4, dtype=torch.long)) is None
    left, inner = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]), torch.tensor([[1, 0, 1, 1]])
    assert causal_mask_only(left) is left and causal_mask_only(inner) is inner
    assert causal_mask_only(None) is None


def padded_past_the_window(arch, tiny_models):
    """A LoRA model (B ≠ 0) and a right-padded batch of two rows, one past the tiny Gemma-3's sliding window (64)."""
    torch.manual_seed(0)
    tok, model, _, _ = setup(tiny_models[arch], arch)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    exs = [Example("전세권이란?", "민법 제303조에 따른 권리입니다."),
           Example("임대차 기간을 정하지 않았으면 어떻게 되나요? " * 6, "2년으로 봅니다. 주택임대차보호법 제4조 제1항입니다.")]
    batch = collate([Tokenized(*encode_example(tok, e)) for e in exs], tok.pad_token_id)
    lengths = batch["attention_mask"].sum(1)
    assert int(lengths.max()) > 64 and int(lengths.min()) < batch["input_ids"].shape[1]  # padded, past the window
    return model, batch


def loss_and_lora_grads(model, batch):
    model.zero_grad(set_to_none=True)
    total, _ = answer_loss_module(model)(**batch)
    total.backward()
    return total.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_loss_and_grads(first, second):
    (a, ga), (b, gb) = first, second
    assert torch.allclose(a, b, rtol=1e-5) and ga.keys() == gb.keys() and ga
    for n in ga:
        scale = float(gb[n].abs().max()) + 1e-12
        assert float((ga[n] - gb[n]).abs().max()) / scale < 1e-4, n


@pytest.mark.parametrize("arch", ARCHS)
def test_right_padded_losses_and_gradients_equal_those_with_the_padding_mask(tiny_models, arch, monkeypatch):
    """Training drops the padding mask of right-padded batches (SDPA's causal kernel then skips the upper
    triangle): the loss and every LoRA gradient equal the masked path's. One row is longer than the tiny
    Gemma-3's sliding window (64), so its local layers build their own mask either way."""
    import kolora.loss as loss_module

    model, batch = padded_past_the_window(arch, tiny_models)
    results = []
    for drop in (True, False):
        monkeypatch.setattr(loss_module, "DROP_RIGHT_PADDING_MASK", drop)
        results.append(loss_and_lora_grads(model, batch))
    assert_same_loss_and_grads(*results)


def test_train_attention_keeps_the_models_own_unless_set():
    from kolora.device import resolve_attention
    from kolora.errors import KoloraError

    cfg = RunConfig()
    assert resolve_attention(cfg)[0] is None
    for impl in ("sdpa", "eager"):
        cfg.train.attention = impl
        assert resolve_attention(cfg)[0] == impl
    cfg.train.attention = "flash"
    with pytest.raises(KoloraError, match="train.attention"):
        resolve_attention(cfg)


@pytest.mark.parametrize("arch", ARCHS)
def test_eager_attention_set_on_the_lora_model_gives_the_sdpa_losses_and_gradients(tiny_models, arch):
    """train.attention switches the LoRA-wrapped model's attention (as training does, after attach_lora):
    the answer loss and the LoRA gradients are those of SDPA, padded rows and Gemma's sliding window included."""
    model, batch = padded_past_the_window(arch, tiny_models)
    results = []
    for impl in ("sdpa", "eager"):
        model.set_attn_implementation(impl)
        assert model.get_base_model().config._attn_implementation == impl
        results.append(loss_and_lora_grads(model, batch))
    assert_same_loss_and_grads(*results)
