"""Speed / memory levers tried on kolora without editing src/: each is a small patch of one
kolora function or constant, applied before `kolora train` runs (see patched_kolora.py).

    python bench/experiments/patched_kolora.py LEVER[,LEVER…] -- train --config … (kolora train flags)

Levers that are plain config flags or environment variables (threads, dtype, batch shape,
gradient checkpointing, allocator) need no patch; bench/experiments/sweep.py lists them all."""

from __future__ import annotations


def _pad_multiple(n: int):
    def patch():
        import kolora.train as t

        # collate's `multiple` default was bound when the function was defined
        t.collate.__defaults__ = (n,)
        t.PAD_MULTIPLE = n
    return patch


def _row_multiple(n: int):
    def patch():
        import kolora.train as t

        t.ROW_MULTIPLE = n
    return patch


def _fused_head_ce(chunk_rows: int = 256):
    """Output layer + cross entropy in row chunks, gradient w.r.t. the hidden states computed in
    the forward pass (the head is frozen: no weight gradient), so the (rows × vocab) logits
    never exist all at once and nothing vocab-sized is kept for backward. Same FLOPs as the
    unchunked head."""

    def patch():
        import torch

        import kolora.train as t
        from kolora.prompt import IGNORE

        class HeadCE(torch.autograd.Function):
            @staticmethod
            def forward(ctx, h, weight, wanted, softcap):
                w = weight.detach()
                hw = h.detach().to(w.dtype)
                loss = torch.zeros((), dtype=torch.float32)
                grad_h = torch.empty_like(hw)
                for s in range(0, hw.shape[0], chunk_rows):
                    hc, wc = hw[s:s + chunk_rows], wanted[s:s + chunk_rows]
                    z = (hc @ w.t()).float()
                    th = None
                    if softcap:
                        th = torch.tanh(z / softcap)
                        z = th * softcap
                    lse = torch.logsumexp(z, dim=-1)
                    valid = wc != IGNORE
                    safe = torch.where(valid, wc, 0)
                    picked = z.gather(1, safe[:, None]).squeeze(1)
                    loss += ((lse - picked) * valid).sum()
                    g = z.sub_(lse[:, None]).exp_()  # softmax, in place: d loss / d logits = softmax - onehot
                    g[torch.arange(g.shape[0]), safe] -= 1
                    g *= valid[:, None]
                    if th is not None:
                        g *= 1 - th * th
                    grad_h[s:s + chunk_rows] = (g.to(w.dtype) @ w)
                ctx.save_for_backward(grad_h)
                ctx.h_dtype = h.dtype
                return loss

            @staticmethod
            def backward(ctx, grad_loss):
                (grad_h,) = ctx.saved_tensors
                return (grad_h * grad_loss).to(ctx.h_dtype), None, None, None

        original = t.answer_loss_module

        def answer_loss_module(peft_model):
            module = original(peft_model)
            cls = type(module)

            def forward(self, input_ids, attention_mask, labels):
                hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
                targets = labels[:, 1:]
                keep = targets != IGNORE
                h, wanted = hidden[:, :-1][keep], targets[keep]
                return HeadCE.apply(h, self.head.weight, wanted, self.softcap), keep.sum()

            cls.forward = forward
            return module

        t.answer_loss_module = answer_loss_module
    return patch


def _compile(target: str):
    """torch.compile (inductor) of the backbone or of every decoder layer (regional)."""

    def patch():
        import torch

        import kolora.train as t

        original = t.answer_loss_module

        def answer_loss_module(peft_model):
            module = original(peft_model)
            if target == "backbone":
                module.backbone = torch.compile(module.backbone, dynamic=True)
            else:
                for layer in module.backbone.layers:
                    layer.compile(dynamic=True)
            return module

        t.answer_loss_module = answer_loss_module
    return patch


def _mkldnn_off():
    import torch

    torch.backends.mkldnn.enabled = False


def _no_tf32_like_bf16_fp32_matmul():
    """fp32 matmuls allowed to run in bf16 on oneDNN (only matters for float32 runs)."""
    import torch

    torch.backends.mkldnn.matmul.fp32_precision = "bf16"


def _sdpa_math():
    """Attention through the math path instead of the flash CPU kernel."""
    import torch

    torch.backends.cuda.enable_flash_sdp(False)  # has no effect on CPU; kept for symmetry
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sdpa_kernel(SDPBackend.MATH).__enter__()


LEVERS = {
    "pad1": _pad_multiple(1),
    "pad8": _pad_multiple(8),
    "pad64": _pad_multiple(64),
    "row1": _row_multiple(1),
    "row256": _row_multiple(256),
    "fused-head-ce": _fused_head_ce(256),
    "fused-head-ce-64": _fused_head_ce(64),
    "compile-backbone": _compile("backbone"),
    "compile-layers": _compile("layers"),
    "mkldnn-off": _mkldnn_off,
    "fp32-matmul-as-bf16": _no_tf32_like_bf16_fp32_matmul,
    "sdpa-math": _sdpa_math,
}


def apply(names: str) -> None:
    for name in [n for n in names.split(",") if n]:
        if name not in LEVERS:
            raise SystemExit(f"unknown lever {name!r}; known: {', '.join(LEVERS)}")
        LEVERS[name]()
