"""Bit-packed masks: exact round trip, one encoding per mask, strict decoding."""

from __future__ import annotations

import struct

import pytest
import torch

from protocol import canonical
from protocol.errors import MaskError
from protocol.masks import MAGIC, pack_masks, unpack_masks


def test_round_trip_preserves_names_shapes_and_bits() -> None:
    torch.manual_seed(1)
    masks = {"layer1.0.conv1.weight": torch.rand(8, 4, 3, 3) > 0.5, "fc.weight": (torch.rand(10, 7) > 0.3).float(), "empty": torch.zeros(0, 3)}
    out = unpack_masks(pack_masks(masks))
    assert set(out) == set(masks)
    for name, mask in masks.items():
        assert out[name].dtype == torch.bool and out[name].shape == mask.shape
        assert torch.equal(out[name], mask.bool())


def test_packing_uses_one_bit_per_weight() -> None:
    data = pack_masks({"w": torch.ones(64, 64, 3, 3, dtype=torch.bool)})
    assert len(data) < 64 * 64 * 9 // 8 + 200


def test_packing_is_deterministic_regardless_of_insertion_order() -> None:
    a, b = torch.rand(5, 5) > 0.5, torch.rand(3) > 0.5
    assert pack_masks({"a": a, "b": b}) == pack_masks({"b": b, "a": a.float()})


def test_non_binary_or_nan_masks_are_refused() -> None:
    with pytest.raises(MaskError, match="other than 0 and 1"):
        pack_masks({"w": torch.tensor([0.0, 0.5])})
    with pytest.raises(MaskError, match="non-finite"):
        pack_masks({"w": torch.tensor([0.0, float("nan")])})


def _frame(header: dict, body: bytes) -> bytes:
    raw = canonical.dumps(header)
    return MAGIC + struct.pack(">I", len(raw)) + raw + body


def test_malformed_packed_masks_are_refused() -> None:
    good = pack_masks({"w": torch.tensor([True, False, True])})
    with pytest.raises(MaskError, match="magic"):
        unpack_masks(b"XX" + good[2:])
    with pytest.raises(MaskError, match="trailing"):
        unpack_masks(good + b"\0")
    with pytest.raises(MaskError, match="padding"):
        unpack_masks(_frame({"tensors": [{"name": "w", "shape": [3], "offset": 0, "nbytes": 1}]}, bytes([0b10100001])))
    with pytest.raises(MaskError, match="inconsistent"):
        unpack_masks(_frame({"tensors": [{"name": "w", "shape": [300], "offset": 0, "nbytes": 1}]}, b"\0"))
    with pytest.raises(MaskError, match="sorted"):
        header = {"tensors": [{"name": "b", "shape": [1], "offset": 0, "nbytes": 1}, {"name": "a", "shape": [1], "offset": 1, "nbytes": 1}]}
        unpack_masks(_frame(header, b"\0\0"))
    with pytest.raises(MaskError, match="out of bounds"):
        unpack_masks(MAGIC + struct.pack(">I", 2**31) + b"{}")
