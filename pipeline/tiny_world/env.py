"""The tiny world: a procedural top-down biome map seen through a small panning camera.

A world is a periodic (toroidal) height map and moisture map made from spectrally shaped noise,
coloured into biomes (deep/shallow water, sand, grass, forest with tree dots, rock, snow) with hill
shading. A 64×64 RGB camera looks at it and pans by :data:`STEP_PX` pixels per action. Everything
is a deterministic function of the world seed, so the same seed and actions always give the same
frames. The environment is the training data source and the ground truth of the evaluation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from pipeline.errors import InputError

VIEW_PX = 64
"""Side of the square camera view in pixels."""
STEP_PX = 8
"""Camera displacement per action in pixels (= the autoencoder's latent stride)."""
MAP_PX = 256
"""Side of the square, periodic world map in pixels."""


class Action(IntEnum):
    """Camera moves. Diagonals move ``STEP_PX`` along both axes."""

    NONE = 0
    UP = 1
    DOWN = 2
    LEFT = 3
    RIGHT = 4
    UP_LEFT = 5
    UP_RIGHT = 6
    DOWN_LEFT = 7
    DOWN_RIGHT = 8


NUM_ACTIONS = len(Action)
ACTION_DELTAS = np.array(
    [[0, 0], [-1, 0], [1, 0], [0, -1], [0, 1], [-1, -1], [-1, 1], [1, -1], [1, 1]], dtype=np.int64
)
"""``(dy, dx)`` unit displacement of the camera for each :class:`Action` (row = action id)."""


class Biome(IntEnum):
    """Terrain classes, in palette order."""

    DEEP_WATER = 0
    SHALLOW_WATER = 1
    SAND = 2
    GRASS = 3
    FOREST = 4
    ROCK = 5
    SNOW = 6


NUM_BIOMES = len(Biome)
PALETTE = np.array(
    [
        [20, 40, 120],
        [45, 95, 175],
        [212, 200, 140],
        [95, 165, 65],
        [40, 112, 42],
        [132, 122, 112],
        [240, 240, 246],
    ],
    dtype=np.float32,
)
"""Base RGB colour of each :class:`Biome`."""
TREE_RGB = np.array([15, 58, 20], dtype=np.float32)
"""Colour of the 2×2 tree dots in forests."""


@dataclass(frozen=True)
class World:
    """One generated world: an RGB map and its biome labels, both ``MAP_PX`` square."""

    seed: int
    rgb: np.ndarray
    """``[S, S, 3]`` uint8."""
    biome: np.ndarray
    """``[S, S]`` uint8 :class:`Biome` ids (trees count as forest)."""

    @property
    def size(self) -> int:
        return int(self.rgb.shape[0])

    def view(self, y: int, x: int) -> np.ndarray:
        """The ``VIEW_PX`` square camera image whose top-left corner is at ``(y, x)`` (wrapping)."""
        return crop_views(self.rgb[None], np.zeros(1, np.int64), np.array([y]), np.array([x]))[0]


@functools.lru_cache(maxsize=8)
def _spectrum(size: int, beta: float, cutoff: float) -> np.ndarray:
    """Amplitude spectrum of :func:`_spectral_noise` (read-only; the same for every world)."""
    f = np.fft.fftfreq(size)
    fx, fy = np.meshgrid(f, f)
    r = np.sqrt(fx**2 + fy**2)
    r[0, 0] = 1.0
    amp = r ** (-beta) * np.exp(-((r / cutoff) ** 2))
    amp[0, 0] = 0.0
    amp.flags.writeable = False
    return amp


def _spectral_noise(rng: np.random.Generator, size: int, beta: float, cutoff: float) -> np.ndarray:
    """Periodic noise with a ``1/f**beta`` spectrum and a Gaussian cut-off; zero mean, unit std."""
    amp = _spectrum(size, beta, cutoff)
    z = rng.standard_normal((size, size)) + 1j * rng.standard_normal((size, size))
    h = np.real(np.fft.ifft2(z * amp))
    return ((h - h.mean()) / (h.std() + 1e-8)).astype(np.float32)


def generate_world(seed: int, size: int = MAP_PX) -> World:
    """Build the world of ``seed`` (a pure function of ``seed`` and ``size``)."""
    if size < VIEW_PX:
        raise InputError(f"world size must be >= the view ({VIEW_PX} px), got {size}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0x7157]))
    height = _spectral_noise(rng, size, 1.6, 0.12)
    moisture = _spectral_noise(rng, size, 1.4, 0.08)
    biome = np.full(height.shape, Biome.GRASS, np.uint8)
    biome[moisture > 0.35] = Biome.FOREST
    biome[height > 0.9] = Biome.ROCK
    biome[height > 1.5] = Biome.SNOW
    biome[height < -0.2] = Biome.SAND
    biome[height < -0.4] = Biome.SHALLOW_WATER
    biome[height < -1.0] = Biome.DEEP_WATER
    rgb = PALETTE[biome]
    gy, gx = np.gradient(height)
    relief = gx * 0.7 - gy * 0.7
    land = biome >= Biome.SAND
    shade = np.where(land, np.clip(1.0 + 4.0 * relief, 0.6, 1.4), np.clip(1.0 + 1.5 * relief, 0.8, 1.2))
    # Water gets darker with depth so that open sea still has visible structure.
    depth = np.clip(-height - 0.4, 0.0, 2.0)
    shade = np.where(land, shade, shade * (1.0 - 0.18 * depth))
    rgb = rgb * shade[..., None]
    trees = (rng.random(height.shape) < 0.02) & (biome == Biome.FOREST)
    trees = trees | np.roll(trees, 1, 0) | np.roll(trees, 1, 1) | np.roll(trees, (1, 1), (0, 1))
    rgb[trees] = TREE_RGB
    return World(seed=int(seed), rgb=np.clip(rgb, 0, 255).astype(np.uint8), biome=biome)


def crop_views(maps: np.ndarray, map_idx: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Camera views ``[N, VIEW_PX, VIEW_PX, 3]`` of ``maps[map_idx]`` at top-left ``(y, x)``."""
    size = maps.shape[1]
    ys = (y[:, None] + np.arange(VIEW_PX)[None]) % size
    xs = (x[:, None] + np.arange(VIEW_PX)[None]) % size
    return maps[map_idx[:, None, None], ys[:, :, None], xs[:, None, :]]


@functools.lru_cache(maxsize=256)
def first_view(seed: int) -> np.ndarray:
    """The view a :class:`WorldCamera` of world ``seed`` starts with (read-only ``[64, 64, 3]``).

    Cached per seed (256 × 12 KiB): building a world takes ~10 ms of CPU, and sessions of a
    server often start in the same worlds.
    """
    view = WorldCamera.from_seed(seed).frame()
    view.flags.writeable = False
    return view


class WorldCamera:
    """A camera panning over one world: the ground-truth environment of a session."""

    def __init__(self, world: World, y: int | None = None, x: int | None = None) -> None:
        self.world = world
        centre = world.size // 2 - VIEW_PX // 2
        self.y = centre if y is None else int(y)
        self.x = centre if x is None else int(x)

    @classmethod
    def from_seed(cls, seed: int) -> WorldCamera:
        return cls(generate_world(seed))

    def frame(self) -> np.ndarray:
        """Current view, ``[VIEW_PX, VIEW_PX, 3]`` uint8."""
        return self.world.view(self.y, self.x)

    def step(self, action: int) -> np.ndarray:
        """Apply ``action`` and return the new view."""
        if not 0 <= int(action) < NUM_ACTIONS:
            raise InputError(f"action must be in [0, {NUM_ACTIONS}), got {action}")
        dy, dx = ACTION_DELTAS[int(action)]
        self.y = (self.y + int(dy) * STEP_PX) % self.world.size
        self.x = (self.x + int(dx) * STEP_PX) % self.world.size
        return self.frame()

    def rollout(self, actions: list[int] | np.ndarray) -> np.ndarray:
        """Frames ``[len(actions) + 1, VIEW_PX, VIEW_PX, 3]``: current view, then one per action."""
        frames = [self.frame()]
        frames.extend(self.step(int(a)) for a in actions)
        return np.stack(frames)


ACTION_PROBS = np.array([0.16, 0.13, 0.13, 0.13, 0.13, 0.08, 0.08, 0.08, 0.08])
"""Distribution of freshly drawn actions in training trajectories (no-op, cardinals, diagonals)."""


def make_maps(seeds: list[int] | range) -> np.ndarray:
    """RGB maps ``[len(seeds), MAP_PX, MAP_PX, 3]`` of the given world seeds."""
    return np.stack([generate_world(s).rgb for s in seeds])


def sample_trajectories(
    maps: np.ndarray, n: int, length: int, rng: np.random.Generator, sticky: float = 0.75
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random camera walks of ``length`` frames with sticky random actions.

    Returns frames ``[n, length, VIEW_PX, VIEW_PX, 3]`` uint8 and actions ``[n, length]``, where
    ``actions[:, t]`` is the move that led to frame ``t`` (``actions[:, 0]`` is the move that led
    to the first frame, drawn like the others).
    """
    size = maps.shape[1]
    mi = rng.integers(0, len(maps), n)
    y = rng.integers(0, size, n)
    x = rng.integers(0, size, n)
    a = rng.choice(NUM_ACTIONS, n, p=ACTION_PROBS)
    actions = np.zeros((n, length), np.int64)
    frames = np.empty((n, length, VIEW_PX, VIEW_PX, 3), np.uint8)
    for t in range(length):
        if t > 0:
            change = rng.random(n) > sticky
            a = np.where(change, rng.choice(NUM_ACTIONS, n, p=ACTION_PROBS), a)
            y = y + ACTION_DELTAS[a, 0] * STEP_PX
            x = x + ACTION_DELTAS[a, 1] * STEP_PX
        actions[:, t] = a
        frames[:, t] = crop_views(maps, mi, y, x)
    return frames, actions


def classify_biomes(frames: np.ndarray) -> np.ndarray:
    """Nearest-palette biome id per pixel of uint8 frames ``[..., 3]`` (tree dots → forest)."""
    pal = np.concatenate([PALETTE, TREE_RGB[None]], 0)
    d = ((frames[..., None, :].astype(np.float32) - pal) ** 2).sum(-1)
    ids = d.argmin(-1)
    ids[ids == NUM_BIOMES] = Biome.FOREST
    return ids.astype(np.uint8)
