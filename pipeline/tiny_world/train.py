"""Train the tiny world model from scratch: autoencoder, dynamics, distillation, decoder, export.

    python -m pipeline.tiny_world.train --out runs/tiny_world

Stages (each resumable from its latest checkpoint in ``--out``; finished stages are skipped):

1. ``ae``: the conv autoencoder on random camera views of the training worlds.
2. ``latents``: encode random camera walks into normalised latent trajectories.
3. ``dyn``: the dynamics transformer with teacher forcing and context-noise augmentation
   (clean context frames are noised to a random small level, as ``finalize`` does at inference).
4. ``distill``: few-step distillation (the 2-step Euler sample must match an 8-step one).
5. ``refine``: a second distillation, from the distilled model: the 2-step sample must match its
   4-step one.
6. ``gate``: copy-gate calibration (the gate's parameters alone).
7. ``decoder``: decoder fine-tuning on latents the model generates (encoder frozen).
8. ``export``: fp16 safetensors + metadata JSON into ``--export-dir`` (the package by default).

The six optimisation stages (1, 3–7) share one loop, :func:`run_stage`: resume from the
checkpoint, learning-rate schedule (``LambdaLR``: linear warm-up times a cosine decay), thread
tuning, log lines, periodic validation and atomic checkpoints. Each stage supplies a
:class:`Stage` (its modules, optimiser and :class:`LRSchedule`) and a function running one step.

All randomness derives from ``--seed`` and the step number, so a resumed run continues as an
uninterrupted one (up to floating-point rounding when the thread count changes). bf16 autocast
is used on CPU and CUDA; CUDA is used when present; the dynamics step is ``torch.compile``-d
(``--no-compile`` to train eager). Progress goes to ``OUT/log.jsonl``, and to a tqdm bar when
stderr is a terminal (tqdm is imported only then: it is a training-only dependency).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR

from pipeline.errors import ConfigError
from pipeline.scheduler import FlowMatchEulerScheduler, FlowMatchEulerSchedulerConfig
from pipeline.tiny_world.env import (
    ACTION_DELTAS,
    STEP_PX,
    VIEW_PX,
    make_maps,
    sample_trajectories,
)
from pipeline.tiny_world.nets import (
    Autoencoder,
    AutoencoderConfig,
    DynamicsConfig,
    DynamicsTransformer,
)
from pipeline.tiny_world.weights import WEIGHTS_DIR, WeightsMeta, save_weights

TRAIN_WORLD_SEEDS_START = 0
"""Training worlds are seeds ``[0, num_worlds)``; evaluation uses seeds from ``EVAL_SEED_BASE``."""
EVAL_SEED_BASE = 1_000_000


@dataclass
class TrainConfig:
    """Hyperparameters of one training run."""

    out: Path = Path("runs/tiny_world")
    """Run directory: checkpoints, latents, ``log.jsonl``."""
    export_dir: Path | None = WEIGHTS_DIR
    """Where the final weights go (``None``: do not export)."""
    seed: int = 0
    """Root seed of every random choice."""
    num_worlds: int = 1024
    """Training worlds (seeds ``0..num_worlds-1``)."""
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    """Autoencoder architecture."""
    dynamics: DynamicsConfig = field(default_factory=lambda: DynamicsConfig(copy_gate=True))
    """Dynamics transformer architecture (with the copy gate: issue #16)."""
    ae_steps: int = 2400
    """Autoencoder optimiser steps (3000 before run v6, which needed the time for ``refine``; v5's
    validation PSNR was 27.40 dB at step 2500 and 27.52 at 3000)."""
    ae_batch: int = 64
    """Views per autoencoder step."""
    ae_lr: float = 2e-3
    """Peak autoencoder learning rate (cosine decay to 5 %)."""
    ae_latent_noise: float = 0.05
    """Gaussian noise added to latents before decoding in AE training (robust decoder)."""
    ae_grad_loss: float = 1.0
    """Weight of the image-gradient L1 loss (keeps edges and tree dots sharp)."""
    num_trajectories: int = 6144
    """Encoded camera walks for dynamics training."""
    trajectory_length: int = 16
    """Frames per encoded walk."""
    dyn_steps: int = 1400
    """Dynamics optimiser steps (2000 in run v6, 2600 before). Cut for run v8 so that the whole
    command stays under an hour on the slower days of the reference cores (~1.13 s per step
    there). v5's EMA validation loss at σ = 0.3 fell only from 0.2127
    to 0.2074 over its last 600 of 2600 steps."""
    dyn_batch: int = 32
    """Sequences per dynamics step."""
    dyn_frames: int = 8
    """Frames per training sequence (teacher forcing on frames 1..T-1)."""
    dyn_lr: float = 1e-3
    """Peak dynamics learning rate (cosine decay to 10 %)."""
    context_noise: float = 0.15
    """Context frames are noised to ``U(0, context_noise)`` (90 % of the time) in training."""
    ema_decay: float = 0.998
    """EMA of the dynamics weights (the EMA is exported)."""
    val_every: int = 800
    """Dynamics steps between validation losses of the EMA (and at the end). Each costs ~16 s on
    the reference cores."""
    compile: bool = True
    """``torch.compile`` the dynamics training step (fixed shapes: one graph). On the 2 reference
    cores a step is 10–20 % faster after ~40 s of compilation. The thread count is then fixed at
    ``max_threads``: every thread count is a separate compilation. Falls back to eager, with a
    log line, if compilation fails (no C++ compiler, say)."""
    distill_steps: int = 150
    """Few-step distillation steps after dynamics training (0: skip). 150 (was 400) keeps the
    whole command under an hour on the reference cores on a slow day (run v5, issue #16)."""
    distill_batch: int = 16
    """Sequences per distillation step."""
    distill_lr: float = 1e-4
    """Peak distillation learning rate."""
    distill_teacher_steps: int = 8
    """Euler steps of the teacher's samples."""
    distill_student_steps: int = 2
    """Euler steps the student is distilled for (``distill`` and ``refine``)."""
    refine_steps: int = 75
    """Steps of a second distillation after ``distill`` (0: skip; 150 in run v6, whose student's
    losses stopped falling within 75 steps): the distilled model, frozen, is
    the teacher at ``refine_teacher_steps``, and its copy learns to match that sample in
    ``distill_student_steps``. The distilled model is a much better teacher than the base model:
    in 64-step rollouts (v5's stages) the base model at 8 steps had sharpness 0.30 of real, the
    distilled one 0.55 at 4 steps and 0.74 at 8. Measured on v5's stages (issue #16): sharpness at
    2 steps 0.28 → 0.42, at 4 steps 0.56 → 0.62, following 100 %; revisit PSNR 1.0 dB lower (the
    model card). Tried alongside: the student's own 2-step samples as the context of both
    (on-policy) measured the same as real context (0.397 / 0.577 against 0.397 / 0.576, on v6's
    stages), and a teacher refreshed from the student every 50 steps collapsed (0.30 / 0.20)."""
    refine_teacher_steps: int = 4
    """Euler steps of the ``refine`` teacher (8: 0.44 at 2 steps but 0.50 at 4)."""
    refine_lr: float = 1e-4
    """Peak learning rate of ``refine`` (3e-4 measured the same: 0.43 / 0.61)."""
    gate_steps: int = 100
    """Copy-gate calibration steps after distillation (0: skip; models without the gate skip it).
    The gate alone is trained, on the flow-matching loss of teacher-forced walks: its sigmoid
    saturates as it nears the copy the data ask for under ``none``, and the shared training's
    gradient vanishes with it (v5 without this stage: g = 0.995-0.997, and an idle view that
    slowly softens). Adam's normalised steps keep moving it. Each step is one forward without
    gradients plus the 193-parameter gate."""
    gate_lr: float = 1e-2
    """Peak learning rate of copy-gate calibration."""
    decoder_finetune_steps: int = 800
    """Decoder fine-tuning steps on generated latents after dynamics training (0: skip)."""
    decoder_finetune_pairs: int = 2560
    """(generated latent, real frame) pairs made for decoder fine-tuning."""
    decoder_finetune_sampling_steps: int = 2
    """Euler steps used to generate those latents. 2, not the pipeline's 4: the blurrier 2-step
    latents teach the decoder more restoration (4-step pairs gave lower sharpness at 4 steps)."""
    decoder_finetune_context_noise: float = 0.05
    """Context noise of those rollouts (the pipeline's default)."""
    decoder_finetune_max_rollout: int = 12
    """Rollouts for decoder fine-tuning run 1..this many AR steps."""
    decoder_finetune_lr: float = 5e-4
    """Peak learning rate of decoder fine-tuning."""
    decoder_texture_loss: float = 2.0
    """Weight of the texture loss in decoder fine-tuning: L1 between the local Laplacian energy
    (mean ``|Laplacian|`` over 8×8 cells) of decoded and real frames. It asks for edges and tree
    dots of the right strength without asking where exactly they are, which plain reconstruction
    losses on uncertain generated latents average away (blur)."""
    checkpoint_every: int = 250
    """Steps between checkpoints (every stage)."""
    log_every: int = 50
    """Steps between log lines."""
    amp: bool = True
    """bf16 autocast."""
    max_threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    """Upper bound of intra-op threads; 1 or this many is chosen by measured speed (this many while
    the dynamics step is compiled)."""

    def __post_init__(self) -> None:
        if self.dyn_frames < 2 or self.dyn_frames > self.trajectory_length:
            raise ConfigError(
                f"dyn_frames must be in [2, trajectory_length={self.trajectory_length}], "
                f"got {self.dyn_frames}"
            )


def smoke_config(out: Path) -> TrainConfig:
    """A seconds-long configuration exercising every stage (tests, CI)."""
    return TrainConfig(
        out=out,
        export_dir=None,
        num_worlds=4,
        autoencoder=AutoencoderConfig(latent_channels=4, widths=(8, 8, 16)),
        dynamics=DynamicsConfig(latent_channels=4, d_model=32, layers=1, heads=2, window=2, copy_gate=True),
        ae_steps=6,
        ae_batch=8,
        num_trajectories=16,
        trajectory_length=6,
        dyn_steps=6,
        dyn_batch=4,
        dyn_frames=4,
        distill_steps=3,
        refine_steps=3,
        gate_steps=3,
        distill_batch=2,
        decoder_finetune_steps=4,
        decoder_finetune_pairs=8,
        decoder_finetune_max_rollout=3,
        val_every=4,
        compile=False,
        checkpoint_every=3,
        log_every=2,
    )


# ---------------------------------------------------------------------------- utilities


class RunLog:
    """Append-only JSONL log in the run directory."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, **record: Any) -> None:
        record = {"time": round(time.time(), 2), **record}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


class ThreadTuner:
    """Chooses the intra-op thread count by measured step time.

    Other processes often share these few cores; then several OpenMP threads wait on each other
    at every op and a step can get ten times slower, while one thread keeps its pace. Every
    ``period`` steps each option is timed for ``window`` steps and the fastest is kept. (Thread
    count changes floating-point reduction order, so a resumed run matches only up to rounding.)
    ``adaptive=False`` keeps ``max_threads``.
    """

    def __init__(self, max_threads: int, window: int = 5, period: int = 250, adaptive: bool = True) -> None:
        self.options = sorted({1, max(1, max_threads)}) if adaptive else [max(1, max_threads)]
        self.window = window
        self.period = period
        self.times: dict[int, float] = {}
        self.samples: list[float] = []
        self.since_probe = 0
        self.current = self.options[-1]
        torch.set_num_threads(self.current)

    def record(self, seconds: float) -> None:
        """Report the duration of the step just run; may switch the thread count."""
        self.samples.append(seconds)
        self.since_probe += 1
        if len(self.samples) < self.window:
            return
        self.times[self.current] = sorted(self.samples)[len(self.samples) // 2]
        self.samples = []
        if self.since_probe >= self.period:
            self.times, self.since_probe = {}, 0
        untried = [o for o in self.options if o not in self.times]
        nxt = untried[0] if untried else min(self.times, key=self.times.__getitem__)
        if nxt != self.current:
            self.current = nxt
            torch.set_num_threads(nxt)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _autocast(device: torch.device, enabled: bool) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _to_unit(frames: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` → float ``[N, 3, H, W]`` in ``[-1, 1]``."""
    x = torch.from_numpy(frames).to(device).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


class Progress:
    """A tqdm bar on stderr when it is a terminal; otherwise nothing (the log lines tell progress).

    tqdm is imported only here: it is a training-only dependency.
    """

    def __init__(self, desc: str, total: int, initial: int = 0) -> None:
        self.bar: Any = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(desc=desc, total=total, initial=initial)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

    def advance(self, postfix: Mapping[str, float] | None = None) -> None:
        """One more step done; ``postfix``: values to show next to the bar from now on."""
        if self.bar is None:
            return
        if postfix:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
        self.bar.update()


# ---------------------------------------------------------------------------- stage runner


@dataclass
class LRSchedule:
    """Learning rate ``peak × factor(step)``: a linear warm-up over ``warmup`` steps times a half
    cosine from 1 at step 0 to ``floor`` at step ``steps``. A function of the step alone, so a
    resumed stage recomputes it (checkpoints hold no scheduler state)."""

    peak: float
    steps: int
    floor: float
    warmup: int

    def __call__(self, step: int) -> float:
        """The factor of ``peak`` at ``step`` (the ``LambdaLR`` lambda)."""
        warm = min(1.0, (step + 1) / self.warmup)
        frac = step / max(1, self.steps)
        return warm * (self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * frac)))

    def attach(self, opt: torch.optim.Optimizer, start: int) -> LambdaLR:
        """A scheduler setting the learning rates of ``opt`` for step ``start`` (then, after each
        ``step()``, for the next step)."""
        for group in opt.param_groups:
            group["initial_lr"] = self.peak
        return LambdaLR(opt, self, last_epoch=start - 1)


def lr_schedules(cfg: TrainConfig) -> dict[str, LRSchedule]:
    """The learning-rate schedule of each optimisation stage, by stage name."""
    return {
        "ae": LRSchedule(cfg.ae_lr, cfg.ae_steps, floor=0.05, warmup=100),
        "dyn": LRSchedule(cfg.dyn_lr, cfg.dyn_steps, floor=0.1, warmup=50),
        "distill": LRSchedule(cfg.distill_lr, cfg.distill_steps, floor=0.1, warmup=20),
        "refine": LRSchedule(cfg.refine_lr, cfg.refine_steps, floor=0.1, warmup=20),
        "gate": LRSchedule(cfg.gate_lr, cfg.gate_steps, floor=0.1, warmup=1),
        "decoder": LRSchedule(cfg.decoder_finetune_lr, cfg.decoder_finetune_steps, floor=0.05, warmup=50),
    }


Losses = Mapping[str, torch.Tensor | float]
"""Scalar losses of one step by name (tensors are read only when logged)."""
StepFn = Callable[[int], Losses]
"""Runs optimiser step ``i`` of a stage (batch, loss, backward, update) and returns its losses."""
ValidateFn = Callable[[], dict[str, float]]
"""Validation metrics of a stage's model, rounded as they go to the log."""


@dataclass
class Stage:
    """What one optimisation stage brings to :func:`run_stage`; the loop itself is shared."""

    name: str
    """``stage`` of its log records; its checkpoint is ``OUT/<name>.ckpt``."""
    modules: dict[str, torch.nn.Module]
    """Modules saved in (and restored from) its checkpoint, by key."""
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    smooth_losses: bool = False
    """Log an EMA of each loss (as ``<name>_ema``) instead of the step's value."""
    adaptive_threads: bool = True
    """Let :class:`ThreadTuner` choose the thread count (else keep ``max_threads``)."""

    @property
    def steps(self) -> int:
        return self.schedule.steps

    def checkpoint(self, out: Path) -> Path:
        return out / f"{self.name}.ckpt"

    def resume(self, out: Path, device: torch.device) -> int:
        """Load the latest checkpoint, if any, into the modules and optimiser; the next step."""
        path = self.checkpoint(out)
        if not path.exists():
            return 0
        state = torch.load(path, map_location=device)
        for key, module in self.modules.items():
            module.load_state_dict(state[key])
        self.optimizer.load_state_dict(state["opt"])
        return int(state["step"])

    def save(self, out: Path, done: int) -> None:
        state = {key: module.state_dict() for key, module in self.modules.items()}
        _save_atomic({**state, "opt": self.optimizer.state_dict(), "step": done}, self.checkpoint(out))


class LossLog:
    """The losses a stage logs: the latest step's, or (``smooth``) an EMA over the steps run."""

    def __init__(self, smooth: bool) -> None:
        self.smooth = smooth
        self.latest: Losses = {}
        self.ema: dict[str, float] = {}

    def add(self, losses: Losses) -> None:
        self.latest = losses
        if self.smooth:
            for key, value in losses.items():
                x = float(value)
                self.ema[key] = x if key not in self.ema else 0.95 * self.ema[key] + 0.05 * x

    def record(self) -> dict[str, float]:
        if self.smooth:
            return {f"{key}_ema": round(v, 5) for key, v in self.ema.items()}
        return {key: round(float(v), 5) for key, v in self.latest.items()}


def run_stage(
    stage: Stage,
    start: int,
    step: StepFn,
    cfg: TrainConfig,
    log: RunLog,
    validate: ValidateFn | None = None,
    val_every: int = 0,
) -> None:
    """Run steps ``start..stage.steps-1`` of ``stage`` (``start`` from :meth:`Stage.resume`).

    ``step(i)`` runs step ``i`` at the learning rate the schedule sets for it. Every ``log_every``
    steps and at the end: a log line (learning rate, losses, thread count); every ``val_every``
    steps (if > 0) and at the end: ``validate``, whose metrics join that step's log line; every
    ``checkpoint_every`` steps and at the end: a checkpoint, saved before the scheduler moves on
    (so its optimiser state holds the learning rate of its last step, as before the runner).
    """
    scheduler = stage.schedule.attach(stage.optimizer, start)
    tuner = ThreadTuner(cfg.max_threads, adaptive=stage.adaptive_threads)
    losses = LossLog(stage.smooth_losses)
    t0 = time.time()
    with Progress(stage.name, stage.steps, start) as progress:
        for i in range(start, stage.steps):
            t_step = time.perf_counter()
            losses.add(step(i))
            tuner.record(time.perf_counter() - t_step)
            done = i + 1
            last = done == stage.steps
            due = last or (val_every > 0 and done % val_every == 0)
            run_validation = validate if validate is not None and due else None
            record: dict[str, float] = {}
            if done % cfg.log_every == 0 or last or run_validation is not None:
                record = {"lr": round(float(scheduler.get_last_lr()[0]), 7), **losses.record()}
                if run_validation is not None:
                    record.update(run_validation())
                elapsed = round(time.time() - t0, 1)
                log.write(stage=stage.name, threads=tuner.current, step=done, **record, elapsed_s=elapsed)
            if done % cfg.checkpoint_every == 0 or last:
                stage.save(cfg.out, done)
            scheduler.step()
            progress.advance(record)


def _descend(
    opt: torch.optim.Optimizer, loss: torch.Tensor, clip: Iterable[torch.Tensor] | None = None
) -> None:
    """One optimiser step on ``loss`` (gradient norm of ``clip`` clipped to 1 first, if given)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip, 1.0)
    opt.step()


# ---------------------------------------------------------------------------- stage 1: AE


def _ae_batch(maps: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    frames, _ = sample_trajectories(maps, n, 1, rng)
    return frames[:, 0]


def _grad_l1(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    dy = (y[..., 1:, :] - y[..., :-1, :]) - (x[..., 1:, :] - x[..., :-1, :])
    dx = (y[..., 1:] - y[..., :-1]) - (x[..., 1:] - x[..., :-1])
    return dy.abs().mean() + dx.abs().mean()


def train_autoencoder(cfg: TrainConfig, maps: np.ndarray, log: RunLog) -> Autoencoder:
    device = _device()
    torch.manual_seed(cfg.seed)
    ae = Autoencoder(cfg.autoencoder).to(device)
    schedule = lr_schedules(cfg)["ae"]
    opt = torch.optim.AdamW(ae.parameters(), lr=schedule.peak, weight_decay=0.0)
    stage = Stage("ae", {"model": ae}, opt, schedule)
    start = stage.resume(cfg.out, device)
    if start < stage.steps:
        x_val = _to_unit(_ae_batch(maps, 128, np.random.default_rng([cfg.seed, 1, 0])), device)
        step = partial(_ae_step, cfg, maps, ae, opt)
        validate = partial(_ae_validate, ae, x_val, cfg.amp)
        run_stage(stage, start, step, cfg, log, validate, val_every=cfg.log_every)
    return ae.eval()


def _ae_step(
    cfg: TrainConfig, maps: np.ndarray, ae: Autoencoder, opt: torch.optim.Optimizer, step: int
) -> Losses:
    device = _device()
    rng = np.random.default_rng([cfg.seed, 1, step + 1])
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 7919 + step)
    x = _to_unit(_ae_batch(maps, cfg.ae_batch, rng), device)
    with _autocast(device, cfg.amp):
        z = ae.encode(x)
        noise = torch.randn(z.shape, generator=gen, device=device)
        y = ae.decode(z + cfg.ae_latent_noise * noise.to(z.dtype))
    y, z = y.float(), z.float()
    loss = (
        (y - x).abs().mean()
        + (y - x).pow(2).mean()
        + cfg.ae_grad_loss * _grad_l1(y, x)
        + 1e-3 * z.pow(2).mean()
    )
    _descend(opt, loss)
    return {"loss": loss.detach()}


@torch.no_grad()
def _ae_validate(ae: Autoencoder, x_val: torch.Tensor, amp: bool) -> dict[str, float]:
    """PSNR of the reconstructions of ``x_val`` (the autoencoder stays in its training mode)."""
    with _autocast(x_val.device, amp):
        mse = (ae.decode(ae.encode(x_val)).float().clamp(-1, 1) - x_val).pow(2).mean().item()
    return {"val_psnr": round(10 * math.log10(4.0 / max(mse, 1e-10)), 3)}


# ---------------------------------------------------------------------------- stage 2: latents


@torch.no_grad()
def encode_trajectories(
    cfg: TrainConfig, maps: np.ndarray, ae: Autoencoder, log: RunLog
) -> dict[str, torch.Tensor]:
    """Normalised latent walks ``lat [N, T, C, S, S]``, actions ``[N, T]``, mean/std ``[C]``."""
    path = cfg.out / "latents.pt"
    if path.exists():
        return torch.load(path)
    device = _device()
    rng = np.random.default_rng([cfg.seed, 2])
    n, t = cfg.num_trajectories, cfg.trajectory_length
    c, s = cfg.autoencoder.latent_channels, cfg.dynamics.latent_size
    lat = torch.empty(n, t, c, s, s)
    acts = torch.empty(n, t, dtype=torch.long)
    chunk = 64
    with Progress("encode", -(-n // chunk)) as progress:
        for i in range(0, n, chunk):
            m = min(chunk, n - i)
            frames, a = sample_trajectories(maps, m, t, rng)
            x = _to_unit(frames.reshape(-1, *frames.shape[2:]), device)
            with _autocast(device, cfg.amp):
                z = ae.encode(x).float().cpu()
            lat[i : i + m] = z.view(m, t, c, s, s)
            acts[i : i + m] = torch.from_numpy(a)
            progress.advance()
    mean = lat.mean(dim=(0, 1, 3, 4))
    std = lat.std(dim=(0, 1, 3, 4)).clamp_min(1e-4)
    lat = (lat - mean[:, None, None]) / std[:, None, None]
    out = {"lat": lat, "acts": acts, "mean": mean, "std": std}
    _save_atomic(out, path)
    log.write(stage="latents", trajectories=n, mean=mean.tolist(), std=std.tolist())
    return out


# ---------------------------------------------------------------------------- stage 3: dynamics


def _sample_sigma(n: int, gen: torch.Generator) -> torch.Tensor:
    """70 % logit-normal, 30 % uniform noise levels."""
    logit_normal = torch.sigmoid(torch.randn(n, generator=gen))
    uniform = torch.rand(n, generator=gen)
    return torch.where(torch.rand(n, generator=gen) < 0.7, logit_normal, uniform)


def _dyn_batch(
    data: dict[str, torch.Tensor], idx: torch.Tensor, frames: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    length = data["acts"].shape[1]
    start = torch.randint(0, length - frames + 1, (len(idx),), generator=gen)
    cols = start[:, None] + torch.arange(frames)[None]
    return data["lat"][idx[:, None], cols], data["acts"][idx[:, None], cols]


TrainForward = Callable[..., torch.Tensor]
""":meth:`DynamicsTransformer.forward_train` of a model, or its compiled version."""


def _context_sigma(b: int, t: int, gen: torch.Generator, context_noise: float) -> torch.Tensor:
    """Context noise levels ``[B, T]`` of teacher forcing: ``U(0, context_noise)`` 90 % of the
    time, else 0 (CPU generator)."""
    sigma = torch.rand(b, t, generator=gen) * context_noise
    return sigma * (torch.rand(b, t, generator=gen) < 0.9)


def dynamics_loss(
    forward: TrainForward,
    z: torch.Tensor,
    actions: torch.Tensor,
    mask: torch.Tensor,
    slots: torch.Tensor,
    gen: torch.Generator,
    context_noise: float,
    amp: bool,
    fixed_sigma: float | None = None,
) -> torch.Tensor:
    """Flow-matching MSE on frames 1..T-1 given (noised) clean context frames (CPU generator).

    ``forward``: a model's ``forward_train`` (or its compiled version). It also gets each frame's
    previous clean frame, which a model with the copy gate blends in and any other ignores.
    """
    b, t = z.shape[:2]
    device = z.device
    if fixed_sigma is None:
        sigma = _sample_sigma(b * (t - 1), gen).view(b, t - 1)
        ctx_sigma = _context_sigma(b, t, gen, context_noise)
    else:
        sigma = torch.full((b, t - 1), fixed_sigma)
        ctx_sigma = torch.zeros(b, t)
    eps = torch.randn(z.shape, generator=gen).to(device)
    eps_ctx = torch.randn(z.shape, generator=gen).to(device)
    sigma, ctx_sigma = sigma.to(device), ctx_sigma.to(device)
    x0 = z[:, 1:]
    s = sigma[..., None, None, None]
    sc = ctx_sigma[..., None, None, None]
    noisy = (1 - s) * x0 + s * eps[:, 1:]
    context = (1 - sc) * z + sc * eps_ctx
    with _autocast(device, amp):
        v = forward(context, ctx_sigma, noisy, sigma, actions, mask, slots, z[:, :-1])
    return (v.float() - (eps[:, 1:] - x0)).pow(2).mean()


def _compiled_train_forward(
    model: DynamicsTransformer,
    batch: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor,
    slots: torch.Tensor,
    cfg: TrainConfig,
    log: RunLog,
) -> TrainForward:
    """``model.forward_train`` compiled for the training shapes, or itself if compilation fails.

    Compiles by running one forward and backward on ``batch`` (the gradients are discarded), so
    the time goes to the log as ``compile_s`` and a failure surfaces here, not mid-run.
    """
    t0 = time.time()
    compiled: TrainForward = torch.compile(model.forward_train, dynamic=False)
    try:
        loss = dynamics_loss(
            compiled, *batch, mask, slots, torch.Generator().manual_seed(0), cfg.context_noise, cfg.amp
        )
        loss.backward()
    except Exception as exc:  # any compiler failure: the eager step computes the same thing
        log.write(stage="dyn", compile="failed, training eager", error=f"{type(exc).__name__}: {exc}"[:500])
        print(f"torch.compile failed ({type(exc).__name__}); training eager", file=sys.stderr)
        return model.forward_train
    finally:
        model.zero_grad(set_to_none=True)
    log.write(stage="dyn", compile="ok", compile_s=round(time.time() - t0, 1))
    return compiled


def train_dynamics(cfg: TrainConfig, data: dict[str, torch.Tensor], log: RunLog) -> DynamicsTransformer:
    device = _device()
    torch.manual_seed(cfg.seed + 1)
    model = DynamicsTransformer(cfg.dynamics).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    schedule = lr_schedules(cfg)["dyn"]
    opt = torch.optim.AdamW(model.parameters(), lr=schedule.peak, weight_decay=0.01, betas=(0.9, 0.99))
    modules: dict[str, torch.nn.Module] = {"model": model, "ema": ema}
    stage = Stage("dyn", modules, opt, schedule, smooth_losses=True, adaptive_threads=not cfg.compile)
    start = stage.resume(cfg.out, device)
    if start >= stage.steps:
        return ema.eval()
    n = data["acts"].shape[0]
    n_val = max(1, min(256, n // 16))
    mask, slots = model.training_mask(cfg.dyn_frames, device)
    val_gen = torch.Generator().manual_seed(cfg.seed + 2)
    val_z, val_a = _dyn_batch(data, torch.arange(n - n_val, n), cfg.dyn_frames, val_gen)
    forward: TrainForward = model.forward_train
    if cfg.compile:
        torch.set_num_threads(max(1, cfg.max_threads))  # the count the compiled step keeps
        probe_gen = torch.Generator().manual_seed(cfg.seed)
        pz, pa = _dyn_batch(data, torch.arange(cfg.dyn_batch) % (n - n_val), cfg.dyn_frames, probe_gen)
        forward = _compiled_train_forward(model, (pz.to(device), pa.to(device)), mask, slots, cfg, log)
    step = partial(_dynamics_step, cfg, data, n - n_val, forward, mask, slots, model, ema, opt)
    validate = partial(_dynamics_validate, ema, val_z.to(device), val_a.to(device), mask, slots, cfg.amp)
    run_stage(stage, start, step, cfg, log, validate, val_every=cfg.val_every)
    return ema.eval()


def _dynamics_step(
    cfg: TrainConfig,
    data: dict[str, torch.Tensor],
    n_train: int,
    forward: TrainForward,
    mask: torch.Tensor,
    slots: torch.Tensor,
    model: DynamicsTransformer,
    ema: DynamicsTransformer,
    opt: torch.optim.Optimizer,
    step: int,
) -> Losses:
    """One teacher-forced flow-matching step on walks ``[0, n_train)``, then the EMA update."""
    device = _device()
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    idx = torch.randint(0, n_train, (cfg.dyn_batch,), generator=gen)
    z, a = _dyn_batch(data, idx, cfg.dyn_frames, gen)
    z, a = z.to(device), a.to(device)
    loss = dynamics_loss(forward, z, a, mask, slots, gen, cfg.context_noise, cfg.amp)
    params: list[torch.Tensor] = list(model.parameters())
    _descend(opt, loss, clip=params)
    decay = min(cfg.ema_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        ema_params: list[torch.Tensor] = list(ema.parameters())
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    return {"loss": loss.detach()}


@torch.no_grad()
def _dynamics_validate(
    ema: DynamicsTransformer,
    val_z: torch.Tensor,
    val_a: torch.Tensor,
    mask: torch.Tensor,
    slots: torch.Tensor,
    amp: bool,
) -> dict[str, float]:
    """Flow-matching loss of the EMA on the held-out walks at fixed noise levels (clean context)."""
    record = {}
    for sig in (0.3, 0.7, 1.0):
        gen = torch.Generator().manual_seed(3)
        v = dynamics_loss(ema.forward_train, val_z, val_a, mask, slots, gen, 0.0, amp, sig)
        record[f"val_sigma{sig}"] = round(v.item(), 5)
    return record


# ---------------------------------------------------------------------------- stage 4: distillation


def _euler(
    model: DynamicsTransformer,
    context: torch.Tensor,
    ctx_sigma: torch.Tensor,
    noise: torch.Tensor,
    actions: torch.Tensor,
    mask: torch.Tensor,
    slots: torch.Tensor,
    sigmas: list[float],
    amp: bool,
    previous: torch.Tensor,
) -> torch.Tensor:
    """Euler-sample frames 1..T-1 (all at once, teacher-forced context) from ``noise``.

    The context's keys and values are computed once and shared by every step. ``previous``: the
    clean frames 0..T-2 (for the copy gate).
    """
    x = noise
    b, t1 = noise.shape[:2]
    with _autocast(noise.device, amp):
        kv = model.encode_context(context, ctx_sigma, actions, mask, slots)
    for sigma, sigma_next in itertools.pairwise(sigmas):
        level = torch.full((b, t1), sigma, device=noise.device)
        with _autocast(noise.device, amp):
            v = model.forward_noisy(kv, x, level, actions, mask, slots, previous).float()
        x = x + (sigma_next - sigma) * v
    return x


@dataclass(frozen=True)
class DistillPass:
    """What separates the two distillation stages, ``distill`` and ``refine``."""

    name: str
    """Stage name (log records, checkpoint, learning-rate schedule)."""
    steps: int
    """Optimiser steps (0: skip the stage)."""
    teacher_steps: int
    """Euler steps of the teacher's samples."""
    seed_offset: int
    """Added to each step's seed (past any step count), so the two stages draw different walks
    and noise."""


def distill_passes(cfg: TrainConfig) -> tuple[DistillPass, DistillPass]:
    """``distill`` then ``refine`` (see :attr:`TrainConfig.refine_steps`)."""
    return (
        DistillPass("distill", cfg.distill_steps, cfg.distill_teacher_steps, seed_offset=0),
        DistillPass("refine", cfg.refine_steps, cfg.refine_teacher_steps, seed_offset=1 << 24),
    )


def distill_dynamics(
    cfg: TrainConfig,
    data: dict[str, torch.Tensor],
    teacher: DynamicsTransformer,
    log: RunLog,
    spec: DistillPass,
) -> DynamicsTransformer:
    """Few-step distillation: the student's ``distill_student_steps``-step Euler sample must match
    the teacher's ``spec.teacher_steps``-step sample from the same noise and context.

    Flow matching with 2 Euler steps predicts close to the conditional mean where the future is
    uncertain (new terrain entering the view), which comes out flat; the many-step teacher samples
    real texture. The student starts from the teacher's weights.
    """
    device = _device()
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    teacher = teacher.eval().requires_grad_(False)
    schedule = lr_schedules(cfg)[spec.name]
    opt = torch.optim.AdamW(student.parameters(), lr=schedule.peak, weight_decay=0.0)
    stage = Stage(spec.name, {"model": student}, opt, schedule, smooth_losses=True)
    start = stage.resume(cfg.out, device)
    if start < stage.steps:
        mask, slots = student.training_mask(cfg.dyn_frames, device)
        sigmas = (_euler_sigmas(spec.teacher_steps), _euler_sigmas(cfg.distill_student_steps))
        step = partial(_distill_step, cfg, spec, data, teacher, student, opt, mask, slots, sigmas)
        run_stage(stage, start, step, cfg, log)
    return student.eval().requires_grad_(False)


def _distill_step(
    cfg: TrainConfig,
    spec: DistillPass,
    data: dict[str, torch.Tensor],
    teacher: DynamicsTransformer,
    student: DynamicsTransformer,
    opt: torch.optim.Optimizer,
    mask: torch.Tensor,
    slots: torch.Tensor,
    sigmas: tuple[list[float], list[float]],
    step: int,
) -> Losses:
    """``sigmas``: the teacher's and the student's Euler steps."""
    device = _device()
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_033 + spec.seed_offset + step)
    idx = torch.randint(0, data["acts"].shape[0], (cfg.distill_batch,), generator=gen)
    z, a = _dyn_batch(data, idx, cfg.dyn_frames, gen)
    b, t = z.shape[:2]
    ctx_sigma = _context_sigma(b, t, gen, cfg.context_noise)
    ctx_noise = torch.randn(z.shape, generator=gen)
    noise = torch.randn(z[:, 1:].shape, generator=gen)
    z, a, ctx_sigma, ctx_noise, noise = (x.to(device) for x in (z, a, ctx_sigma, ctx_noise, noise))
    sc = ctx_sigma[..., None, None, None]
    context = (1 - sc) * z + sc * ctx_noise
    previous = z[:, :-1]
    with torch.no_grad():
        target = _euler(teacher, context, ctx_sigma, noise, a, mask, slots, sigmas[0], cfg.amp, previous)
    sample = _euler(student, context, ctx_sigma, noise, a, mask, slots, sigmas[1], cfg.amp, previous)
    loss = (sample - target).pow(2).mean()
    _descend(opt, loss, clip=list(student.parameters()))
    return {"loss": loss.detach()}


def calibrate_gate(
    cfg: TrainConfig, data: dict[str, torch.Tensor], model: DynamicsTransformer, log: RunLog
) -> DynamicsTransformer:
    """Train the copy gate of ``model`` alone (see :attr:`TrainConfig.gate_steps`)."""
    device = _device()
    model = model.eval().requires_grad_(False)
    model.gate.requires_grad_(True)
    schedule = lr_schedules(cfg)["gate"]
    opt = torch.optim.AdamW(model.gate.parameters(), lr=schedule.peak, weight_decay=0.0)
    stage = Stage("gate", {"gate": model.gate}, opt, schedule)
    start = stage.resume(cfg.out, device)
    if start < stage.steps:
        mask, slots = model.training_mask(cfg.dyn_frames, device)
        run_stage(stage, start, partial(_gate_step, cfg, data, model, opt, mask, slots), cfg, log)
    return model.requires_grad_(False)


def _gate_step(
    cfg: TrainConfig,
    data: dict[str, torch.Tensor],
    model: DynamicsTransformer,
    opt: torch.optim.Optimizer,
    mask: torch.Tensor,
    slots: torch.Tensor,
    step: int,
) -> Losses:
    """``dynamics_loss`` with the transformer's velocity computed once, without gradients."""
    device = _device()
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_037 + step)
    idx = torch.randint(0, data["acts"].shape[0], (cfg.dyn_batch,), generator=gen)
    z, a = (x.to(device) for x in _dyn_batch(data, idx, cfg.dyn_frames, gen))
    b, t = z.shape[:2]
    sigma = _sample_sigma(b * (t - 1), gen).view(b, t - 1).to(device)
    ctx_sigma = _context_sigma(b, t, gen, cfg.context_noise).to(device)
    eps = torch.randn(z[:, 1:].shape, generator=gen).to(device)
    eps_ctx = torch.randn(z.shape, generator=gen).to(device)
    s, sc = sigma[..., None, None, None], ctx_sigma[..., None, None, None]
    noisy = (1 - s) * z[:, 1:] + s * eps
    context = (1 - sc) * z + sc * eps_ctx
    with torch.no_grad(), _autocast(device, cfg.amp):
        v_net = model.forward_train(context, ctx_sigma, noisy, sigma, a, mask, slots).float()
        cond = model.condition(sigma, a[:, 1:]).float()
    patch = model.patchify
    v = model.apply_copy_gate(patch(v_net), patch(noisy), sigma, cond, patch(z[:, :-1]))
    loss = (model.unpatchify(v) - (eps - z[:, 1:])).pow(2).mean()
    _descend(opt, loss)
    return {"loss": loss.detach()}


def _euler_sigmas(num_steps: int) -> list[float]:
    return FlowMatchEulerScheduler.make_sigmas(FlowMatchEulerSchedulerConfig(num_steps=num_steps))


# ---------------------------------------------------------------------------- stage 5: decoder


def _known_mask(actions: np.ndarray) -> np.ndarray:
    """Pixels of the last frame that stayed in view since the first, ``[N, 64, 64]`` float.

    ``actions [N, T]``: moves leading to frames ``1..T-1`` (column 0 is ignored). Those pixels were
    carried through the rollout by the model rather than invented.
    """
    steps = ACTION_DELTAS[actions[:, 1:]] * STEP_PX  # [N, T-1, 2]
    offsets = np.concatenate([np.zeros((len(actions), 1, 2), np.int64), steps.cumsum(1)], 1)
    last = offsets[:, -1]
    lo = offsets.max(1) - last  # first valid row/col in the last frame
    hi = offsets.min(1) + VIEW_PX - last  # one past the last valid row/col
    idx = np.arange(VIEW_PX)
    rows = (idx[None] >= lo[:, :1]) & (idx[None] < hi[:, :1])
    cols = (idx[None] >= lo[:, 1:]) & (idx[None] < hi[:, 1:])
    return (rows[:, :, None] & cols[:, None, :]).astype(np.float32)


@torch.no_grad()
def _generated_pairs(
    cfg: TrainConfig,
    maps: np.ndarray,
    ae: Autoencoder,
    dyn: DynamicsTransformer,
    stats: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """Latents the dynamics model generates in rollouts, sampled exactly as the pipeline does.

    Each chunk of walks starts from a real first frame (cache primed with ``window`` copies),
    runs 1..``decoder_finetune_max_rollout`` AR steps with Euler sampling and context noise, and
    keeps the last generated latent. Returns generated and real normalised latents
    ``[N, C, S, S]``, the real last frames ``[N, 64, 64, 3]`` and masks ``[N, 64, 64]`` of the
    pixels that stayed in view (the only ones whose ground truth the model could know).
    """
    device = _device()
    rng = np.random.default_rng([cfg.seed, 4])
    mean, std = stats["mean"].to(device)[:, None, None], stats["std"].to(device)[:, None, None]
    sigmas = _euler_sigmas(cfg.decoder_finetune_sampling_steps)
    ctx_sigma = cfg.decoder_finetune_context_noise
    gen_out, real_out, frames_out, masks_out = [], [], [], []
    chunk = 64
    with Progress("decoder pairs", -(-cfg.decoder_finetune_pairs // chunk)) as progress:
        for i in range(0, cfg.decoder_finetune_pairs, chunk):
            m = min(chunk, cfg.decoder_finetune_pairs - i)
            n = int(rng.integers(1, cfg.decoder_finetune_max_rollout + 1))
            frames, actions = sample_trajectories(maps, m, n + 1, rng)
            x = _to_unit(np.concatenate([frames[:, 0], frames[:, -1]]), device)
            z = ((ae.encode(x) - mean) / std).float()
            a = torch.from_numpy(actions).to(device)
            gen = torch.Generator(device=device).manual_seed(cfg.seed * 31 + i)
            tokens = _rollout(dyn, dyn.patchify(z[:m]), a, gen, sigmas, ctx_sigma)
            gen_out.append(dyn.unpatchify(tokens).cpu())
            real_out.append(z[m:].cpu())
            frames_out.append(frames[:, -1])
            masks_out.append(_known_mask(actions))
            progress.advance()
    return (
        torch.cat(gen_out),
        torch.cat(real_out),
        np.concatenate(frames_out),
        np.concatenate(masks_out),
    )


@torch.no_grad()
def _rollout(
    dyn: DynamicsTransformer,
    first: torch.Tensor,
    actions: torch.Tensor,
    gen: torch.Generator,
    sigmas: list[float],
    ctx_sigma: float,
) -> torch.Tensor:
    """Tokens of the last frame generated from ``first`` (tokens, ``window`` copies in the cache)
    by moves ``actions[:, 1:]``, as the pipeline samples: Euler steps, context noise ``ctx_sigma``."""
    m, device = len(first), first.device
    cache = dyn.new_cache(m, device, torch.float32)
    for _ in range(dyn.config.window):
        ctx = dyn.rotated_context(cache)
        zeros = torch.zeros(m, device=device)
        _, kvs = dyn.forward_frame(first, zeros, zeros.long(), ctx, cache.num_frames)
        cache.append_frame(kvs)
    tokens = first
    for t in range(1, actions.shape[1]):
        ctx = dyn.rotated_context(cache)
        x = torch.randn(first.shape, generator=gen, device=device)
        for sigma, sigma_next in itertools.pairwise(sigmas):
            level = torch.full((m,), sigma, device=device)
            v, _ = dyn.forward_frame(x, level, actions[:, t], ctx, cache.num_frames, tokens)
            x = x + (sigma_next - sigma) * v
        tokens = x
        noise = torch.randn(tokens.shape, generator=gen, device=device)
        noised = (1 - ctx_sigma) * tokens + ctx_sigma * noise
        level = torch.full((m,), ctx_sigma, device=device)
        _, kvs = dyn.forward_frame(noised, level, actions[:, t], ctx, cache.num_frames)
        cache.append_frame(kvs)
    return tokens


def _masked_recon_loss(
    y: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, grad_weight: float
) -> torch.Tensor:
    """L1 + L2 + image-gradient L1 over the pixels where ``mask [B, 1, H, W]`` is 1."""
    err = y - x
    denom = mask.sum() * 3 + 1e-6
    loss = ((err.abs() + err.pow(2)) * mask).sum() / denom
    my = mask[..., 1:, :] * mask[..., :-1, :]
    mx = mask[..., 1:] * mask[..., :-1]
    gy = (err[..., 1:, :] - err[..., :-1, :]).abs() * my
    gx = (err[..., 1:] - err[..., :-1]).abs() * mx
    grad = gy.sum() / (my.sum() * 3 + 1e-6) + gx.sum() / (mx.sum() * 3 + 1e-6)
    return loss + grad_weight * grad


_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def _texture_loss(y: torch.Tensor, x: torch.Tensor, cell: int = 8) -> torch.Tensor:
    """L1 between local Laplacian energies of ``y`` and ``x`` (``[B, 3, H, W]`` in [-1, 1])."""
    kernel = _LAPLACIAN.to(y.device, y.dtype).expand(3, 1, 3, 3)

    def energy(img: torch.Tensor) -> torch.Tensor:
        lap = F.conv2d(F.pad(img, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
        return F.avg_pool2d(lap.abs(), cell)

    return (energy(y) - energy(x)).abs().mean()


def finetune_decoder(
    cfg: TrainConfig,
    maps: np.ndarray,
    ae: Autoencoder,
    dyn: DynamicsTransformer,
    stats: dict[str, torch.Tensor],
    log: RunLog,
) -> Autoencoder:
    """Fine-tune the decoder (encoder frozen, so the latent space is unchanged) on latents the
    dynamics model generates, next to real ones, so generated frames decode as sharply as they can.
    """
    schedule = lr_schedules(cfg)["decoder"]
    opt = torch.optim.AdamW(ae.decoder.parameters(), lr=schedule.peak, weight_decay=0.0)
    stage = Stage("decoder", {"decoder": ae.decoder}, opt, schedule)
    start = stage.resume(cfg.out, _device())
    if start >= stage.steps:
        return ae.eval()
    gen_z, real_z, frames, masks = _generated_pairs(cfg, maps, ae, dyn, stats)
    mean, std = stats["mean"][:, None, None], stats["std"][:, None, None]
    pairs = (gen_z * std + mean, real_z * std + mean, frames, masks)
    ae.train()
    run_stage(stage, start, partial(_decoder_step, cfg, ae, opt, pairs), cfg, log)
    return ae.eval()


def _decoder_step(
    cfg: TrainConfig,
    ae: Autoencoder,
    opt: torch.optim.Optimizer,
    pairs: tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray],
    step: int,
) -> Losses:
    """Half the batch generated latents (loss on pixels that stayed in view), half real ones."""
    device = _device()
    gen_z, real_z, frames, masks = pairs
    half = cfg.ae_batch // 2
    gen = torch.Generator().manual_seed(cfg.seed * 7907 + step)
    idx = torch.randint(0, len(frames), (2 * half,), generator=gen)
    # Channels-last: the decoder's convolutions run ~2x faster on CPU (oneDNN's layout).
    z = torch.cat([gen_z[idx[:half]], real_z[idx[half:]]]).to(device, memory_format=torch.channels_last)
    x = _to_unit(frames[idx.numpy()], device)
    mask = torch.from_numpy(masks[idx[:half].numpy()])
    mask = torch.cat([mask, torch.ones(len(idx) - half, *mask.shape[1:])])[:, None].to(device)
    with _autocast(device, cfg.amp):
        y = ae.decode(z).float()
    loss = _masked_recon_loss(y, x, mask, cfg.ae_grad_loss)
    if cfg.decoder_texture_loss > 0:
        loss = loss + cfg.decoder_texture_loss * _texture_loss(y, x)
    _descend(opt, loss)
    return {"loss": loss.detach()}


# ---------------------------------------------------------------------------- driver


def train(cfg: TrainConfig) -> WeightsMeta:
    """Run (or resume) every stage; returns the exported metadata."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    log = RunLog(cfg.out / "log.jsonl")
    t_start = time.time()
    log.write(
        stage="start",
        config=json.loads(json.dumps(asdict(cfg), default=str)),
        device=str(_device()),
        threads=torch.get_num_threads(),
    )
    maps = make_maps(range(TRAIN_WORLD_SEEDS_START, TRAIN_WORLD_SEEDS_START + cfg.num_worlds))
    log.write(stage="maps", worlds=cfg.num_worlds, elapsed_s=round(time.time() - t_start, 1))
    ae = train_autoencoder(cfg, maps, log)
    data = encode_trajectories(cfg, maps, ae, log)
    dyn = train_dynamics(cfg, data, log)
    for spec in distill_passes(cfg):
        if spec.steps > 0:
            dyn = distill_dynamics(cfg, data, dyn, log, spec)
    if cfg.gate_steps > 0 and cfg.dynamics.copy_gate:
        dyn = calibrate_gate(cfg, data, dyn, log)
    if cfg.decoder_finetune_steps > 0:
        ae = finetune_decoder(cfg, maps, ae, dyn, data, log)
    del maps
    wall = time.time() - t_start
    meta = WeightsMeta(
        autoencoder=cfg.autoencoder,
        dynamics=cfg.dynamics,
        latent_mean=data["mean"].tolist(),
        latent_std=data["std"].tolist(),
        train_context_noise=cfg.context_noise,
        info={
            "command": " ".join(["python -m pipeline.tiny_world.train", *sys.argv[1:]]),
            "ae_steps": cfg.ae_steps,
            "dyn_steps": cfg.dyn_steps,
            "distill_steps": cfg.distill_steps,
            "refine_steps": cfg.refine_steps,
            "gate_steps": cfg.gate_steps,
            "decoder_finetune_steps": cfg.decoder_finetune_steps,
            "num_worlds": cfg.num_worlds,
            "num_trajectories": cfg.num_trajectories,
            "wall_time_s_this_invocation": round(wall, 1),
            "device": str(_device()),
            "torch": torch.__version__,
        },
    )
    if cfg.export_dir is not None:
        save_weights(cfg.export_dir, ae.float().cpu(), dyn.float().cpu(), meta)
        log.write(stage="export", directory=str(cfg.export_dir))
    save_weights(cfg.out / "weights", ae.float().cpu(), dyn.float().cpu(), meta)
    log.write(stage="done", wall_s=round(wall, 1))
    return meta


def _parse(argv: list[str] | None) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/tiny_world"), help="run directory")
    p.add_argument(
        "--export-dir",
        type=Path,
        default=None,
        help=f"where to write the final weights (default: {WEIGHTS_DIR}; none with --smoke)",
    )
    p.add_argument("--no-export", action="store_true", help="keep weights only in OUT/weights")
    p.add_argument("--smoke", action="store_true", help="seconds-long run of every stage")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ae-steps", type=int, default=None)
    p.add_argument("--dyn-steps", type=int, default=None)
    p.add_argument("--num-trajectories", type=int, default=None)
    p.add_argument("--window", type=int, default=None, help="dynamics context window K")
    p.add_argument(
        "--copy-gate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="blend each frame with the previous one by a learned gate (DynamicsConfig.copy_gate)",
    )
    p.add_argument("--decoder-texture-loss", type=float, default=None, help="texture loss weight")
    p.add_argument("--distill-steps", type=int, default=None, help="few-step distillation steps")
    p.add_argument("--refine-steps", type=int, default=None, help="second distillation steps")
    p.add_argument("--decoder-finetune-steps", type=int, default=None, help="decoder fine-tuning steps")
    p.add_argument("--no-amp", action="store_true", help="disable bf16 autocast")
    p.add_argument("--no-compile", action="store_true", help="train the dynamics model eager")
    args = p.parse_args(argv)
    cfg = smoke_config(args.out) if args.smoke else TrainConfig(out=args.out)
    if args.no_export:
        cfg.export_dir = None
    elif args.export_dir is not None:
        cfg.export_dir = args.export_dir
    changes: dict[str, Any] = {}
    for name in (
        "seed",
        "ae_steps",
        "dyn_steps",
        "num_trajectories",
        "distill_steps",
        "refine_steps",
        "decoder_texture_loss",
        "decoder_finetune_steps",
    ):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    arch_names = ("window", "copy_gate")
    arch = {name: getattr(args, name) for name in arch_names if getattr(args, name) is not None}
    if arch:
        changes["dynamics"] = replace(cfg.dynamics, **arch)
    if args.no_amp:
        changes["amp"] = False
    if args.no_compile:
        changes["compile"] = False
    return replace(cfg, **changes)


def main(argv: list[str] | None = None) -> None:
    train(_parse(argv))


if __name__ == "__main__":
    main()
