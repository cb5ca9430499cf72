"""Identities: an Ed25519 signing key, an X25519 sealing key, and a public identity card.

A party's folder holds ``signing.key`` and ``sealing.key`` (raw 32-byte private keys, mode 0600)
and ``card.json`` (public). The card is what the other side pins (owner pins the entity) or
registers (the entity's ``--owners DIR`` holds one card file per admitted owner). The fingerprint
is the SHA-256 of the canonical JSON of both public keys, so it names the keys, not a label: a
card whose name or role is edited keeps its fingerprint, and a card whose keys are swapped gets a
new one.

CLI::

    python -m protocol.keys init --role owner|entity --dir DIR [--name NAME]
    python -m protocol.keys show --dir DIR        # or --card FILE
    python -m protocol.keys register --card OWNER_CARD --owners DIR [--fingerprint HEX]
"""

from __future__ import annotations

import argparse
import hashlib
import re
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from . import canonical
from ._files import atomic_write, read_regular
from ._wire.curves import ed25519_key_is_safe, x25519_key_is_safe
from ._wire.dsse import b64d, b64e
from .errors import AdmissionError, KeyFileError, SignatureError

__all__ = [
    "CARD_FILE",
    "CARD_TYPE",
    "Identity",
    "IdentityCard",
    "MAX_CARD_BYTES",
    "ROLES",
    "SEALING_FILE",
    "SIGNING_FILE",
    "admit",
    "fingerprint_of",
    "init_identity",
    "load_card",
    "load_identity",
    "load_registry",
    "main",
    "register_card",
]

ROLES = ("owner", "entity")
CARD_TYPE = "blindprune/identity-card/v1"
SIGNING_FILE = "signing.key"
SEALING_FILE = "sealing.key"
CARD_FILE = "card.json"
MAX_CARD_BYTES = 64 * 1024
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._@-]{0,63}$")


def fingerprint_of(signing_public: bytes, sealing_public: bytes) -> str:
    """SHA-256 (hex) over both public keys: the identity a registry and a signature name."""
    return hashlib.sha256(canonical.dumps({"sealing": b64e(sealing_public), "signing": b64e(signing_public)})).hexdigest()


@dataclass(frozen=True)
class IdentityCard:
    """The public half of an identity: what a peer pins or registers."""

    role: str
    name: str
    signing_public: bytes
    sealing_public: bytes

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise KeyFileError(f"identity card role must be owner or entity, got {self.role!r}")
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise KeyFileError(f"identity card name {self.name!r} is not a short plain name")
        if len(self.signing_public) != 32 or len(self.sealing_public) != 32:
            raise KeyFileError("identity card keys must be 32 bytes each (Ed25519, X25519)")
        if not ed25519_key_is_safe(bytes(self.signing_public)):
            raise KeyFileError("identity card signing key is not a valid full-order Ed25519 key (weak or malformed)")
        if not x25519_key_is_safe(bytes(self.sealing_public)):
            raise KeyFileError("identity card sealing key is a low-order X25519 key (weak)")

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.signing_public, self.sealing_public)

    @property
    def short(self) -> str:
        """First 16 hex digits of the fingerprint, for messages."""
        return self.fingerprint[:16]

    def verify_key(self) -> Ed25519PublicKey:
        return Ed25519PublicKey.from_public_bytes(self.signing_public)

    def seal_key(self) -> X25519PublicKey:
        return X25519PublicKey.from_public_bytes(self.sealing_public)

    def to_json(self) -> dict[str, Any]:
        return {
            "type": CARD_TYPE,
            "role": self.role,
            "name": self.name,
            "signing_public": b64e(self.signing_public),
            "sealing_public": b64e(self.sealing_public),
            "fingerprint": self.fingerprint,
        }

    def to_bytes(self) -> bytes:
        return canonical.dumps(self.to_json())

    @classmethod
    def from_json(cls, data: Any) -> IdentityCard:
        if not isinstance(data, dict) or data.get("type") != CARD_TYPE:
            raise KeyFileError(f"not an identity card (type must be {CARD_TYPE!r})")
        expected = {"type", "role", "name", "signing_public", "sealing_public", "fingerprint"}
        if set(data) != expected:
            raise KeyFileError(f"identity card fields must be exactly {sorted(expected)}")
        try:
            card = cls(
                role=data["role"],
                name=data["name"],
                signing_public=b64d(data["signing_public"], "signing_public"),
                sealing_public=b64d(data["sealing_public"], "sealing_public"),
            )
        except SignatureError as exc:
            raise KeyFileError(f"identity card: {exc}") from exc
        if data["fingerprint"] != card.fingerprint:
            raise KeyFileError("identity card fingerprint does not match its keys (edited card)")
        return card

    @classmethod
    def from_bytes(cls, data: bytes) -> IdentityCard:
        if len(data) > MAX_CARD_BYTES:
            raise KeyFileError("identity card file too large")
        try:
            return cls.from_json(canonical.loads(data))
        except canonical.CanonicalJSONError as exc:
            raise KeyFileError(f"identity card is not valid JSON: {exc}") from exc


@dataclass(frozen=True)
class Identity:
    """A party's own identity: its card plus private keys (kept out of ``repr``)."""

    card: IdentityCard
    signing_key: Ed25519PrivateKey = field(repr=False, compare=False)
    sealing_key: X25519PrivateKey = field(repr=False, compare=False)

    @property
    def fingerprint(self) -> str:
        return self.card.fingerprint

    @classmethod
    def generate(cls, role: str, name: str | None = None) -> Identity:
        """A fresh in-memory identity (tests, simulations); ``init_identity`` also writes it."""
        sign_key = Ed25519PrivateKey.generate()
        seal_key = X25519PrivateKey.generate()
        return cls._from_keys(role, name or role, sign_key, seal_key)

    @classmethod
    def from_private_bytes(cls, role: str, name: str, signing: bytes, sealing: bytes) -> Identity:
        """An identity from raw 32-byte private keys (golden test vectors, key import)."""
        if len(signing) != 32 or len(sealing) != 32:
            raise KeyFileError("private keys must be 32 bytes each")
        return cls._from_keys(role, name, Ed25519PrivateKey.from_private_bytes(signing), X25519PrivateKey.from_private_bytes(sealing))

    @classmethod
    def _from_keys(cls, role: str, name: str, sign_key: Ed25519PrivateKey, seal_key: X25519PrivateKey) -> Identity:
        card = IdentityCard(
            role=role,
            name=name,
            signing_public=sign_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw),
            sealing_public=seal_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw),
        )
        return cls(card=card, signing_key=sign_key, sealing_key=seal_key)


def _raw_private(key: Ed25519PrivateKey | X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def init_identity(directory: Path, role: str, name: str | None = None) -> Identity:
    """Create keys and a card in ``directory`` (created 0700). Refuses to overwrite any key file.

    On failure nothing is left behind that was not there before.
    """
    if role not in ROLES:
        raise KeyFileError(f"role must be owner or entity, got {role!r}")
    directory = Path(directory)
    identity = Identity.generate(role, name or role)
    targets = [directory / SIGNING_FILE, directory / SEALING_FILE, directory / CARD_FILE]
    for path in targets:
        if path.exists():
            raise KeyFileError(f"{path} already exists; refusing to overwrite an identity")
    created_dir = not directory.exists()
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyFileError(f"cannot create {directory}: {exc.strerror}") from exc
    written: list[Path] = []
    try:
        for path, data, mode in (
            (targets[0], _raw_private(identity.signing_key), 0o600),
            (targets[1], _raw_private(identity.sealing_key), 0o600),
            (targets[2], identity.card.to_bytes() + b"\n", 0o644),
        ):
            atomic_write(path, data, mode=mode, overwrite=False)
            written.append(path)
    except FileExistsError as exc:
        _remove(written, directory if created_dir else None)
        raise KeyFileError(f"{exc.filename or directory} appeared meanwhile; refusing to overwrite") from exc
    except OSError as exc:
        _remove(written, directory if created_dir else None)
        raise KeyFileError(f"cannot write identity to {directory}: {exc.strerror}") from exc
    return identity


def _remove(paths: list[Path], directory: Path | None) -> None:
    for path in paths:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
    if directory is not None:
        try:
            directory.rmdir()
        except OSError:
            pass


def _read_private(path: Path) -> bytes:
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise KeyFileError(f"{path} not found (run: python -m protocol.keys init --dir {path.parent})") from exc
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise KeyFileError(f"{path} is accessible by others (mode {stat.S_IMODE(st.st_mode):o}); chmod 600 it")
    data = read_regular(path, limit=64, error=KeyFileError, what="private key")  # a FIFO would hang read_bytes
    if len(data) != 32:
        raise KeyFileError(f"{path} is not a 32-byte private key")
    return data


def load_identity(directory: Path) -> Identity:
    """Load a party's keys and card, checking the card matches the private keys."""
    directory = Path(directory)
    sign_key = Ed25519PrivateKey.from_private_bytes(_read_private(directory / SIGNING_FILE))
    seal_key = X25519PrivateKey.from_private_bytes(_read_private(directory / SEALING_FILE))
    card = load_card(directory / CARD_FILE)
    identity = Identity._from_keys(card.role, card.name, sign_key, seal_key)
    if identity.card != card:
        raise KeyFileError(f"{directory / CARD_FILE} does not match the private keys next to it")
    return identity


def load_card(path: Path) -> IdentityCard:
    """Load one public identity card; errors name the file.

    Cards arrive from other parties (and sit in a registry folder anyone with write access can
    drop files into), so the file must be a regular file of at most ``MAX_CARD_BYTES``: a FIFO or
    device is refused without blocking, and a card padded to any size is refused after reading
    ``MAX_CARD_BYTES + 1`` bytes, never read whole.
    """
    path = Path(path)
    data = read_regular(path, limit=MAX_CARD_BYTES, error=KeyFileError, what="identity card")
    try:
        return IdentityCard.from_bytes(data.strip())
    except KeyFileError as exc:
        raise KeyFileError(f"{path}: {exc}") from exc


def load_registry(directory: Path, *, role: str | None = "owner") -> dict[str, IdentityCard]:
    """Every ``*.json`` card in ``directory``, keyed by fingerprint (the entity's ``--owners DIR``).

    A malformed card, or one of the wrong role, is an error naming the file: a registry that
    silently skipped a card would admit fewer parties than its operator believes, and one that
    admitted a card with the wrong role would confuse owners with entities. A ``*.json`` that is
    a FIFO, device or folder is such an error too (``load_card`` never blocks on it), so a file
    planted in the folder cannot hang the entity at startup.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise KeyFileError(f"registry {directory} is not a folder")
    registry: dict[str, IdentityCard] = {}
    for path in sorted(directory.glob("*.json")):
        card = load_card(path)
        if role is not None and card.role != role:
            raise KeyFileError(f"{path}: card role is {card.role}, registry holds {role} cards")
        registry[card.fingerprint] = card
    return registry


def register_card(card_path: Path, registry: Path, *, expected_fingerprint: str | None = None) -> tuple[IdentityCard, Path]:
    """Validate an owner's card and copy it into ``registry`` as ``<fingerprint[:16]>.json``.

    ``expected_fingerprint`` (full or a prefix of at least 16 hex digits, as read out by the owner
    over another channel) guards against a card swapped in transit.
    """
    card = load_card(card_path)
    if card.role != "owner":
        raise KeyFileError(f"{card_path}: card role is {card.role}; only owner cards are registered")
    if expected_fingerprint is not None:
        expected = expected_fingerprint.strip().lower()
        if len(expected) < 16 or not card.fingerprint.startswith(expected):
            raise KeyFileError(f"{card_path}: fingerprint {card.fingerprint[:16]} is not the expected {expected[:16]}")
    registry = Path(registry)
    registry.mkdir(mode=0o700, parents=True, exist_ok=True)
    target = registry / f"{card.fingerprint[:16]}.json"
    if target.exists():
        if load_card(target) == card:
            return card, target
        raise KeyFileError(f"{target} already holds another card")
    atomic_write(target, card.to_bytes() + b"\n", mode=0o644, overwrite=False)
    return card, target


def admit(fingerprint: str, registry: dict[str, IdentityCard], *, what: str = "owner") -> IdentityCard:
    """The registered card for ``fingerprint``, or ``AdmissionError`` with a message for both sides."""
    card = registry.get(fingerprint)
    if card is None:
        raise AdmissionError(
            f"{what} {fingerprint[:16]} is not registered with this entity: the {what} sends its card.json to the entity's operator, "
            f"who checks its fingerprint with the {what} and runs `python -m protocol.keys register --card CARD --owners HOME/owners`"
        )
    return card


# ---------------------------------------------------------------------------------------------- CLI


def _describe(card: IdentityCard) -> str:
    return f"{card.role} {card.name!r}\nfingerprint {card.fingerprint}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m protocol.keys", description="Manage blindprune identities.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_init = sub.add_parser("init", help="create signing + sealing keys and a public identity card")
    p_init.add_argument("--role", required=True, choices=ROLES)
    p_init.add_argument("--dir", required=True, type=Path, help="folder for the keys (created 0700)")
    p_init.add_argument("--name", default=None, help="a short label for the card (default: the role)")
    p_show = sub.add_parser("show", help="print an identity's role, name and fingerprint")
    src = p_show.add_mutually_exclusive_group(required=True)
    src.add_argument("--dir", type=Path, help="an identity folder")
    src.add_argument("--card", type=Path, help="a card file")
    p_reg = sub.add_parser("register", help="admit an owner: check its card and copy it into the registry folder")
    p_reg.add_argument("--card", required=True, type=Path, help="the owner's card.json")
    p_reg.add_argument("--owners", required=True, type=Path, help="the entity's registry folder (entity.serve --owners)")
    p_reg.add_argument("--fingerprint", default=None, help="the fingerprint the owner told you out of band; registration fails if it differs")
    args = parser.parse_args(argv)

    def body() -> int:
        if args.command == "init":
            identity = init_identity(args.dir, args.role, args.name)
            print(_describe(identity.card))
            print(f"public card: {args.dir / CARD_FILE} (give this file to the other party)")
        elif args.command == "register":
            card, path = register_card(args.card, args.owners, expected_fingerprint=args.fingerprint)
            print(_describe(card))
            print(f"registered: {path}")
        else:
            card = load_card(args.card) if args.card else load_identity(args.dir).card
            print(_describe(card))
        return 0

    from .cli import run_cli

    return run_cli("protocol.keys", body)


if __name__ == "__main__":
    sys.exit(main())
