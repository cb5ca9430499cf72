"""Identities: key files, cards, registries, the keys CLI."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from protocol import canonical
from protocol.errors import AdmissionError, KeyFileError
from protocol.keys import (
    CARD_FILE,
    Identity,
    IdentityCard,
    admit,
    init_identity,
    load_card,
    load_identity,
    load_registry,
)

ROOT = Path(__file__).resolve().parents[2]


def test_init_writes_private_keys_0600_and_card_round_trips(tmp_path: Path) -> None:
    ident = init_identity(tmp_path / "owner", "owner", "alice")
    for name in ("signing.key", "sealing.key"):
        assert stat.S_IMODE((tmp_path / "owner" / name).stat().st_mode) == 0o600
    loaded = load_identity(tmp_path / "owner")
    assert loaded.card == ident.card
    assert load_card(tmp_path / "owner" / CARD_FILE).fingerprint == ident.fingerprint
    assert IdentityCard.from_bytes(ident.card.to_bytes()) == ident.card


def test_init_refuses_to_overwrite_an_identity(tmp_path: Path) -> None:
    first = init_identity(tmp_path, "entity")
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        init_identity(tmp_path, "entity")
    assert load_identity(tmp_path).fingerprint == first.fingerprint


def test_private_keys_never_appear_in_repr() -> None:
    ident = Identity.generate("owner")
    raw = ident.signing_key.private_bytes_raw()
    assert raw.hex() not in repr(ident) and "signing_key" not in repr(ident)


def test_group_readable_private_key_is_refused(tmp_path: Path) -> None:
    init_identity(tmp_path, "owner")
    os.chmod(tmp_path / "signing.key", 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_identity(tmp_path)


def test_card_with_swapped_key_or_edited_fingerprint_is_refused(tmp_path: Path) -> None:
    a, b = Identity.generate("owner"), Identity.generate("owner")
    data = a.card.to_json()
    data["signing_public"] = b.card.to_json()["signing_public"]
    with pytest.raises(KeyFileError, match="fingerprint does not match"):
        IdentityCard.from_json(data)


def test_fingerprint_names_the_keys_not_the_label() -> None:
    a = Identity.generate("owner", "alice")
    renamed = IdentityCard("owner", "bob", a.card.signing_public, a.card.sealing_public)
    assert renamed.fingerprint == a.fingerprint
    assert Identity.generate("owner", "alice").fingerprint != a.fingerprint


def test_registry_holds_every_card_and_admits_only_them(tmp_path: Path) -> None:
    owners = [Identity.generate("owner", f"o{i}") for i in range(3)]
    for i, o in enumerate(owners):
        (tmp_path / f"o{i}.json").write_bytes(o.card.to_bytes())
    registry = load_registry(tmp_path)
    assert set(registry) == {o.fingerprint for o in owners}
    assert admit(owners[1].fingerprint, registry) == owners[1].card
    stranger = Identity.generate("owner", "mallory")
    with pytest.raises(AdmissionError, match=stranger.fingerprint[:16]):
        admit(stranger.fingerprint, registry)


def test_registry_refuses_malformed_or_wrong_role_card_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_bytes(b"{not json")
    with pytest.raises(KeyFileError, match="bad.json"):
        load_registry(tmp_path)
    (tmp_path / "bad.json").unlink()
    (tmp_path / "ent.json").write_bytes(Identity.generate("entity").card.to_bytes())
    with pytest.raises(KeyFileError, match="ent.json"):
        load_registry(tmp_path)


def test_card_json_is_canonical() -> None:
    card = Identity.generate("entity").card
    assert canonical.dumps(canonical.loads(card.to_bytes())) == card.to_bytes()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "protocol.keys", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_keys_cli_init_show_and_refuse(tmp_path: Path) -> None:
    out = _cli("init", "--role", "owner", "--dir", str(tmp_path / "k"), "--name", "clinic")
    assert out.returncode == 0, out.stderr
    fp = load_identity(tmp_path / "k").fingerprint
    assert fp in out.stdout
    shown = _cli("show", "--card", str(tmp_path / "k" / CARD_FILE))
    assert shown.returncode == 0 and fp in shown.stdout
    again = _cli("init", "--role", "owner", "--dir", str(tmp_path / "k"))
    assert again.returncode == 1
    assert again.stderr.count("\n") == 1 and "Traceback" not in again.stderr
    bad = _cli("init", "--role", "king", "--dir", str(tmp_path / "x"))
    assert bad.returncode == 2


SMALL_ORDER_ED25519 = [
    "0100000000000000000000000000000000000000000000000000000000000000",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0000000000000000000000000000000000000000000000000000000000000080",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
]


@pytest.mark.parametrize("weak", SMALL_ORDER_ED25519)
def test_card_with_a_small_order_signing_key_is_refused(weak: str) -> None:
    good = Identity.generate("owner").card
    with pytest.raises(KeyFileError, match="full-order Ed25519"):
        IdentityCard("owner", "weak", bytes.fromhex(weak), good.sealing_public)


def test_small_order_signing_key_would_accept_a_forged_signature() -> None:
    """Why the check exists: under such a key one constant signature verifies for about a quarter
    of all messages, with no private key involved."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    weak = Ed25519PublicKey.from_public_bytes(bytes(32))
    forged = 0
    for i in range(32):
        try:
            weak.verify(bytes(64), b"message %d" % i)
            forged += 1
        except InvalidSignature:
            pass
    assert forged > 0


def test_card_with_a_low_order_sealing_key_is_refused() -> None:
    good = Identity.generate("owner").card
    for weak in ("00" * 32, "01" + "00" * 31, "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"):
        with pytest.raises(KeyFileError, match="low-order X25519"):
            IdentityCard("owner", "weak", good.signing_public, bytes.fromhex(weak))


def test_register_copies_a_checked_owner_card_into_the_registry(tmp_path: Path) -> None:
    owner = init_identity(tmp_path / "owner", "owner", "clinic")
    out = _cli(
        "register", "--card", str(tmp_path / "owner" / CARD_FILE), "--owners", str(tmp_path / "owners"), "--fingerprint", owner.fingerprint[:16]
    )
    assert out.returncode == 0, out.stderr
    assert set(load_registry(tmp_path / "owners")) == {owner.fingerprint}
    again = _cli("register", "--card", str(tmp_path / "owner" / CARD_FILE), "--owners", str(tmp_path / "owners"))
    assert again.returncode == 0  # idempotent


def test_register_refuses_a_wrong_fingerprint_or_an_entity_card(tmp_path: Path) -> None:
    init_identity(tmp_path / "owner", "owner")
    init_identity(tmp_path / "entity", "entity")
    wrong = _cli("register", "--card", str(tmp_path / "owner" / CARD_FILE), "--owners", str(tmp_path / "owners"), "--fingerprint", "0" * 16)
    assert wrong.returncode == 1 and "not the expected" in wrong.stderr
    entity = _cli("register", "--card", str(tmp_path / "entity" / CARD_FILE), "--owners", str(tmp_path / "owners"))
    assert entity.returncode == 1 and "only owner cards" in entity.stderr
    assert not (tmp_path / "owners").exists() or not list((tmp_path / "owners").glob("*.json"))
