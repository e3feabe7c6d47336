"""Shipped weights of the tiny world model: safetensors files plus a small JSON of metadata.

Layout of a weights directory::

    autoencoder.safetensors   # Autoencoder state dict, fp16 storage
    dynamics.safetensors      # DynamicsTransformer state dict, fp16 storage
    tiny_world.json           # architecture hyperparameters, latent normalisation, provenance
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipeline.errors import ConfigError
from pipeline.tiny_world.nets import (
    Autoencoder,
    AutoencoderConfig,
    DynamicsConfig,
    DynamicsTransformer,
)

WEIGHTS_DIR = Path(__file__).parent / "weights"
"""Where the trained weights ship inside the package."""
AE_FILE = "autoencoder.safetensors"
DYN_FILE = "dynamics.safetensors"
META_FILE = "tiny_world.json"


@dataclass
class WeightsMeta:
    """Everything besides the tensors needed to rebuild the model."""

    autoencoder: AutoencoderConfig
    """Autoencoder architecture."""
    dynamics: DynamicsConfig
    """Dynamics transformer architecture."""
    latent_mean: list[float]
    """Per-channel mean of raw AE latents (subtracted before the dynamics model sees them)."""
    latent_std: list[float]
    """Per-channel std of raw AE latents (divided out before the dynamics model sees them)."""
    train_context_noise: float = 0.15
    """Upper bound of the context-noise augmentation used in training."""
    info: dict[str, Any] = field(default_factory=dict)
    """Provenance: training command, steps, wall time, final losses."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WeightsMeta:
        try:
            ae = dict(data["autoencoder"])
            ae["widths"] = tuple(ae["widths"])
            return cls(
                autoencoder=AutoencoderConfig(**ae),
                dynamics=DynamicsConfig(**data["dynamics"]),
                latent_mean=[float(v) for v in data["latent_mean"]],
                latent_std=[float(v) for v in data["latent_std"]],
                train_context_noise=float(data.get("train_context_noise", 0.15)),
                info=dict(data.get("info", {})),
            )
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"malformed tiny-world weights metadata: {exc!r}") from exc


def _half_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).contiguous().cpu()
        for k, v in module.state_dict().items()
    }


def save_weights(
    directory: Path, autoencoder: Autoencoder, dynamics: DynamicsTransformer, meta: WeightsMeta
) -> None:
    """Write both state dicts (fp16 storage) and the metadata JSON into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file(_half_state(autoencoder), str(directory / AE_FILE))
    save_file(_half_state(dynamics), str(directory / DYN_FILE))
    (directory / META_FILE).write_text(json.dumps(meta.to_json(), indent=2) + "\n")
    for name in (AE_FILE, DYN_FILE, META_FILE):
        (directory / name).chmod(0o644)  # package data: readable by everyone


def weights_available(directory: Path = WEIGHTS_DIR) -> bool:
    """Whether ``directory`` holds a complete set of weights."""
    return all((directory / f).is_file() for f in (AE_FILE, DYN_FILE, META_FILE))


def load_meta(directory: Path = WEIGHTS_DIR) -> WeightsMeta:
    """Read the metadata JSON of a weights directory."""
    path = directory / META_FILE
    if not path.is_file():
        raise ConfigError(
            f"no tiny-world weights at {directory} (missing {META_FILE}); train them with "
            "`python -m pipeline.tiny_world.train --out runs/tiny_world`"
        )
    return WeightsMeta.from_json(json.loads(path.read_text()))


def load_module(module: torch.nn.Module, path: Path) -> None:
    """Load a (fp16-stored) safetensors state dict into ``module``, keeping its dtypes."""
    if not path.is_file():
        raise ConfigError(
            f"missing tiny-world weights file {path}; train them with "
            "`python -m pipeline.tiny_world.train --out runs/tiny_world`"
        )
    own = module.state_dict()
    state = {k: v.to(own[k].dtype) if k in own else v for k, v in load_file(str(path)).items()}
    module.load_state_dict(state)


def load_weights(
    directory: Path = WEIGHTS_DIR,
) -> tuple[Autoencoder, DynamicsTransformer, WeightsMeta]:
    """Rebuild the autoencoder and dynamics transformer (fp32, eval mode) from ``directory``."""
    meta = load_meta(directory)
    if not weights_available(directory):
        raise ConfigError(f"incomplete tiny-world weights at {directory}: need {AE_FILE}, {DYN_FILE}")
    ae = Autoencoder(meta.autoencoder)
    dyn = DynamicsTransformer(meta.dynamics)
    for module, name in ((ae, AE_FILE), (dyn, DYN_FILE)):
        state = {
            k: v.float() if v.is_floating_point() else v for k, v in load_file(str(directory / name)).items()
        }
        module.load_state_dict(state)
        module.eval()
    return ae, dyn, meta
