"""Layer-wise data for the solvers: what a conv sees in the pruned model, what it should produce.

Every layer-wise recipe fits layer n with inputs taken from the model whose earlier layers are
already pruned (fitting on the dense model's activations ignores the error upstream layers have
introduced and measured far worse here), and targets taken from the dense model on the same
synthetic images.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import fx

from .graph import ConvLayer, Layer, get_tensor, record


def pairs(
    work: fx.GraphModule, dense: fx.GraphModule, layer: Layer, x: torch.Tensor, chunk: int = 128
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input of the layer in ``work``, output of the layer in ``dense``) for chunks of ``x``."""
    with torch.no_grad():
        for part in x.split(chunk):
            if work is dense:
                seen = record(dense, part, {f"in:{layer.node}", layer.node}, stop_after=layer.node)
                yield seen[f"in:{layer.node}"], seen[layer.node]
                continue
            xin = record(work, part, {f"in:{layer.node}"}, stop_after=layer.node)[f"in:{layer.node}"]
            y = record(dense, part, {layer.node}, stop_after=layer.node)[layer.node]
            yield xin, y


def tail(model: fx.GraphModule, layer: ConvLayer, y: torch.Tensor) -> torch.Tensor:
    """What follows the conv inside its "layer": inference BatchNorm (if any) then ReLU (if any)."""
    if layer.bn is not None:
        bn = layer.bn
        weight = get_tensor(model, bn.weight) if bn.weight else None
        bias = get_tensor(model, bn.bias) if bn.bias else None
        y = torch.nn.functional.batch_norm(y, get_tensor(model, bn.running_mean), get_tensor(model, bn.running_var), weight, bias, False, 0.0, bn.eps)
    if layer.relu:
        y = torch.relu(y)
    return y


def unfold(layer: ConvLayer, x: torch.Tensor) -> torch.Tensor:
    """im2col: rows are output positions, columns the layer's (in-channel, ky, kx) inputs."""
    if isinstance(layer.padding, str):
        raise ValueError("string padding is not supported by the least-squares solver")
    cols = torch.nn.functional.unfold(x, layer.shape[2:], dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])
