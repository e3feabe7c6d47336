"""A reusable sliding-window key/value cache for block-causal video transformers.

Holds, per layer, the keys and values of the last ``window_frames`` clean frames of one rollout
(or of a batch of rollouts stacked on dim 0), plus optionally the first ``sink_frames`` frames,
which are never evicted. Storage is allocated once, ``[layers, 2, batch, heads, tokens, head_dim]``,
and reused: appending a frame shifts the window in place, so steady-state steps allocate nothing.

Written by the transformer's ``finalize_kv_cache`` (one frame per AR step), read by its
``predict_flow`` (attention over the cached frames).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.errors import BatchError, InputError


class SlidingWindowKVCache:
    """Fixed-capacity KV store of ``sink_frames + window_frames`` frames per layer."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_heads: int,
        head_dim: int,
        tokens_per_frame: int,
        window_frames: int,
        sink_frames: int = 0,
        batch_size: int = 1,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if window_frames < 1:
            raise InputError(f"window_frames must be >= 1, got {window_frames}")
        if sink_frames < 0:
            raise InputError(f"sink_frames must be >= 0, got {sink_frames}")
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.tokens_per_frame = tokens_per_frame
        self.window_frames = window_frames
        self.sink_frames = sink_frames
        self.batch_size = batch_size
        capacity = (sink_frames + window_frames) * tokens_per_frame
        self.storage = torch.zeros(
            num_layers, 2, batch_size, num_heads, capacity, head_dim, device=device, dtype=dtype
        )
        self.num_frames = 0
        """Frames currently held (sinks included), ``<= sink_frames + window_frames``."""
        self.frames_seen = 0
        """Frames ever appended; the absolute index of the next frame."""
        self._positions: list[int] = []
        self._stack_base = 0

    @property
    def capacity_frames(self) -> int:
        return self.sink_frames + self.window_frames

    @property
    def nbytes(self) -> int:
        """Bytes of device memory held by this cache."""
        return self.storage.numel() * self.storage.element_size()

    def keys(self, layer: int) -> Tensor:
        """Keys of the cached frames, ``[batch, heads, num_frames * tokens_per_frame, head_dim]``."""
        return self.storage[layer, 0, :, :, : self.num_frames * self.tokens_per_frame]

    def values(self, layer: int) -> Tensor:
        """Values of the cached frames, same shape as :meth:`keys`."""
        return self.storage[layer, 1, :, :, : self.num_frames * self.tokens_per_frame]

    def frame_positions(self) -> list[int]:
        """Absolute frame index of each cached frame, oldest first."""
        return list(self._positions)

    def append_frame(self, layer_kvs: list[tuple[Tensor, Tensor]]) -> None:
        """Append one frame's keys/values for every layer (each ``[batch, heads, P, head_dim]``).

        When full, the oldest non-sink frame is evicted.
        """
        if len(layer_kvs) != self.num_layers:
            raise InputError(f"expected K/V for {self.num_layers} layers, got {len(layer_kvs)}")
        p = self.tokens_per_frame
        if self.num_frames == self.capacity_frames:
            lo = self.sink_frames * p
            # Shift the non-sink window left by one frame (clone: the regions overlap).
            self.storage[:, :, :, :, lo:-p] = self.storage[:, :, :, :, lo + p :].clone()
        slot = self._book_append()
        for layer, (k, v) in enumerate(layer_kvs):
            self.storage[layer, 0, :, :, slot * p : (slot + 1) * p] = k
            self.storage[layer, 1, :, :, slot * p : (slot + 1) * p] = v

    def _book_append(self) -> int:
        """Update frame bookkeeping for one appended frame; returns the slot it occupies."""
        if self.num_frames == self.capacity_frames:
            del self._positions[self.sink_frames]
        else:
            self.num_frames += 1
        self._positions.append(self.frames_seen)
        self.frames_seen += 1
        return self.num_frames - 1

    def _layout(self) -> tuple[int, ...]:
        return (
            self.num_layers,
            self.num_heads,
            self.head_dim,
            self.tokens_per_frame,
            self.window_frames,
            self.sink_frames,
        )

    @classmethod
    def stack(cls, caches: list[SlidingWindowKVCache]) -> SlidingWindowKVCache:
        """One cache whose batch is the concatenation of ``caches`` (copies; originals untouched).

        All caches must have the same layout and the same number of cached frames.
        """
        if not caches:
            raise BatchError("cannot stack an empty list of KV caches")
        first = caches[0]
        for c in caches[1:]:
            if c._layout() != first._layout():
                raise BatchError(f"KV cache layouts differ: {c._layout()} vs {first._layout()}")
            if c.num_frames != first.num_frames:
                raise BatchError(
                    f"KV caches hold different numbers of frames ({c.num_frames} vs "
                    f"{first.num_frames}); only caches with equal fill can be batched"
                )
        out = cls.__new__(cls)
        out.__dict__.update({k: v for k, v in first.__dict__.items() if k != "storage"})
        out._positions = list(first._positions)
        out.storage = torch.cat([c.storage for c in caches], dim=2)
        out.batch_size = out.storage.shape[2]
        out._stack_base = first.frames_seen
        return out

    def copy_into(self, caches: list[SlidingWindowKVCache]) -> None:
        """Write this batched cache's rows back into the per-session ``caches`` it was stacked from."""
        appended = self.frames_seen - self._stack_base
        row = 0
        for c in caches:
            c.storage.copy_(self.storage[:, :, row : row + c.batch_size])
            row += c.batch_size
            for _ in range(appended):
                c._book_append()
