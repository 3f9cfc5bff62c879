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


def test_without_clipping_a_nan_gradient_is_still_caught():
    t = stepper("no", max_grad_norm=0)
    before = weights(t)
    loss = backward(t)
    t.params[0].grad[0, 0] = float("nan")  # a finite loss, a NaN gradient
    norm, finite = tr.apply_update(t, loss, Bar())
    assert not finite and norm is not None and math.isnan(norm)
    assert all((a == b).all() for a, b in zip(before, weights(t)))
    assert t.state["skipped_steps"] == 1


def test_without_clipping_gradients_are_not_clipped():
    import torch

    t = stepper("no", max_grad_norm=0)
    backward(t)
    t.params[0].grad.mul_(1e3)  # far above any clipping norm
    grads = [p.grad.clone() for p in t.params]
    expected = float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])))
    seen = {}
    t.optimizer.step = lambda *a, **k: seen.setdefault("grads", [p.grad.clone() for p in t.params])
    norm, finite = tr.apply_update(t, 1.0, Bar())
    assert finite and norm == pytest.approx(expected, rel=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(grads, seen["grads"]))


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


# --------------------------------------------------------------------------- the best adapter
def tiny_config(model: Path, data: Path, out: Path, **train) -> RunConfig:
    cfg = RunConfig()
    values = {"model.name": str(model), "data.path": str(data), "data.max_length": 512, "lora.r": 4, "lora.alpha": 8,
              "train.output_dir": str(out), "train.batch_size": 4, "train.grad_accum": 1, "train.lr": 3e-3,
              "train.eval_every": 1, "train.save_every": 0, "train.log_every": 1, "train.tensorboard": False,
              "train.health_check": 0, "train.mixed_precision": "no", "train.compile": "false", **train}
    for key, value in values.items():
        cfg.set(key, value)
    return cfg


@pytest.mark.parametrize("how", ["early stopping", "last eval worse"])
def test_adapter_holds_the_best_weights_not_the_last(how, tiny_models, small_csv, tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file

    # validation losses: step 0 (the base), 1 (the best), 2, 3 (worse twice: patience 2 stops at 3), final
    losses = iter([3.0, 2.0, 2.5, 2.6, 2.6])
    monkeypatch.setattr(tr.Trainer, "held_out_loss",
                        lambda self, split: next(losses) if split == "validation" else 1.0)
    extra = {"train.max_steps": 6, "train.early_stopping_patience": 2} if how == "early stopping" else {
        "train.max_steps": 3}
    run = tr.train(tiny_config(tiny_models["llama"], small_csv, tmp_path / "run", **extra))
    out = capsys.readouterr().out
    names = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert names == ["step-000001", "step-000003"]  # the best is saved when found, though save_every is 0
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    best = load_file(run / "checkpoints" / "step-000001" / "adapter" / "adapter_model.safetensors")
    last = load_file(run / "checkpoints" / "step-000003" / "adapter" / "adapter_model.safetensors")
    assert all((adapter[k] == best[k]).all() for k in best)
    assert any((adapter[k] != last[k]).any() for k in last)
    summary = json.loads((run / "run.json").read_text())["summary"]
    assert summary["adapter_from"] == {"checkpoint": "step-000001", "step": 1, "val_loss": 2.0, "last_val_loss": 2.6}
    assert "best validation loss (step 1" in out
