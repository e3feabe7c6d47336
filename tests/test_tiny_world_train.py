"""Tests of the stage runner of ``pipeline.tiny_world.train``: learning-rate schedules equal to the
hand-written cosine they replaced (after a resume too), checkpoints, log lines, lazy tqdm."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pipeline.tiny_world import train as train_module
from pipeline.tiny_world.train import (
    Losses,
    Progress,
    Stage,
    TrainConfig,
    lr_schedules,
    run_stage,
    smoke_config,
)


def old_cosine(step: int, total: int, peak: float, floor: float, warmup: int) -> float:
    """The learning rate train.py assigned by hand before ``LambdaLR`` (the reference)."""
    warm = min(1.0, (step + 1) / warmup)
    frac = step / max(1, total)
    return peak * warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac)))


def old_parameters(cfg: TrainConfig) -> dict[str, tuple[int, float, float, int]]:
    """``(total, peak, floor, warmup)`` each stage passed to ``old_cosine``."""
    return {
        "ae": (cfg.ae_steps, cfg.ae_lr, 0.05, 100),
        "dyn": (cfg.dyn_steps, cfg.dyn_lr, 0.1, 50),
        "distill": (cfg.distill_steps, cfg.distill_lr, 0.1, 20),
        "refine": (cfg.refine_steps, cfg.refine_lr, 0.1, 20),
        "gate": (cfg.gate_steps, cfg.gate_lr, 0.1, 1),
        "decoder": (cfg.decoder_finetune_steps, cfg.decoder_finetune_lr, 0.05, 50),
    }


STAGES = ("ae", "dyn", "distill", "refine", "gate", "decoder")


@pytest.fixture(autouse=True)
def _keep_thread_count() -> Iterator[None]:
    """The runner's thread tuner sets the process-wide thread count; restore it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


class Interrupted(Exception):
    pass


class RecordingStep:
    """A stage step that records the learning rate it runs at, and can fail at one step."""

    def __init__(self, opt: torch.optim.Optimizer, fail_at: int | None = None) -> None:
        self.opt = opt
        self.fail_at = fail_at
        self.lrs: dict[int, float] = {}
        self.order: list[int] = []

    def __call__(self, step: int) -> Losses:
        if step == self.fail_at:
            raise Interrupted
        self.lrs[step] = self.opt.param_groups[0]["lr"]
        self.order.append(step)
        self.opt.step()  # no gradients: changes nothing, but the scheduler expects it
        return {"loss": torch.tensor(1.0 / (step + 1))}


def replace_out(cfg: TrainConfig, out: Path) -> TrainConfig:
    out.mkdir(parents=True, exist_ok=True)
    return replace(cfg, out=out)


def _stage(cfg: TrainConfig, name: str) -> Stage:
    schedule = lr_schedules(cfg)[name]
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=schedule.peak)
    return Stage(name, {"model": model}, opt, schedule)


@pytest.mark.parametrize("kind", ["default", "smoke"])
@pytest.mark.parametrize("name", STAGES)
def test_stage_lr_matches_old_cosine_across_resume(tmp_path: Path, kind: str, name: str) -> None:
    cfg = TrainConfig(out=tmp_path) if kind == "default" else smoke_config(tmp_path)
    cfg.max_threads = 1
    total, peak, floor, warmup = old_parameters(cfg)[name]
    log = train_module.RunLog(tmp_path / "log.jsonl")

    # Uninterrupted.
    full_cfg = replace_out(cfg, tmp_path / "full")
    stage = _stage(full_cfg, name)
    assert stage.steps == total
    full = RecordingStep(stage.optimizer)
    run_stage(stage, stage.resume(full_cfg.out, torch.device("cpu")), full, full_cfg, log)
    assert full.order == list(range(total))
    for step, lr in full.lrs.items():
        assert math.isclose(lr, old_cosine(step, total, peak, floor, warmup), rel_tol=1e-12), step

    # Interrupted past a checkpoint, then resumed by a fresh stage (new module, optimiser, scheduler).
    cut = total - 1
    run_cfg = replace_out(cfg, tmp_path / "cut")
    out = run_cfg.out
    stage = _stage(run_cfg, name)
    first = RecordingStep(stage.optimizer, fail_at=cut)
    with pytest.raises(Interrupted):
        run_stage(stage, stage.resume(out, torch.device("cpu")), first, run_cfg, log)
    stage = _stage(run_cfg, name)
    start = stage.resume(out, torch.device("cpu"))
    assert start == cut // cfg.checkpoint_every * cfg.checkpoint_every
    second = RecordingStep(stage.optimizer)
    run_stage(stage, start, second, run_cfg, log)
    assert second.order == list(range(start, total))
    for step, lr in second.lrs.items():
        assert math.isclose(lr, old_cosine(step, total, peak, floor, warmup), rel_tol=1e-12), step
        assert math.isclose(lr, full.lrs[step], rel_tol=1e-12), step
    state = torch.load(out / f"{name}.ckpt")
    assert set(state) == {"model", "opt", "step"} and state["step"] == total


def test_run_stage_logs_validates_and_checkpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = replace_out(smoke_config(tmp_path), tmp_path)  # 6 ae steps, log every 2, checkpoints every 3
    stage = _stage(cfg, "ae")
    saved: list[int] = []
    monkeypatch.setattr(stage, "save", lambda out, done: saved.append(done))
    calls: list[int] = []
    step = RecordingStep(stage.optimizer)

    def validate() -> dict[str, float]:
        calls.append(len(step.order))
        return {"val_metric": 0.5}

    log = train_module.RunLog(tmp_path / "log.jsonl")
    run_stage(stage, 0, step, cfg, log, validate, val_every=4)
    records = [json.loads(line) for line in log.path.read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]
    assert calls == [4, 6]  # every val_every steps and at the end
    assert set(records[1]) == {"time", "stage", "threads", "step", "lr", "loss", "val_metric", "elapsed_s"}
    assert "val_metric" not in records[0]
    assert records[0]["loss"] == round(1 / 2, 5)  # the latest step's loss (step index 1)
    assert saved == [3, 6]


def test_smoothed_losses_are_an_ema() -> None:
    losses = train_module.LossLog(smooth=True)
    for value in (1.0, 0.0, 0.0):
        losses.add({"loss": torch.tensor(value)})
    assert losses.record() == {"loss_ema": round(0.95 * 0.95, 5)}
    plain = train_module.LossLog(smooth=False)
    plain.add({"loss": torch.tensor(0.25)})
    assert plain.record() == {"loss": 0.25}


@pytest.mark.slow
def test_smoke_training_resumes_with_the_same_lr_and_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every optimiser step of the real stages runs at the old learning rate, interrupted or not,
    and a run interrupted in the autoencoder, dynamics and decoder stages ends with the same weights."""
    lrs: list[float] = []
    adamw_step = torch.optim.AdamW.step

    def recording_step(self: torch.optim.AdamW, *args: object, **kwargs: object) -> object:
        lrs.append(self.param_groups[0]["lr"])
        return adamw_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    cfg = smoke_config(tmp_path / "full")
    cfg.max_threads = 1  # the thread count changes rounding
    reference = [
        old_cosine(step, total, peak, floor, warmup)
        for total, peak, floor, warmup in old_parameters(cfg).values()
        for step in range(total)
    ]
    train_module.train(cfg)
    assert lrs == pytest.approx(reference, rel=1e-12)

    save_atomic = train_module._save_atomic

    def interrupting_save(obj: object, path: Path) -> None:
        save_atomic(obj, path)
        if path.name in ("ae.ckpt", "dyn.ckpt", "decoder.ckpt") and obj["step"] == 3:  # type: ignore[index]
            raise Interrupted

    monkeypatch.setattr(train_module, "_save_atomic", interrupting_save)
    resumed = smoke_config(tmp_path / "resumed")
    resumed.max_threads = 1
    lrs.clear()
    for _ in range(4):
        try:
            train_module.train(resumed)
            break
        except Interrupted:
            continue
    assert lrs == pytest.approx(reference, rel=1e-12)  # checkpoints fell on the interruptions
    for name in STAGES:
        want = torch.load(cfg.out / f"{name}.ckpt")
        got = torch.load(resumed.out / f"{name}.ckpt")
        assert got["step"] == want["step"]
        for key in set(want) - {"opt", "step"}:
            for k, v in want[key].items():
                torch.testing.assert_close(got[key][k], v, rtol=0, atol=0)


def test_progress_bar_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    pipe = io.StringIO()
    monkeypatch.setattr(sys, "stderr", pipe)
    with Progress("quiet", 2) as progress:
        progress.advance({"loss": 0.5})
    assert progress.bar is None and pipe.getvalue() == ""

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with Progress("shown", 2) as progress:
        progress.advance({"loss": 0.5})
        progress.advance()
    assert "shown" in terminal.getvalue() and "2/2" in terminal.getvalue()


def test_train_module_works_without_tqdm() -> None:
    """tqdm is a training-only dependency: importing the module (and running off a terminal)
    must not need it. (``torch`` itself imports tqdm when it is installed, so it is blocked.)"""
    code = (
        "import sys; sys.modules['tqdm'] = None\n"
        "from pipeline.tiny_world.train import Progress\n"
        "with Progress('x', 1) as p: p.advance()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
