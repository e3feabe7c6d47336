"""Networks of the tiny world model: a conv autoencoder and a block-causal dynamics transformer.

* :class:`Autoencoder` maps a 64×64×3 frame in ``[-1, 1]`` to an 8×8×C latent and back (stride 8,
  so one camera step of the environment is exactly one latent cell).
* :class:`DynamicsTransformer` predicts the flow-matching velocity of the next latent frame from the
  last ``window`` clean latent frames, the action that leads to it and the noise level. Frames are
  patchified (patch 2 → 16 tokens per frame); attention is block-causal over a sliding window of
  frames, with rotary position embeddings over *window-relative* frame slots, so a rollout's keys
  do not depend on its absolute AR index and sessions at different indices can share a batch.
  Keys are cached un-rotated in a :class:`~pipeline.kv_cache.SlidingWindowKVCache` and rotated by
  their window slot when read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.errors import ConfigError
from pipeline.kv_cache import SlidingWindowKVCache
from pipeline.tiny_world.env import ACTION_DELTAS, STEP_PX, VIEW_PX

# ---------------------------------------------------------------------------- batch invariance

ROW_MULTIPLE = 4
"""Row counts of matrix products that give every row the same result whatever the batch.

On CPU, MKL's sgemm sums a row's products in another order when a product has fewer than 4 rows,
and, with several threads, when the row count is not a multiple of 4 (measured with torch 2.13's
MKL: rows 1-3 always, 5-7 and 9-11 too with 2 threads). A rollout alone multiplies 1 row where a
batch of ``B`` multiplies ``B`` rows, so without care a session's frames depend on who it shares a
batch with. :meth:`DynamicsTransformer.condition` pads its rollouts (the per-frame conditioning
vectors, one row per rollout and frame) to a multiple of 4 rows (tested in
``tests/test_tiny_world_quality.py``). The token products need nothing: 16 rows per frame. The
decoder has its own case (:meth:`ResBlock.forward_batch_invariant`).
"""


def rows_to_multiple(batch: int, frames: int) -> int:
    """Smallest batch ``>= batch`` whose ``batch * frames`` rows are a multiple of :data:`ROW_MULTIPLE`."""
    padded = batch
    while (padded * frames) % ROW_MULTIPLE:
        padded += 1
    return padded


# ---------------------------------------------------------------------------- autoencoder


@dataclass(frozen=True)
class AutoencoderConfig:
    """Shape of the conv autoencoder."""

    latent_channels: int = 8
    """Channels ``C`` of the 8×8 latent."""
    widths: tuple[int, int, int] = (32, 64, 128)
    """Conv widths at the 64, 32 and 16 px stages (the 8 px stage uses the last)."""


class ResBlock(nn.Module):
    """Pre-activation residual block of two 3×3 convs."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))

    def forward_batch_invariant(self, x: Tensor) -> Tensor:
        """:meth:`forward` whose every image is the same whatever the batch size.

        oneDNN runs the decoder's 128 -> 128 channel 3x3 convolutions at 8x8 with another
        algorithm for a batch of 1 than for 2 or more (outputs differ by ~3e-6, enough to flip a
        uint8 pixel now and then; batches of 2..64 agree with each other at 1-4 threads, measured
        with torch 2.13). A batch of 1 therefore runs as 2 copies (+0.04 ms on one thread).
        """
        if x.shape[0] != 1:
            return self(x)
        pair = torch.cat([x, x]).contiguous(memory_format=torch.channels_last)
        return self(pair)[:1]


class Autoencoder(nn.Module):
    """64×64×3 ↔ 8×8×C conv autoencoder (no KL; the latent is normalised after training)."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.config = config
        w1, w2, w3 = config.widths
        c = config.latent_channels
        self.encoder = nn.Sequential(
            nn.Conv2d(3, w1, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(w1, w2, 4, 2, 1),
            nn.SiLU(),
            nn.Conv2d(w2, w3, 4, 2, 1),
            nn.SiLU(),
            nn.Conv2d(w3, w3, 4, 2, 1),
            ResBlock(w3),
            nn.SiLU(),
            nn.Conv2d(w3, c, 1),
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(c, w3, 3, padding=1),
            ResBlock(w3),
            nn.SiLU(),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(w3, w2, 3, padding=1),
            nn.SiLU(),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(w2, w1, 3, padding=1),
            nn.SiLU(),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(w1, w1, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(w1, 3, 3, padding=1),
        )

    def encode(self, image: Tensor) -> Tensor:
        """``[B, 3, 64, 64]`` in ``[-1, 1]`` → raw latent ``[B, C, 8, 8]``."""
        return self.encoder(image)

    def decode(self, latent: Tensor) -> Tensor:
        """Raw latent ``[B, C, 8, 8]`` → image ``[B, 3, 64, 64]`` (roughly ``[-1, 1]``)."""
        return self.decoder(latent)

    def decode_batch_invariant(self, latent: Tensor) -> Tensor:
        """:meth:`decode` whose every image is the same whatever the batch (inference).

        Only the residual block needs care (:meth:`ResBlock.forward_batch_invariant`); the other
        convolutions give a batch of 1 and a batch of several the same values (tested).
        """
        x = latent
        for layer in self.decoder:
            x = layer.forward_batch_invariant(x) if isinstance(layer, ResBlock) else layer(x)
        return x


# ---------------------------------------------------------------------------- dynamics

GATE_SIGMA_FLOOR = 0.01
"""Noise level below which the copy gate's velocity divides by this instead (training only: the
samplers never query such levels; keeps a moving frame's velocity bounded near sigma = 0)."""


@dataclass(frozen=True)
class DynamicsConfig:
    """Shape of the dynamics transformer."""

    latent_channels: int = 8
    """Channels of the latent frames."""
    latent_size: int = 8
    """Side of the square latent frames."""
    patch: int = 2
    """Patch side; ``(latent_size / patch)**2`` tokens per frame."""
    d_model: int = 192
    """Width of the residual stream."""
    layers: int = 6
    """Transformer blocks."""
    heads: int = 4
    """Attention heads (``d_model / heads`` must be even for RoPE)."""
    mlp_ratio: int = 4
    """Hidden width of the MLP relative to ``d_model``."""
    window: int = 4
    """Clean context frames each frame attends to (the KV cache's window)."""
    num_actions: int = 9
    """Size of the action vocabulary."""
    rope_base: float = 100.0
    """RoPE base over window-relative frame slots."""
    copy_gate: bool = False
    """Blend the clean frame each noisy frame is denoised to with the previous clean frame:
    ``x0 = g * previous + (1 - g) * x0_net``, ``g = sigmoid(linear(condition))`` per frame, from the
    action and noise level. Where the world does not move (``none``) the data teach ``g -> 1`` and
    the frame is copied exactly, instead of being re-drawn through attention over noised context
    keys with a small error every step that an idle rollout accumulates into drift; where it moves
    ``g -> 0`` and frames are generated whole, so errors do not integrate. ``False``: weights
    trained before issue #16."""

    def __post_init__(self) -> None:
        if self.latent_size % self.patch:
            raise ConfigError(f"latent_size {self.latent_size} not divisible by patch {self.patch}")
        if self.d_model % self.heads or (self.d_model // self.heads) % 2:
            raise ConfigError(f"d_model {self.d_model} must split into {self.heads} heads of even size")
        if self.window < 1:
            raise ConfigError(f"window must be >= 1, got {self.window}")

    @property
    def camera_step_cells(self) -> int | None:
        """Latent cells the camera moves per action, if every view's cells sit at whole world cells
        (what the sampler's world memory needs: :mod:`pipeline.tiny_world.world_memory`): the
        environment's actions and a camera step of whole cells. Else ``None``."""
        if self.num_actions != len(ACTION_DELTAS) or STEP_PX * self.latent_size % VIEW_PX:
            return None
        return STEP_PX * self.latent_size // VIEW_PX

    @property
    def tokens_per_frame(self) -> int:
        return (self.latent_size // self.patch) ** 2

    @property
    def token_dim(self) -> int:
        return self.latent_channels * self.patch * self.patch

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads


def timestep_embedding(sigma: Tensor, dim: int = 128) -> Tensor:
    """Sinusoidal embedding ``[..., dim]`` of noise levels ``sigma`` in ``[0, 1]``."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half
    )
    angles = sigma.float()[..., None] * 1000.0 * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def rope_tables(positions: Tensor, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos/sin tables ``[N, head_dim / 2]`` for (float) positions ``[N]``."""
    inv = 1.0 / (
        base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    )
    angles = positions.float()[:, None] * inv[None]
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x [B, H, N, hd]`` by per-token tables ``[N, hd / 2]``."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


KV = tuple[Tensor, Tensor]


class DynamicsBlock(nn.Module):
    """Attention + MLP block with adaLN-zero modulation from a per-frame condition vector."""

    def __init__(self, d_model: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.fc1 = nn.Linear(d_model, mlp_ratio * d_model)
        self.fc2 = nn.Linear(mlp_ratio * d_model, d_model)
        self.ada = nn.Linear(d_model, 6 * d_model)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(
        self,
        x: Tensor,
        cond: Tensor,
        rope: tuple[Tensor, Tensor],
        context: KV | None = None,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, KV]:
        """One block.

        ``x [B, F, P, d]`` tokens of ``F`` frames, ``cond [B', F, d]`` (``B' >= B``: the first
        ``B`` rows are used), ``rope`` tables for the ``F * P`` tokens of ``x``; ``context``
        optional already-rotated keys and values ``[B, H, Nc, hd]`` prepended to the attention;
        ``mask [F*P, Nc + F*P]`` (True = attend). Returns the new ``x`` and this block's
        un-rotated keys and values of ``x``.
        """
        b, f, p, d = x.shape
        h = self.heads
        hd = d // h
        # cond may carry padding rollouts past x's batch (see DynamicsTransformer.condition).
        s1, b1, g1, s2, b2, g2 = self.ada(cond)[:b].unsqueeze(2).chunk(6, dim=-1)
        y = self.norm1(x) * (1 + s1) + b1
        q, k, v = self.qkv(y).view(b, f * p, 3, h, hd).permute(2, 0, 3, 1, 4).unbind(0)
        cos, sin = rope
        q = apply_rope(q, cos, sin)
        k_rot = apply_rope(k, cos, sin)
        v_all = v
        if context is not None:
            k_rot = torch.cat([context[0].to(k_rot.dtype), k_rot], dim=2)
            v_all = torch.cat([context[1].to(v.dtype), v], dim=2)
        o = F.scaled_dot_product_attention(q, k_rot, v_all, attn_mask=mask)
        x = x + g1 * self.proj(o.transpose(1, 2).reshape(b, f, p, d))
        y = self.norm2(x) * (1 + s2) + b2
        x = x + g2 * self.fc2(F.gelu(self.fc1(y), approximate="tanh"))
        return x, (k, v)


class DynamicsTransformer(nn.Module):
    """Action- and noise-conditioned velocity predictor over a sliding window of latent frames."""

    def __init__(self, config: DynamicsConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.inp = nn.Linear(config.token_dim, d)
        self.pos = nn.Parameter(torch.randn(1, 1, config.tokens_per_frame, d) * 0.02)
        self.action_emb = nn.Embedding(config.num_actions, d)
        self.sigma_mlp = nn.Sequential(nn.Linear(128, d), nn.SiLU(), nn.Linear(d, d))
        self.blocks = nn.ModuleList(
            [DynamicsBlock(d, config.heads, config.mlp_ratio) for _ in range(config.layers)]
        )
        self.norm_out = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, config.token_dim)
        for m in (self.ada_out, self.out):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        if config.copy_gate:
            self.gate = nn.Linear(d, 1)
            nn.init.zeros_(self.gate.weight)
            nn.init.constant_(self.gate.bias, -2.0)  # g = 0.12: starts close to whole frames

    # ---- shapes ---------------------------------------------------------------------------
    def patchify(self, z: Tensor) -> Tensor:
        """Latents ``[..., C, S, S]`` → tokens ``[..., P, C*p*p]``."""
        c, s, p = self.config.latent_channels, self.config.latent_size, self.config.patch
        lead = z.shape[:-3]
        g = s // p
        z = z.reshape(-1, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5)
        return z.reshape(*lead, g * g, c * p * p)

    def unpatchify(self, t: Tensor) -> Tensor:
        """Tokens ``[..., P, C*p*p]`` → latents ``[..., C, S, S]``."""
        c, s, p = self.config.latent_channels, self.config.latent_size, self.config.patch
        lead = t.shape[:-2]
        g = s // p
        t = t.reshape(-1, g, g, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return t.reshape(*lead, c, s, s)

    # ---- building blocks ------------------------------------------------------------------
    def condition(self, sigma: Tensor, action: Tensor) -> Tensor:
        """Per-frame condition ``[B', F, d]`` from noise levels and actions ``[B, F]``.

        ``B' >= B``: padded with no-op rollouts at σ=0 until ``B' * F`` is a multiple of
        :data:`ROW_MULTIPLE`, so that the conditioning products (one row per rollout and frame)
        give a rollout the same values alone and in a batch; users take the first ``B`` rows.
        """
        b, f = sigma.shape
        padded = rows_to_multiple(b, f)
        if padded != b:
            sigma = torch.cat([sigma, sigma.new_zeros(padded - b, f)])
            action = torch.cat([action, action.new_zeros(padded - b, f)])
        emb = timestep_embedding(sigma).to(self.inp.weight.dtype)
        return F.silu(self.sigma_mlp(emb) + self.action_emb(action))

    def _rope(self, frame_slots: Tensor) -> tuple[Tensor, Tensor]:
        pos = frame_slots.repeat_interleave(self.config.tokens_per_frame)
        return rope_tables(pos, self.config.head_dim, self.config.rope_base)

    def _run(
        self,
        tokens: Tensor,
        cond: Tensor,
        rope: tuple[Tensor, Tensor],
        contexts: list[KV] | None,
        mask: Tensor | None,
    ) -> tuple[Tensor, list[KV]]:
        x = self.inp(tokens) + self.pos
        kvs: list[KV] = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, cond, rope, None if contexts is None else contexts[i], mask)
            kvs.append(kv)
        shift, scale = self.ada_out(cond)[: x.shape[0]].unsqueeze(2).chunk(2, dim=-1)
        return self.out(self.norm_out(x) * (1 + scale) + shift), kvs

    def gate_value(self, cond: Tensor) -> Tensor:
        """The copy gate ``g [B', F, 1]`` (fp32) for per-frame conditions ``cond [B', F, d]``."""
        return torch.sigmoid(self.gate(cond).float())

    def apply_copy_gate(
        self,
        v: Tensor,
        noisy: Tensor,
        sigma: Tensor,
        cond: Tensor,
        previous: Tensor | None,
        known: Tensor | None = None,
    ) -> Tensor:
        """Velocity ``[B, F, P, D]`` of ``noisy`` frames at ``sigma [B, F]`` after the copy.

        Given clean tokens ``previous`` to copy from, the clean frame the velocity points to is
        ``g * previous + (1 - g) * (noisy - sigma * v)``, i.e. ``v + g * ((noisy - previous) / sigma
        - v)``. With ``known`` (the sampler's inpainting, any model: a ``[B, F, P, D]`` mask, 1.0
        where ``previous`` holds the frame's own clean value, e.g. a cell that stayed in view),
        ``g = known``. Otherwise, with :attr:`DynamicsConfig.copy_gate`, ``previous`` is the
        previous clean frame and ``g`` the gate of ``cond [B', F, d]``. Else (or without
        ``previous``: a forward only run for its keys and values) ``v`` itself.
        """
        if previous is None:
            return v
        if known is not None:
            g = known
        elif self.config.copy_gate:
            g = self.gate_value(cond)[: v.shape[0]].unsqueeze(-1)
        else:
            return v
        s = sigma.float().clamp_min(GATE_SIGMA_FLOOR)[..., None, None]
        return v + g * ((noisy - previous) / s - v)

    # ---- training -------------------------------------------------------------------------
    def training_mask(self, frames: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """Attention mask and frame slots for teacher forcing on ``frames`` frames.

        The sequence is ``frames`` clean (context) frames followed by ``frames - 1`` noisy frames
        (targets for frames ``1..frames-1``). Clean frame ``i`` attends to clean frames
        ``[i - window, i]``; noisy frame ``i`` to clean frames ``[i - window, i - 1]`` and itself —
        exactly what the KV cache gives at inference.
        """
        w, p = self.config.window, self.config.tokens_per_frame
        slot = torch.cat([torch.arange(frames), torch.arange(1, frames)])
        noisy = torch.cat([torch.zeros(frames, dtype=torch.bool), torch.ones(frames - 1, dtype=torch.bool)])
        qi, kj = slot[:, None], slot[None, :]
        qn, kn = noisy[:, None], noisy[None, :]
        clean_key = (~kn) & (kj <= qi) & (kj >= qi - w) & ~(qn & (kj == qi))
        own_noisy = qn & kn & (kj == qi)
        mask = (clean_key | own_noisy).repeat_interleave(p, 0).repeat_interleave(p, 1)
        return mask.to(device), slot.to(device)

    def encode_context(
        self, z_context: Tensor, sigma_context: Tensor, actions: Tensor, mask: Tensor, slots: Tensor
    ) -> list[KV]:
        """Per-layer rotated keys and values ``[B, H, T*P, hd]`` of the teacher-forced context.

        ``z_context [B, T, C, S, S]`` (lightly noised clean frames) at ``sigma_context [B, T]``
        after moves ``actions [B, T]``; ``mask``/``slots`` from :meth:`training_mask`. Clean frames
        never attend to noisy ones, so this is computed once and shared by every
        :meth:`forward_noisy` call on the same context (the Euler steps of a sample).
        """
        t = z_context.shape[1]
        n = t * self.config.tokens_per_frame
        cos, sin = self._rope(slots[:t])
        cond = self.condition(sigma_context, actions)
        _, kvs = self._run(self.patchify(z_context), cond, (cos, sin), None, mask[:n, :n])
        return [(apply_rope(k, cos, sin), v) for k, v in kvs]

    def forward_noisy(
        self,
        context: list[KV],
        z_noisy: Tensor,
        sigma_noisy: Tensor,
        actions: Tensor,
        mask: Tensor,
        slots: Tensor,
        previous: Tensor | None = None,
    ) -> Tensor:
        """Velocity ``[B, T-1, C, S, S]`` of noisy frames 1..T-1 given :meth:`encode_context`.

        ``z_noisy [B, T-1, C, S, S]`` at ``sigma_noisy [B, T-1]``; ``actions [B, T]`` as given to
        :meth:`encode_context` (frame ``i`` is conditioned on ``actions[:, i]``); ``previous``
        the clean frames 0..T-2 (for :attr:`DynamicsConfig.copy_gate`).
        """
        t = actions.shape[1]
        n = t * self.config.tokens_per_frame
        cond = self.condition(sigma_noisy, actions[:, 1:])
        noisy = self.patchify(z_noisy)
        out, _ = self._run(noisy, cond, self._rope(slots[t:]), context, mask[n:])
        prev = None if previous is None else self.patchify(previous)
        return self.unpatchify(self.apply_copy_gate(out, noisy, sigma_noisy, cond, prev))

    def forward_train(
        self,
        z_context: Tensor,
        sigma_context: Tensor,
        z_noisy: Tensor,
        sigma_noisy: Tensor,
        actions: Tensor,
        mask: Tensor,
        slots: Tensor,
        previous: Tensor | None = None,
    ) -> Tensor:
        """Teacher-forced velocity prediction.

        ``z_context [B, T, C, S, S]`` (lightly noised clean frames) at ``sigma_context [B, T]``;
        ``z_noisy [B, T-1, C, S, S]`` noised frames 1..T-1 at ``sigma_noisy [B, T-1]``;
        ``actions [B, T]``, the move leading to each frame; ``previous`` the clean frames 0..T-2
        (for :attr:`DynamicsConfig.copy_gate`). Returns velocity ``[B, T-1, C, S, S]``.

        One pass over context and noisy tokens together: the same result as
        :meth:`encode_context` then :meth:`forward_noisy`, and faster for a single evaluation with
        a backward pass (measured on CPU); the split pays off when one context serves several.
        """
        t = z_context.shape[1]
        noisy = self.patchify(z_noisy)
        tokens = torch.cat([self.patchify(z_context), noisy], dim=1)
        cond = self.condition(
            torch.cat([sigma_context, sigma_noisy], 1), torch.cat([actions, actions[:, 1:]], 1)
        )
        out, _ = self._run(tokens, cond, self._rope(slots), None, mask)
        prev = None if previous is None else self.patchify(previous)
        return self.unpatchify(self.apply_copy_gate(out[:, t:], noisy, sigma_noisy, cond[:, t:], prev))

    # ---- inference with a sliding-window KV cache -----------------------------------------
    def new_cache(
        self, batch_size: int, device: torch.device | str, dtype: torch.dtype
    ) -> SlidingWindowKVCache:
        """An empty KV cache sized for this network's window."""
        c = self.config
        return SlidingWindowKVCache(
            num_layers=c.layers,
            num_heads=c.heads,
            head_dim=c.head_dim,
            tokens_per_frame=c.tokens_per_frame,
            window_frames=c.window,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
        )

    def rotated_context(self, cache: SlidingWindowKVCache) -> list[KV] | None:
        """Per-layer (rotated keys, values) of the cached frames at window slots ``0..n-1``."""
        n = cache.num_frames
        if n == 0:
            return None
        cos, sin = self._rope(torch.arange(n, device=cache.storage.device))
        return [(apply_rope(cache.keys(i), cos, sin), cache.values(i)) for i in range(self.config.layers)]

    def prime_frames(self, tokens: Tensor, sigma: Tensor, action: Tensor) -> list[KV]:
        """Keys/values of ``F`` frames written to an empty cache, in one causal forward.

        ``tokens [B, F, P, D]`` at noise ``sigma [B, F]`` after moves ``action [B, F]``; frame
        ``i`` sits at window slot ``i`` and attends to frames ``0..i`` — the same result as
        ``F`` calls of :meth:`forward_frame` with the cache growing by one frame each, in one
        pass. Returns per-layer un-rotated keys/values ``[B, H, F * P, hd]``.
        """
        f, p = tokens.shape[1], self.config.tokens_per_frame
        frame = torch.arange(f, device=tokens.device).repeat_interleave(p)
        mask = frame[None, :] <= frame[:, None]
        cond = self.condition(sigma, action)
        _, kvs = self._run(tokens, cond, self._rope(torch.arange(f, device=tokens.device)), None, mask)
        return kvs

    def forward_frame(
        self,
        tokens: Tensor,
        sigma: Tensor,
        action: Tensor,
        context: list[KV] | None,
        num_context_frames: int,
        previous: Tensor | None = None,
        known: Tensor | None = None,
    ) -> tuple[Tensor, list[KV]]:
        """One frame ``tokens [B, P, D]`` at noise ``sigma [B]`` after move ``action [B]``.

        Attends to ``context`` (from :meth:`rotated_context`) and itself, at window slot
        ``num_context_frames``; ``previous [B, P, D]``: the previous clean frame's tokens (for
        :attr:`DynamicsConfig.copy_gate`; ``None`` when only the keys/values are wanted), or with
        ``known [B, P, D]`` the sampler's known clean tokens and their mask: those cells are
        ``previous``'s, only the others are the network's (:meth:`apply_copy_gate`). Returns the velocity
        tokens ``[B, P, D]`` and the frame's per-layer un-rotated keys/values ``[B, H, P, hd]``
        (for :meth:`append_to_cache`).
        """
        cond = self.condition(sigma[:, None], action[:, None])
        slot = torch.full((1,), num_context_frames, device=tokens.device)
        out, kvs = self._run(tokens[:, None], cond, self._rope(slot), context, None)
        prev = None if previous is None else previous[:, None]
        mask = None if known is None else known[:, None]
        gated = self.apply_copy_gate(out, tokens[:, None], sigma[:, None], cond, prev, mask)
        return gated[:, 0], kvs
