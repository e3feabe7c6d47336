"""What a tiny-world rollout has seen: the latent cells of its views, kept in world coordinates.

The camera pans a whole number of latent cells per action (``cells``:
:attr:`~pipeline.tiny_world.nets.DynamicsConfig.camera_step_cells`), so every latent cell of every
view sits at an integer world cell. :class:`WorldMemory` keeps the latest clean latent seen at each
world cell of a ``side × side`` neighbourhood, as a ring (world cell ``(y, x)`` lives at ring cell
``(y mod side, x mod side)``) tagged with the world cell it holds, so a cell written over by one a
ring period away is never mistaken for it. :meth:`WorldMemory.view` gives the sampler the cells of
the next view it already knows, :meth:`WorldMemory.moved` writes a finalized view.

With ``side`` equal to the view's side the memory is the previous view only: the known cells of the
next view are exactly the previous frame moved by the action (the *moved copy*). A larger ring also
remembers cells that left the view, so a view the camera comes back to is the one it left.

All state is per rollout (batch dim ``B``) and on the model's device; positions move by tensor
ops, so reading and writing never wait on the device. Every method returns new tensors (a stacked
batch's slices may be views of one another).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.tiny_world.env import ACTION_DELTAS

UNSEEN = -(2**62)
"""World-cell tag of a ring cell that holds nothing (no camera reaches it)."""


def camera_step_table(cells: int) -> Tensor:
    """Camera displacement ``[A, 2]`` (rows, columns; latent cells) of each action, for a camera
    step of ``cells`` latent cells (index it with the actions on their device)."""
    return torch.as_tensor(ACTION_DELTAS * cells, dtype=torch.long)


@dataclass(frozen=True)
class WorldMemory:
    """Latent cells seen by each of ``B`` rollouts, in a ring of ``side × side`` world cells."""

    canvas: Tensor
    """Latents ``[B, C, side * side]`` by ring cell (flat: ``ring_row * side + ring_col``)."""
    tags: Tensor
    """World cell ``[B, 2, side * side]`` (row, column) each ring cell holds; :data:`UNSEEN` if none."""
    position: Tensor
    """World cell ``[B, 2]`` of each rollout's current view's top-left cell."""
    side: int
    """Side of the ring in latent cells (>= the view's)."""

    @classmethod
    def start(cls, first: Tensor, side: int) -> WorldMemory:
        """The memory of a rollout that has seen only ``first [1, C, S, S]``, at world cell (0, 0)."""
        _, c, s, _ = first.shape
        if side < s:
            raise ValueError(f"a world memory of side {side} cannot hold a {s}×{s} view")
        empty = cls(
            canvas=first.new_zeros(1, c, side * side),
            tags=torch.full((1, 2, side * side), UNSEEN, device=first.device, dtype=torch.long),
            position=torch.zeros(1, 2, device=first.device, dtype=torch.long),
            side=side,
        )
        return empty._written(first)

    def _cells(self, position: Tensor, s: int) -> tuple[Tensor, Tensor]:
        """Flat ring index ``[B, S*S]`` and world cells ``[B, 2, S*S]`` of the ``S × S`` views at
        ``position [B, 2]``."""
        offsets = torch.arange(s, device=position.device)
        rows = position[:, 0, None] + offsets  # [B, S]
        cols = position[:, 1, None] + offsets
        world = torch.stack(
            [rows[:, :, None].expand(-1, s, s), cols[:, None, :].expand(-1, s, s)], dim=1
        ).reshape(-1, 2, s * s)
        ring = (world[:, 0] % self.side) * self.side + world[:, 1] % self.side
        return ring, world

    def view(self, steps: Tensor, s: int) -> tuple[Tensor, Tensor]:
        """The ``S × S`` view after each rollout's camera moves by ``steps [B, 2]``: its known latents
        ``[B, C, S, S]`` (0 where unknown) and the mask ``[B, 1, S, S]`` (1.0 where known)."""
        ring, world = self._cells(self.position + steps, s)
        b, c, _ = self.canvas.shape
        known = (self.tags.gather(2, ring[:, None].expand(-1, 2, -1)) == world).all(dim=1)
        latents = self.canvas.gather(2, ring[:, None].expand(-1, c, -1)) * known[:, None]
        return latents.reshape(b, c, s, s), known.to(self.canvas.dtype).reshape(b, 1, s, s)

    def moved(self, frames: Tensor, steps: Tensor) -> WorldMemory:
        """The memory after each rollout's camera moved by ``steps [B, 2]`` and saw ``frames
        [B, C, S, S]`` there."""
        moved = WorldMemory(self.canvas, self.tags, self.position + steps, self.side)
        return moved._written(frames)

    def _written(self, frames: Tensor) -> WorldMemory:
        b, c, s, _ = frames.shape
        ring, world = self._cells(self.position, s)
        canvas = self.canvas.scatter(2, ring[:, None].expand(-1, c, -1), frames.reshape(b, c, s * s))
        tags = self.tags.scatter(2, ring[:, None].expand(-1, 2, -1), world)
        return WorldMemory(canvas, tags, self.position, self.side)

    @staticmethod
    def stack(memories: list[WorldMemory]) -> WorldMemory:
        """One memory of all rollouts of ``memories`` (same ``side``), in order."""
        sides = {m.side for m in memories}
        if len(sides) != 1:
            raise ValueError(f"cannot stack world memories of sides {sorted(sides)}")
        return WorldMemory(
            torch.cat([m.canvas for m in memories]),
            torch.cat([m.tags for m in memories]),
            torch.cat([m.position for m in memories]),
            sides.pop(),
        )

    def rollout(self, i: int) -> WorldMemory:
        """The memory of rollout ``i`` alone."""
        sl = slice(i, i + 1)
        return WorldMemory(self.canvas[sl], self.tags[sl], self.position[sl], self.side)
