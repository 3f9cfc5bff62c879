"""The loss: cross entropy over the answer tokens (and the EOS) only.

The output layer runs at answer positions only, in chunks, inside one autograd function
(`answer_loss_module`); validation, the test-split comparison and `kolora eval`'s perplexity
all go through the same module, so every loss kolora reports is the quantity it trained.
"""

from __future__ import annotations

from .batching import Tokenized, collate
from .device import autocast_for
from .prompt import IGNORE, encode_example

EVAL_BATCH_MIN = 8  # held-out losses are computed max(train.batch_size, 8) rows at a time


HEAD_CHUNK_ROWS = 256  # answer rows per output-layer chunk (measured on gemma3-270m: +28% tokens/s, same loss)


def ce_and_grad(z, target, scale, softcap: float | None, grad_out):
    """One chunk's cross entropy and its gradient w.r.t. the logits `z` (rows × vocabulary, the
    head's output dtype): returns the per-row CE in float32 and writes scale × (softmax − one-hot)
    (through the softcap's tanh) into `grad_out`, in z's dtype.

    Written as one function for torch.compile (`fused_ce`): inductor turns it into two reductions
    and one elementwise pass over z, computed in float32 without materialising it, and writes the
    gradient straight into the reused buffer; the eager loop in `_head_ce` makes about eight
    float32 passes, each a fresh vocabulary-sized allocation that the kernel must fault in.
    `grad_out` may be `z` itself: the gradient is computed from z whole before it is written."""
    import torch

    zf = z.float()
    if softcap:
        capped = torch.tanh(zf / softcap)
        zf = capped * softcap
    lse = torch.logsumexp(zf, dim=-1)
    ce = lse - zf.gather(1, target[:, None]).squeeze(1)
    onehot = torch.arange(zf.shape[1], device=zf.device)[None, :] == target[:, None]
    g = (torch.exp(zf - lse[:, None]) - onehot.float()) * scale[:, None]
    if softcap:
        g = g * (1 - capped * capped)
    grad_out.copy_(g)
    return ce


_FUSED: dict = {}


def fused_ce():
    """`ce_and_grad` compiled once per process (dynamic rows: the last chunk is shorter)."""
    import torch

    if "fn" not in _FUSED:
        _FUSED["fn"] = torch.compile(ce_and_grad, dynamic=True)
    return _FUSED["fn"]


def _head_ce():
    """Output layer + cross entropy over answer rows, in chunks, as one autograd function.

    The head is frozen, so its only gradient is the one w.r.t. the hidden states: computing it
    chunk by chunk in the forward pass means the (rows × vocabulary) logits never exist whole
    and nothing vocabulary-sized is kept for backward. Same FLOPs as the plain head + CE.
    With `fused` (training with compiled layers) each chunk's logits and then their gradient go
    into one buffer reused across chunks, and the CE + gradient run as one compiled function.
    Returns (Σ token_weight × CE, Σ CE); only the first has a gradient."""
    import torch

    class HeadCE(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h, weight, bias, wanted, softcap, token_weight, fused=None):
            h = h.detach().to(weight.dtype)
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            plain = torch.zeros((), dtype=torch.float32, device=h.device)
            grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
            fuse = fused is not None and grad_h is not None
            # fused: one buffer for each chunk's logits, then (written over them) their gradient
            z_buf = torch.empty(min(HEAD_CHUNK_ROWS, h.shape[0]), weight.shape[0], dtype=weight.dtype,
                                device=h.device) if fuse else None
            for s in range(0, h.shape[0], HEAD_CHUNK_ROWS):
                rows = slice(s, s + HEAD_CHUNK_ROWS)
                w = wanted[rows]
                valid = w != IGNORE
                target = torch.where(valid, w, 0)
                if fuse:
                    z = torch.mm(h[rows], weight.t(), out=z_buf[:w.shape[0]])
                    if bias is not None:
                        z += bias
                    scale = valid.float() if token_weight is None else valid * token_weight[rows]
                    ce = fused(z, target, scale, softcap, z) * valid
                    torch.mm(z, weight, out=grad_h[rows])
                else:
                    z = h[rows] @ weight.t()
                    if bias is not None:
                        z = z + bias
                    z = z.float()
                    capped = None
                    if softcap:
                        capped = torch.tanh(z / softcap)
                        z = capped * softcap
                    lse = torch.logsumexp(z, dim=-1)
                    ce = (lse - z.gather(1, target[:, None]).squeeze(1)) * valid
                    scale = valid if token_weight is None else valid * token_weight[rows]
                    if grad_h is not None:
                        g = z.sub_(lse[:, None]).exp_()  # softmax in place; d CE / d logits = softmax - onehot
                        g[torch.arange(g.shape[0], device=g.device), target] -= 1
                        g *= scale[:, None]
                        if capped is not None:
                            g *= 1 - capped * capped
                        grad_h[rows] = g.to(weight.dtype) @ weight
                plain += ce.sum()
                total += (ce * scale).sum()  # = plain without weights (ce is already 0 off the answer)
            if grad_h is not None:
                ctx.save_for_backward(grad_h)
            ctx.h_dtype = h.dtype
            ctx.mark_non_differentiable(plain)
            return total, plain

        @staticmethod
        def backward(ctx, grad_total, _grad_plain):
            (grad_h,) = ctx.saved_tensors
            return (grad_h * grad_total).to(ctx.h_dtype), None, None, None, None, None, None

    return HeadCE


DROP_RIGHT_PADDING_MASK = True  # bench lever `padding-mask` sets it False


def causal_mask_only(attention_mask):
    """None for a right-padded batch (every row's ones come first), else the mask unchanged.

    Why: with right padding every pad comes after every real token of its row, so the causal
    mask alone already keeps real tokens from attending to pads; the pads' own outputs are never
    scored (their labels are IGNORE) and cannot reach a real token. Without a mask, transformers
    calls SDPA with is_causal=True, and torch's CPU flash kernel then skips the blocks above the
    diagonal and reads no mask: attention was 42% of a SmolLM2 preset step (1,150-token rows)
    with the padding mask. Positions are the same either way (arange, as right padding has)."""
    if attention_mask is None or not DROP_RIGHT_PADDING_MASK:
        return attention_mask
    if attention_mask.shape[1] > 1 and bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()):
        return attention_mask  # a zero before a one: left or inner padding needs the mask
    return None


def answer_loss_module(peft_model, fused_head: bool = False):
    """Wrap the model so that forward returns (summed CE, answer-token count); with per-token
    `weights` (train.fact_weight) (weighted sum, count, plain sum) — the plain sum is what is logged.
    `fused_head` (training compiles its layers) computes the head's CE and gradient with one
    compiled function per chunk (`fused_ce`).

    The output layer runs only at answer positions, in chunks. For Gemma-3 (262k vocabulary)
    the full logits are most of the compute and memory of a step; the prompt positions' logits
    are never needed because their labels are ignored. Wrapping (instead of calling submodules
    from the loop) keeps DDP's gradient hooks on the path."""
    import torch

    head_ce = _head_ce()

    class AnswerLoss(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model
            causal = model.get_base_model() if hasattr(model, "get_base_model") else model
            self.backbone = getattr(causal, causal.base_model_prefix)
            self.head = causal.get_output_embeddings()
            self.softcap = getattr(causal.config, "final_logit_softcapping", None)
            weight = getattr(self.head, "weight", None)
            # A plain frozen (possibly tied) linear head; anything else (quantized, sharded)
            # goes through its own forward.
            self.chunked = (type(self.head) is torch.nn.Linear and weight is not None and weight.dim() == 2
                            and weight.is_floating_point() and not weight.requires_grad)
            self.fused = fused_ce() if fused_head and self.chunked else None

        def forward(self, input_ids, attention_mask, labels, weights=None, per_row=False):
            hidden = self.backbone(input_ids=input_ids, attention_mask=causal_mask_only(attention_mask),
                                   use_cache=False).last_hidden_state
            # position t predicts token t+1
            targets = labels[:, 1:]
            keep = targets != IGNORE
            if per_row:  # [(CE sum, answer tokens)] per row, unweighted (no gradient wanted)
                return [(self.cross_entropy(hidden[i, :-1][keep[i]], targets[i][keep[i]], None)[1], keep[i].sum())
                        for i in range(hidden.shape[0])]
            h, wanted = hidden[:, :-1][keep], targets[keep]
            token_weight = weights[:, 1:][keep].float() if weights is not None else None
            total, plain = self.cross_entropy(h, wanted, token_weight)
            if token_weight is None:
                return total, keep.sum()
            return total, keep.sum(), plain.detach()

        def cross_entropy(self, h, wanted, token_weight):
            """(Σ token_weight × CE, Σ CE) over the rows of `h` (answer positions only)."""
            if self.chunked:
                return head_ce.apply(h, self.head.weight, self.head.bias, wanted, self.softcap, token_weight, self.fused)
            logits = self.head(h).float()
            if self.softcap:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            ce = torch.nn.functional.cross_entropy(logits, wanted, reduction="none")
            plain = ce.sum()
            return ((ce * token_weight).sum() if token_weight is not None else plain), plain

    return AnswerLoss(peft_model)


def evaluate_loss(loss_model, data: list[Tokenized], pad_id: int, batch_size: int, autocast) -> float:
    """Mean answer-token cross entropy over `data` (token-weighted)."""
    import torch

    if not data:
        return float("nan")
    was_training = loss_model.training
    loss_model.eval()
    total, count = 0.0, 0
    device = next(loss_model.parameters()).device  # the model may be on a GPU
    order = sorted(range(len(data)), key=lambda i: len(data[i].input_ids))
    with torch.no_grad(), autocast():
        for start in range(0, len(order), batch_size):
            batch = collate([data[i] for i in order[start:start + batch_size]], pad_id, device=device)
            loss_sum, n = loss_model(**batch)
            total += float(loss_sum)
            count += int(n)
    loss_model.train(was_training)
    return total / max(count, 1)


def answer_losses(model, tokenizer, cfg, examples, progress=None,
                  batch_size: int = EVAL_BATCH_MIN) -> list[tuple[float, int]]:
    """Teacher-forced (summed CE, token count) over each answer + EOS, per example, computed
    `batch_size` rows at a time in length order (right padding leaves every row's causal
    attention unchanged; the output layer runs on answer positions only)."""
    import torch

    loss_model = answer_loss_module(model)
    encoded = [Tokenized(*encode_example(tokenizer, ex, cfg.data.system_prompt, cfg.data.template))
               for ex in examples]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    out: list = [None] * len(encoded)
    device = next(model.parameters()).device
    with torch.no_grad(), autocast_for(model):
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = collate([encoded[i] for i in rows], tokenizer.pad_token_id, device=device)
            for i, (loss_sum, n) in zip(rows, loss_model(**batch, per_row=True)):
                out[i] = (float(loss_sum), int(n))
            if progress:
                progress.update(len(rows))
    return out
