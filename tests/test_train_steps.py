"""One optimizer step at a time, in process: the fp16 grad scaler around a skipped step, the
NaN check without clipping, DeepSpeed's refusal of kolora's accumulation, and which weights
end up in adapter/ when the last validation loss is not the best."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from kolora import checkpoint as ckpt
from kolora import train as tr
from kolora.config import RunConfig
from kolora.errors import KoloraError


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state: each test here builds its own Accelerator."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


class Bar:
    def __init__(self):
        self.lines = []

    def write(self, text):
        self.lines.append(text)


def stepper(mixed_precision: str = "no", max_grad_norm: float = 1.0, max_nonfinite_steps: int = 2):
    """What apply_update reads of a Trainer, around a one-layer model prepared by a real Accelerator.
    fp16 on the CPU: accelerate makes no grad scaler there, so one is put in before `prepare`,
    exactly where accelerate puts its own on a GPU."""
    import torch
    from accelerate import Accelerator

    acc = Accelerator(mixed_precision=mixed_precision, cpu=True)
    if mixed_precision == "fp16":
        acc.scaler, acc.native_amp = torch.amp.GradScaler("cpu"), True
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    cfg = RunConfig()
    cfg.train.max_grad_norm, cfg.train.max_nonfinite_steps = max_grad_norm, max_nonfinite_steps
    events = []
    t = SimpleNamespace(cfg=cfg, accelerator=acc, optimizer=opt, params=list(model.parameters()),
                        scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), is_main=True,
                        run=SimpleNamespace(path=Path("run")), log=events.append, model=model, events=events,
                        state={"step": 0, "skipped_steps": 0})
    return t


def backward(t, poison: bool = False) -> float:
    import torch

    loss = t.model(torch.ones(3, 4)).pow(2).mean()
    t.accelerator.backward(loss)
    if poison:  # an fp16 overflow: one gradient entry is inf
        t.params[0].grad[0, 0] = float("inf")
    return float(loss.detach())


def weights(t):
    return [p.detach().clone() for p in t.params]


def test_fp16_overflow_is_skipped_by_the_scaler_and_the_next_step_runs():
    t = stepper("fp16")
    scaler = t.accelerator.scaler
    scale = scaler.get_scale()
    before = weights(t)
    norm, finite = tr.apply_update(t, backward(t, poison=True), Bar())
    assert not finite and math.isinf(norm)
    assert all((a == b).all() for a, b in zip(before, weights(t)))  # no update
    assert scaler.get_scale() == scale / 2  # the scaler saw the overflow: update() ran
    assert t.state["skipped_steps"] == 1 and [e["kind"] for e in t.events] == ["skip"]
    t.state["step"] += 1
    # the next step: before the fix, unscale_() "has already been called on this optimizer"
    norm, finite = tr.apply_update(t, backward(t), Bar())
    assert finite and math.isfinite(norm)
    assert any((a != b).any() for a, b in zip(before, weights(t)))
    assert t.state["skipped_steps"] == 1


def test_fp16_overflows_do_not_stop_the_run_but_nan_losses_do():
    """The scaler's own overflows (it lowers the scale and retries) are counted, not fatal; a
    non-finite loss still counts towards train.max_nonfinite_steps."""
    t = stepper("fp16", max_nonfinite_steps=0)
    for _ in range(3):
        tr.apply_update(t, backward(t, poison=True), Bar())
        t.state["step"] += 1
    assert t.state["skipped_steps"] == 3
    with pytest.raises(KoloraError, match="not finite"):
        tr.apply_update(t, float("nan") * backward(t, poison=True), Bar())


def test_grad_scaler_state_is_saved_and_restored_with_the_checkpoint(tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x)

    def parts():
        torch.manual_seed(0)
        model = get_peft_model(Tiny(), LoraConfig(r=2, target_modules=["lin"]))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    model, opt, sched = parts()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.ones(1))  # the scale exists from the first scaled loss on
    scaler.update(new_scale=96.0)
    state = {"step": 3}
    ckpt.save(tmp_path, 3, adapter_model=model, optimizer=opt, scheduler=sched, state=state, fingerprints={},
              rng_by_rank=[ckpt.rng_state()], scaler=scaler)
    saved = json.loads((tmp_path / "step-000003" / "trainer_state.json").read_text())
    assert saved["grad_scaler"]["scale"] == 96.0  # JSON, no pickle
    model, opt, sched = parts()
    fresh = torch.amp.GradScaler("cpu", init_scale=1024.0)
    loaded, _ = ckpt.load(tmp_path / "step-000003", peft_model=model, optimizer=opt, scheduler=sched, rank=0,
                          scaler=fresh)
    assert fresh.get_scale() == 96.0 and "grad_scaler" not in loaded


# --------------------------------------------------------------------------- DeepSpeed
def test_deepspeed_refuses_kolora_accumulation(monkeypatch, tmp_path):
    import accelerate
    from accelerate.utils import DistributedType

    class FakeAccelerator:
        def __init__(self, **kwargs):
            self.distributed_type = DistributedType.DEEPSPEED
            self.is_main_process = True
            self.device = "cpu"
            self.num_processes = 2

    monkeypatch.setattr(accelerate, "Accelerator", FakeAccelerator)
    cfg = RunConfig()
    cfg.train.output_dir, cfg.train.grad_accum, cfg.train.mixed_precision = str(tmp_path / "run"), 4, "no"
    with pytest.raises(KoloraError) as e:
        tr.setup_run(cfg, None, False, False, None)
    line = e.value.one_line()
    assert "DeepSpeed" in line and "grad_accum 4" in line and "gradient_accumulation_steps" in line
    assert "\n" not in line
    cfg.train.grad_accum = 1  # DeepSpeed's own accumulation, kolora's off: accepted
    assert tr.setup_run(cfg, None, False, False, None).accelerator.distributed_type == DistributedType.DEEPSPEED
