"""The owner's whole-model rate: the flag and owner.toml key, the plan that refuses before sending,
and masked retraining that keeps depthwise and column masks."""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console
from torch import nn

from owner.run import OwnerError, _parser, load_config
from owner.stages import plan_stage
from protocol.spec import PruneRequest

REQUIRED = [
    "--data",
    "d",
    "--model",
    "m:f",
    "--entity-card",
    "c.json",
    "--input-shape",
    "3,16,16",
    "--mean",
    "0.5,0.5,0.5",
    "--std",
    "0.25,0.25,0.25",
]


class _Mobile(nn.Module):
    """Stem, a depthwise 3x3 + 1x1 pair, a linear head; optionally a group-1 3x3 conv."""

    def __init__(self, with_3x3: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 2, 1)
        self.dw = nn.Conv2d(16, 16, 3, 1, 1, groups=16)
        self.pw = nn.Conv2d(16, 32, 1)
        self.conv = nn.Conv2d(32, 32, 3, 1, 1) if with_3x3 else nn.Identity()
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(torch.relu(self.pw(torch.relu(self.dw(torch.relu(self.stem(x)))))))
        return self.head(x.mean(dim=(2, 3)))


def _config(tmp_path, monkeypatch, *flags: str):
    monkeypatch.chdir(tmp_path)  # no owner.toml here
    return load_config(_parser().parse_args([*REQUIRED, *flags]))


def _console() -> Console:
    return Console(file=io.StringIO(), width=200)


def test_model_rate_flag_reaches_the_request_and_the_conv_rate_follows_it(tmp_path, monkeypatch):
    config = _config(tmp_path, monkeypatch, "--model-rate", "12")
    assert (config.model_rate, config.rate) == (12.0, 12.0)
    assert PruneRequest(config.rate, model_rate=config.model_rate).to_json()["model_rate"] == "12"
    explicit = _config(tmp_path, monkeypatch, "--model-rate", "12", "--rate", "6")
    assert (explicit.model_rate, explicit.rate) == (12.0, 6.0)
    assert _config(tmp_path, monkeypatch).model_rate is None


def test_model_rate_is_read_from_owner_toml(tmp_path, monkeypatch):
    (tmp_path / "owner.toml").write_text("[owner]\nmodel_rate = 5.0\nrate = 4.0\n")
    config = _config(tmp_path, monkeypatch)
    assert (config.model_rate, config.rate) == (5.0, 4.0)


def test_plan_refuses_a_depthwise_only_model_without_a_model_rate(tmp_path, monkeypatch):
    program = torch.export.export(_Mobile().eval(), (torch.randn(1, 3, 16, 16),))
    with pytest.raises(OwnerError, match="has none to prune.*--model-rate R to prune.*nothing was sent"):
        plan_stage(_config(tmp_path, monkeypatch), program, _console())
    console = _console()
    plan = plan_stage(_config(tmp_path, monkeypatch, "--model-rate", "2"), program, console)
    assert {p.weight: p.pruning for p in plan if p.pruned} == {"dw.weight": "pattern", "pw.weight": "columns", "head.weight": "columns"}
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "columns  pw.weight" in text and "dense  stem.weight" in text and "whole model at 2x" in text


def test_plan_refuses_a_model_rate_out_of_reach_naming_the_range(tmp_path, monkeypatch):
    program = torch.export.export(_Mobile(with_3x3=True).eval(), (torch.randn(1, 3, 16, 16),))
    with pytest.raises(OwnerError, match=r"--model-rate 300 cannot be met at --rate 4: the whole-model rate is between \d+\.\d+x and \d+\.\d+x"):
        plan_stage(_config(tmp_path, monkeypatch, "--model-rate", "300", "--rate", "4"), program, _console())


def test_masked_retraining_keeps_depthwise_and_column_masks(one_thread):
    from entity.pruning import PruneConfig, prune
    from owner.retrain import check_masks, masked_retrain
    from protocol.spec import InputSpec, RetrainRecipe

    torch.manual_seed(0)
    model = _Mobile(with_3x3=True).eval()
    spec = InputSpec((3, 16, 16), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "RGB")
    program = torch.export.export(model, (torch.randn(2, 3, 16, 16),))
    result = prune(program, spec, PruneConfig(rate=4.0, model_rate=3.0, recipe="oneshot", eval_images=2))
    assert {"dw.weight", "pw.weight", "head.weight"} <= set(result.masks)
    model.load_state_dict(result.state_dict)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 16, 16, generator=g)
    loader = [(x[i : i + 8], torch.randint(0, 10, (8,), generator=g)) for i in range(0, 32, 8)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masked_retrain(model, result.masks, loader, RetrainRecipe(epochs=1, lr=0.05, milestones=()))
    check_masks(model, result.masks)
    for key, mask in result.masks.items():
        weight = model.state_dict()[key]
        assert int(torch.count_nonzero(weight[~mask])) == 0
        assert not torch.equal(weight, before[key])  # the kept weights did train
