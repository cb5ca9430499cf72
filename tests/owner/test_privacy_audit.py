"""The membership-inference audit end to end: it finds memorisation, stays at chance without it,
records a verifiable local-only event, and refuses data it cannot audit in one line."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from owner.privacy.auditing import AuditSettings, PrivacyAuditError, Split, Target, check_split, make_split, run_audit, state_sha256
from owner.privacy.reading import ATTACKS
from tests.owner.privacy_helpers import tiny_mlp

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = AuditSettings(
    reference_models=2, reference_epochs=5, members=150, population=100, bootstrap=30, min_reference_images=50, min_non_members=50
)


def _random_split(seed: int, n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))


def _fit(data: TensorDataset, steps: int = 400) -> torch.nn.Module:
    """Memorise ``data`` (random labels: nothing to learn but the images themselves)."""
    torch.manual_seed(0)
    model = tiny_mlp(64)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = data.tensors
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def audits(one_thread: None) -> dict[str, dict[str, float]]:
    train, test = _random_split(1, 700), _random_split(2, 200)
    overfit, unseen = _fit(train), _fit(_random_split(3, 700))
    targets = [Target("overfit", overfit, state_sha256(overfit.state_dict())), Target("unseen", unseen, state_sha256(unseen.state_dict()))]
    result = run_audit(targets, lambda: tiny_mlp(64), train, test, SETTINGS)
    return {m.name: {a: m.estimates[a]["auc"].value for a in ATTACKS} for m in result.models}


def test_attacks_on_a_model_that_memorised_its_members_reach_a_high_auc(audits: dict[str, dict[str, float]]) -> None:
    overfit = audits["overfit"]
    for attack in ("loss", "entropy", "lira", "rmia"):
        assert overfit[attack] > 0.85, (attack, overfit)
    assert overfit["confidence"] > 0.65, overfit


def test_attacks_on_a_model_that_never_saw_the_members_stay_near_chance(audits: dict[str, dict[str, float]]) -> None:
    for attack, value in audits["unseen"].items():
        assert abs(value - 0.5) < 0.1, (attack, value)


def test_the_same_seed_gives_the_same_audit(one_thread: None) -> None:
    train, test = _random_split(4, 500), _random_split(5, 150)
    target = _fit(train, steps=50)
    settings = AuditSettings(
        reference_models=2, reference_epochs=1, members=100, population=50, bootstrap=5, min_reference_images=50, min_non_members=50, seed=3
    )

    def once() -> dict:
        (model,) = run_audit([Target("t", target, "")], lambda: tiny_mlp(64), train, test, settings).models
        return {a: model.estimates[a] for a in ATTACKS}

    assert once() == once()


def test_no_held_out_split_or_too_few_images_are_refused_naming_the_fix() -> None:
    with pytest.raises(PrivacyAuditError, match="no held-out split.*test/"):
        make_split(1000, 0, AuditSettings())
    with pytest.raises(PrivacyAuditError, match="too few training images for 8 reference models.*lower --reference-models"):
        make_split(3000, 1000, AuditSettings(reference_models=8))
    with pytest.raises(PrivacyAuditError, match="held-out split has 20 images"):
        make_split(3000, 20, AuditSettings())


def test_split_is_disjoint_and_reproducible_from_the_seed() -> None:
    a, b = make_split(6000, 1000, AuditSettings(seed=4)), make_split(6000, 1000, AuditSettings(seed=4))
    train_parts = [a.members, a.population, *a.references]
    joined = np.concatenate(train_parts)
    assert len(np.unique(joined)) == len(joined)
    assert all(np.array_equal(x, y) for x, y in zip(train_parts, [b.members, b.population, *b.references], strict=True))
    assert not np.array_equal(a.members, make_split(6000, 1000, AuditSettings(seed=5)).members)


def test_a_given_split_is_audited_as_given(one_thread: None) -> None:
    """A target fitted on only the first 150 training images: a split naming those as members
    finds them; the same split with 150 images it never saw as members stays at chance."""
    train, test = _random_split(6, 800), _random_split(7, 200)
    target = _fit(TensorDataset(*(t[:150] for t in train.tensors)))
    settings = AuditSettings(reference_models=2, reference_epochs=5, members=150, population=100, bootstrap=0, min_reference_images=50)
    rest = np.arange(300, 800)

    def loss_auc(members: np.ndarray) -> float:
        split = Split(members, np.arange(150), rest[:100], (rest[100:300], rest[300:500]))
        result = run_audit([Target("t", target, "")], lambda: tiny_mlp(64), train, test, settings, split=split)
        (model,) = result.models
        assert len(model.scores["loss"][0]) == 150 and result.logits["target:t"].shape == (300, 10)
        assert result.logits["references"].shape == (2, 300, 10)
        return model.estimates["loss"]["auc"].value

    assert loss_auc(np.arange(150)) > 0.85
    assert abs(loss_auc(np.arange(150, 300)) - 0.5) < 0.1


def test_a_given_split_that_overlaps_or_leaves_the_data_is_refused() -> None:
    parts = np.arange(100), np.arange(100), np.arange(100, 150), (np.arange(150, 250),)
    assert check_split(Split(*parts), 250, 100).members is parts[0]
    with pytest.raises(PrivacyAuditError, match="share training images"):
        check_split(Split(parts[0], parts[1], np.arange(90, 150), parts[3]), 250, 100)
    with pytest.raises(PrivacyAuditError, match="non-members are empty or outside the 50 images"):
        check_split(Split(*parts), 250, 50)
    with pytest.raises(PrivacyAuditError, match="reference subset 1 repeat an image"):
        check_split(Split(*parts[:3], (np.r_[np.arange(150, 200), 150],)), 250, 100)
    with pytest.raises(PrivacyAuditError, match="no reference subsets"):
        check_split(Split(*parts[:3], ()), 250, 100)


# ------------------------------------------------------------------------------------ the CLI


@pytest.fixture(scope="module")
def owner_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An owner.run-like OUT (audit log, received/, final/) for a tiny model on the demo's data."""
    from safetensors.torch import save_file

    from owner.model import export_model
    from protocol.artifact import dump_tensors, save_model_dir
    from protocol.audit import AuditLog
    from protocol.keys import init_identity, load_identity
    from protocol.spec import InputSpec

    root = tmp_path_factory.mktemp("owner")
    raw = root / "data" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for packed in (ROOT / "simulations" / "assets" / "FashionMNIST" / "raw").glob("*.gz"):
        (raw / packed.stem).write_bytes(gzip.decompress(packed.read_bytes()))
    init_identity(root / "keys", "owner", name="clinic")
    out = root / "out"
    out.mkdir()
    with AuditLog.open(out / "audit.jsonl", load_identity(root / "keys")) as log:
        log.append("job.started", {"purpose": "test"})
        log.checkpoint()
    torch.manual_seed(0)
    model = tiny_mlp().eval()
    save_file(model.state_dict(), str(root / "dense.safetensors"))
    (out / "received").mkdir()
    (out / "received" / "weights.safetensors").write_bytes(dump_tensors(model.state_dict()))
    save_model_dir(out / "final", export_model(model, InputSpec((1, 28, 28), (0.286,), (0.353,), "L")))
    return root


def _audit(root: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    args = ["--out", str(root / "out"), "--keys", str(root / "keys"), "--data", str(root / "data")]
    args += ["--model", "tests.owner.privacy_helpers:tiny_mlp", "--weights", str(root / "dense.safetensors")]
    args += ["--input-shape", "1,28,28", "--mean", "0.286", "--std", "0.353", "--quiet"]
    cmd = [sys.executable, "-m", "owner.privacy", "audit", *args, *extra]
    return subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def _report(root: Path, *fmt: str) -> subprocess.CompletedProcess[str]:
    log = root / "out" / "audit.jsonl"
    cmd = [sys.executable, "-m", "owner.audit", "report", str(log), "--owner", str(root / "keys" / "card.json"), "--allow-unanchored", *fmt]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env={"COLUMNS": "80", "PATH": "/usr/bin:/bin"})


def test_cli_audit_records_a_local_only_event_that_verifies_and_every_report_format_shows(owner_out: Path) -> None:
    small = (
        "--members",
        "100",
        "--reference-models",
        "2",
        "--reference-epochs",
        "1",
        "--reference-images",
        "200",
        "--population",
        "100",
        "--bootstrap",
        "10",
    )
    done = _audit(owner_out, *small)
    assert done.returncode == 0, done.stderr[-2000:]
    paths = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(paths["privacy/roc.png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(line) for line in (owner_out / "out" / "audit.jsonl").read_text().splitlines()]
    event = next(r for r in records if r["event"] == "privacy.audit")
    assert event["details"]["local_only"] is True and event["details"]["sent_anywhere"] is False
    assert [m["model"] for m in event["details"]["models"]] == ["dense", "pruned", "final"]
    assert records[-1]["event"] == "checkpoint" and records[-1]["seq"] == event["seq"] + 1
    verify = subprocess.run(
        [sys.executable, "-m", "owner.audit", "verify", str(owner_out / "out" / "audit.jsonl"), "--owner", str(owner_out / "keys" / "card.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert verify.returncode == 0 and verify.stdout.startswith("OK:"), verify.stdout + verify.stderr
    terminal = _report(owner_out)
    assert terminal.returncode == 0 and "Membership-inference audit" in terminal.stdout and "rmia" in terminal.stdout
    assert "What they do not prove" in terminal.stdout
    html = _report(owner_out, "--html").stdout
    assert "data:image/png;base64," in html and "SHA-256 matches the audit event" in html
    csv_text = _report(owner_out, "--csv").stdout
    assert "model,held_out_accuracy,attack,auc,auc_low,auc_high" in csv_text and ",final," in csv_text
    report = json.loads(_report(owner_out, "--json").stdout)
    (audit,) = report["privacy_audits"]
    assert audit["local_only"] is True and any("final model" in line for line in audit["plain_reading"])


def test_cli_with_too_few_images_for_the_reference_models_is_one_line(owner_out: Path) -> None:
    done = _audit(owner_out, "--reference-models", "40", "--members", "1000")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("owner.privacy: error: too few training images for 40 reference models") and "--reference-models" in line


def test_cli_without_an_audit_log_is_one_line(owner_out: Path, tmp_path: Path) -> None:
    done = _audit(owner_out, "--out", str(tmp_path))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "audit.jsonl" in line and "run owner.run" in line
