"""Identity cards and key files against hostile files (issue 9): a FIFO, a device or a folder where
a card or key is expected is refused at once, never waited on; an oversized card is refused
without being read whole."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import pytest

from protocol.errors import KeyFileError
from protocol.keys import MAX_CARD_BYTES, Identity, init_identity, load_card, load_identity, load_registry
from tests.helpers import unblock_fifo, within


def test_fifo_as_card_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "card.json"
    os.mkfifo(fifo)
    error = within(10, lambda: load_card(fifo), unblock_fifo(fifo)).get("error")
    assert isinstance(error, KeyFileError) and "FIFO" in str(error) and str(fifo) in str(error)


def test_fifo_in_the_registry_is_an_error_naming_the_file_not_a_hang(tmp_path: Path) -> None:
    (tmp_path / "good.json").write_bytes(Identity.generate("owner").card.to_bytes())
    fifo = tmp_path / "planted.json"
    os.mkfifo(fifo)
    error = within(10, lambda: load_registry(tmp_path), unblock_fifo(fifo)).get("error")
    assert isinstance(error, KeyFileError) and "planted.json" in str(error) and "not a regular file" in str(error)


def test_folder_named_like_a_card_in_the_registry_is_refused(tmp_path: Path) -> None:
    (tmp_path / "sub.json").mkdir()
    with pytest.raises(KeyFileError, match=r"sub\.json is a folder"):
        load_registry(tmp_path)


def test_device_as_card_is_refused(tmp_path: Path) -> None:
    link = tmp_path / "card.json"
    link.symlink_to("/dev/null")
    with pytest.raises(KeyFileError, match="character device"):
        load_card(link)


def test_fifo_as_private_key_is_refused_without_blocking(tmp_path: Path) -> None:
    init_identity(tmp_path, "owner")
    key = tmp_path / "signing.key"
    key.unlink()
    os.mkfifo(key, 0o600)
    error = within(10, lambda: load_identity(tmp_path), unblock_fifo(key)).get("error")
    assert isinstance(error, KeyFileError) and "FIFO" in str(error)


def test_card_padded_to_100_mb_is_refused_without_being_read_whole(tmp_path: Path) -> None:
    card = tmp_path / "card.json"
    with card.open("wb") as handle:
        handle.write(Identity.generate("owner").card.to_bytes())
        handle.seek(100 * 1024 * 1024 - 1)  # a sparse file: 100 MB long, no disk or time spent on it
        handle.write(b" ")
    tracemalloc.start()
    try:
        with pytest.raises(KeyFileError, match="larger than"):
            load_card(card)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * MAX_CARD_BYTES


def test_card_with_whitespace_padding_past_the_cap_is_refused_and_a_little_padding_is_not(tmp_path: Path) -> None:
    good = Identity.generate("owner").card
    card = tmp_path / "card.json"
    card.write_bytes(good.to_bytes() + b" " * (MAX_CARD_BYTES + 1))
    with pytest.raises(KeyFileError, match=f"larger than {MAX_CARD_BYTES} bytes"):
        load_card(card)
    card.write_bytes(b"\n" + good.to_bytes() + b" " * 1000 + b"\n")
    assert load_card(card) == good
