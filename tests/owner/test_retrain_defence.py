"""The opt-in membership defence of masked retraining (Nasr et al.'s min-max game)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from owner.privacy.attacks import auc, loss_score
from owner.retrain import MembershipDefence, masked_retrain
from protocol.spec import RetrainRecipe
from tests.owner.privacy_helpers import tiny_mlp

RECIPE = RetrainRecipe(lr=0.05, epochs=30, batch_size=50)


def _data(seed: int, n: int = 200) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))


def _retrain(defence: MembershipDefence | None, epochs: int = 30) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = tiny_mlp(64)
    masks = {"1.weight": torch.rand(32, 64, generator=torch.Generator().manual_seed(1)) > 0.5}
    loader = DataLoader(_data(1), batch_size=50, shuffle=True, generator=torch.Generator().manual_seed(0))
    reference = DataLoader(_data(2), batch_size=50, shuffle=True, generator=torch.Generator().manual_seed(1)) if defence else None
    masked_retrain(model, masks, loader, RECIPE, epochs=epochs, defence=defence, defence_reference=reference)
    return model.eval(), masks


def _membership_auc(model: torch.nn.Module) -> float:
    with torch.no_grad():
        (xm, ym), (xn, yn) = _data(1).tensors, _data(3).tensors
        members = loss_score(model(xm).double().numpy(), ym.numpy())
        non_members = loss_score(model(xn).double().numpy(), yn.numpy())
    return auc(members, non_members)


@pytest.fixture(scope="module")
def runs(one_thread: None) -> dict[str, tuple[torch.nn.Module, dict[str, torch.Tensor]]]:
    return {"off": _retrain(None), "on": _retrain(MembershipDefence(seed=0))}  # the default settings


def test_the_defence_lowers_what_a_loss_attack_finds_and_keeps_masked_weights_zero(runs: dict) -> None:
    off, on = _membership_auc(runs["off"][0]), _membership_auc(runs["on"][0])
    assert off > 0.8, off  # retraining memorised its 200 random-label images
    assert on < off - 0.05, (on, off)
    model, masks = runs["on"]
    assert int(torch.count_nonzero(model[1].weight.detach()[~masks["1.weight"]])) == 0


def test_without_the_defence_retraining_is_unchanged_by_its_arguments() -> None:
    plain, _ = _retrain(None, epochs=2)
    torch.manual_seed(0)
    again = tiny_mlp(64)
    masks = {"1.weight": torch.rand(32, 64, generator=torch.Generator().manual_seed(1)) > 0.5}
    loader = DataLoader(_data(1), batch_size=50, shuffle=True, generator=torch.Generator().manual_seed(0))
    masked_retrain(again, masks, loader, RECIPE, epochs=2)  # no defence arguments at all
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), again.state_dict().values(), strict=True))


def test_the_defence_leaves_the_global_random_stream_as_it_finds_it() -> None:
    torch.manual_seed(5)
    _retrain(MembershipDefence(seed=9), epochs=1)
    after_defence = torch.rand(3)
    torch.manual_seed(5)
    _retrain(None, epochs=1)
    assert torch.equal(after_defence, torch.rand(3))


def test_the_defence_needs_a_reference_set_and_sane_settings() -> None:
    model = tiny_mlp(64)
    with pytest.raises(ValueError, match="defence_reference"):
        masked_retrain(model, {}, DataLoader(_data(1), batch_size=50), RECIPE, epochs=1, defence=MembershipDefence())
    with pytest.raises(ValueError, match="weight > 0"):
        MembershipDefence(weight=0)
    assert np.isfinite(_membership_auc(model))
