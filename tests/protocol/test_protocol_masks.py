"""Bit-packed masks: exact round trip, one encoding per mask, strict decoding; and what a mask of
each layer kind may say (``check_result_masks``)."""

from __future__ import annotations

import struct

import pytest
import torch

from protocol import canonical
from protocol.errors import MaskError
from protocol.masks import MAGIC, check_result_masks, pack_masks, unpack_masks


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


# ------------------------------------------------------------------ what a mask may say, by layer kind
LIBRARY = torch.tensor(
    [[0, 1, 0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1, 0, 1, 0], [0, 1, 0, 1, 1, 0, 0, 1, 0], [1, 1, 0, 1, 1, 0, 0, 0, 0]], dtype=torch.bool
)
ROLES = {"pattern": {"conv.weight"}, "depthwise": {"dw.weight"}, "structured": {"pw.weight", "fc.weight"}}


def _honest() -> dict[str, torch.Tensor]:
    """A mask of each kind as the engine makes it: patterns (one kernel removed), patterns per channel, whole columns."""
    conv = LIBRARY[torch.arange(8 * 4) % 4].reshape(8, 4, 3, 3).clone()
    conv[0, 0] = False  # connectivity pruning: a whole kernel removed
    depthwise = LIBRARY[torch.arange(6) % 4].reshape(6, 1, 3, 3).clone()
    columns = torch.tensor([True, False, True, False, False, True])
    return {
        "conv.weight": conv,
        "dw.weight": depthwise,
        "pw.weight": columns.reshape(1, 6, 1, 1).expand(5, 6, 1, 1).clone(),
        "fc.weight": columns.reshape(1, 6).expand(3, 6).clone(),
    }


def test_honest_masks_of_every_kind_pass_and_are_counted_per_role() -> None:
    summary = check_result_masks(_honest(), **ROLES, library=LIBRARY)
    assert (summary.conv.total, summary.conv.kept) == (8 * 4 * 9, (8 * 4 - 1) * 4)
    assert (summary.depthwise.total, summary.depthwise.kept) == (6 * 9, 6 * 4)
    assert (summary.structured.total, summary.structured.kept) == (5 * 6 + 3 * 6, 5 * 3 + 3 * 3)
    assert summary.layers["fc.weight"] == (18, 9) and summary.removed == sum(t - k for t, k in summary.layers.values())


def test_structured_mask_that_cuts_a_column_in_part_is_refused() -> None:
    masks = _honest()
    masks["fc.weight"][1, 0] = False  # column 0 kept in rows 0 and 2 only
    with pytest.raises(MaskError, match="'fc.weight' cuts input column 0 in part"):
        check_result_masks(masks, **ROLES, library=LIBRARY)


def test_structured_mask_removing_output_rows_is_refused() -> None:
    masks = _honest()
    masks["pw.weight"][2] = False  # a whole output row: not the column rule
    with pytest.raises(MaskError, match="'pw.weight' cuts input column 0 in part"):
        check_result_masks(masks, **ROLES, library=LIBRARY)


def test_structured_mask_keeping_no_column_is_refused() -> None:
    masks = _honest()
    masks["fc.weight"][:] = False
    with pytest.raises(MaskError, match="'fc.weight' keeps no input column"):
        check_result_masks(masks, **ROLES, library=LIBRARY)


def test_depthwise_kernel_with_a_pattern_outside_the_library_is_refused() -> None:
    masks = _honest()
    outside = torch.zeros(9, dtype=torch.bool)
    outside[[0, 2, 4, 6]] = True  # four entries with the centre, but not a library pattern
    masks["dw.weight"][3, 0] = outside.reshape(3, 3)
    with pytest.raises(MaskError, match="'dw.weight' uses pattern .* not in the report's pattern library"):
        check_result_masks(masks, **ROLES, library=LIBRARY)


def test_depthwise_kernel_removed_whole_is_refused() -> None:
    masks = _honest()
    masks["dw.weight"][2] = False
    with pytest.raises(MaskError, match="'dw.weight' removes a whole depthwise kernel"):
        check_result_masks(masks, **ROLES, library=LIBRARY)


def test_depthwise_kernel_keeping_five_entries_is_refused() -> None:
    masks = _honest()
    masks["dw.weight"][0, 0, 2, 2] = True
    with pytest.raises(MaskError, match="'dw.weight' keeps kernel entries"):
        check_result_masks(masks, **ROLES, library=LIBRARY)


@pytest.mark.parametrize("name", ["dw.weight", "pw.weight", "fc.weight", "bn.weight"])
def test_mask_on_a_weight_outside_its_role_is_refused(name: str) -> None:
    """Each role's set holds only its own weights: a 3x3 pattern mask on a linear weight, say, is refused."""
    masks = {name: torch.ones(4, 1, 3, 3, dtype=torch.bool)}
    roles = {"pattern": {"conv.weight"}, "depthwise": set(), "structured": set()}
    with pytest.raises(MaskError, match=f"'{name}' is not on a prunable weight"):
        check_result_masks(masks, **roles, library=LIBRARY)


def test_depthwise_mask_of_a_full_conv_shape_is_refused() -> None:
    masks = {"dw.weight": LIBRARY[torch.arange(8) % 4].reshape(4, 2, 3, 3)}
    with pytest.raises(MaskError, match=r"not that of a depthwise 3x3 convolution weight \(C, 1, 3, 3\)"):
        check_result_masks(masks, **ROLES, library=LIBRARY)
