"""The owner's model: built from the owner's own code, loaded from local weights, then exported.

The factory is an import path (``package.module:function``) with keyword arguments; the weights
are safetensors, or a local ``.pt`` state dict read with ``torch.load(weights_only=True)`` (the
owner's own file, never received bytes). Only the exported graph and tensors ever leave.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from protocol.artifact import ArtifactError, load_tensors
from protocol.spec import InputSpec


class ModelError(ValueError):
    """The model cannot be built, loaded or exported."""


def load_factory(path: str):
    """Resolve ``package.module:function`` to a callable."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ModelError(f"model factory {path!r} must look like package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(f"cannot import {module_name!r} for model factory {path!r}: {exc}") from exc
    factory: Any = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ModelError(f"{module_name!r} has no attribute {attr!r}")
    if not callable(factory):
        raise ModelError(f"model factory {path!r} is not callable")
    return factory


def build_model(factory: str, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    try:
        model = load_factory(factory)(**dict(kwargs or {}))
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"model factory {factory!r} failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"model factory {factory!r} returned a {type(model).__name__}, not a torch module")
    return model


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Weights from safetensors, or from a local .pt state dict with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_tensors(path.read_bytes())
        except ArtifactError as exc:
            raise ModelError(f"weights file {path}: {exc}") from exc
    if path.suffix in {".pt", ".pth"}:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ModelError(f"weights file {path} is not a plain state dict ({type(exc).__name__}: {exc})") from exc
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ModelError(f"weights file {path} does not hold a state dict of tensors")
        return state
    raise ModelError(f"weights file {path}: use .safetensors (or a local .pt/.pth state dict)")


def load_weights(model: nn.Module, path: Path) -> None:
    """Load ``path`` into ``model``; a file that does not fit is one line naming the first tensor
    that differs (and, where only the output count differs, the kwarg that usually fixes it)."""
    state = read_state_dict(path)
    own = model.state_dict()
    for name, tensor in state.items():
        mine = own.get(name)
        if mine is None or tuple(mine.shape) == tuple(tensor.shape):
            continue
        hint = ""
        if mine.dim() == tensor.dim() >= 1 and tuple(mine.shape[1:]) == tuple(tensor.shape[1:]):
            hint = f"; if the model takes a class count, pass it: --model-kwargs '{{\"num_classes\": {tensor.shape[0]}}}'"
        raise ModelError(
            f"weights file {path} does not fit the model: {name} is {list(tensor.shape)} in the file, {list(mine.shape)} in the model{hint}"
        )
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ModelError(f"weights file {path} does not fit the model: missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}")


def export_model(model: nn.Module, spec: InputSpec) -> torch.export.ExportedProgram:
    """Export in eval mode with a dynamic batch dimension (what the entity and codegen receive)."""
    model = model.eval()
    example = torch.zeros(2, *spec.shape)
    try:
        with torch.no_grad():
            model(example)
    except Exception as exc:
        raise ModelError(f"model does not accept inputs of shape {tuple(spec.shape)}: {type(exc).__name__}: {exc}") from exc
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    except Exception as exc:
        raise ModelError(f"torch.export failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
