"""The pickle scan (``protocol._pickles``): bounded work on hostile archives, no false alarm on safetensors."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import time
import tracemalloc
import zipfile

import pytest
import torch
from safetensors.torch import save as st_save

from protocol._wire.pickles import ScanLimits, reject_pickles
from protocol._wire.safetensors import parse_header
from protocol.artifact import load_tensors
from protocol.errors import ArtifactError

MiB = 1024 * 1024


def _zip(entries: dict[str, bytes], compression: int) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _scan_peak(data: bytes, limits: ScanLimits | None = None) -> tuple[BaseException | None, int, float]:
    """(the error the scan raised, the peak of Python allocations during it, seconds)."""
    tracemalloc.start()
    started = time.perf_counter()
    error: BaseException | None = None
    try:
        reject_pickles("bundle.bin", data, *(() if limits is None else (limits,)))
    except ArtifactError as exc:
        error = exc
    finally:
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return error, peak, elapsed


@pytest.fixture(scope="module")
def nested_bomb() -> bytes:
    """A 40 KiB zip whose one entry is a 40 MiB zip (stored zeros): 1000x compression."""
    inner = _zip({"zeros.bin": bytes(40 * MiB)}, zipfile.ZIP_STORED)
    return _zip({"inner.zip": inner}, zipfile.ZIP_DEFLATED)


def test_nested_zip_bomb_is_refused_before_it_is_inflated(nested_bomb):
    assert len(nested_bomb) < MiB
    error, peak, elapsed = _scan_peak(nested_bomb)
    assert error is not None and "compression" in str(error) and "inner.zip" in str(error)
    assert peak < 4 * MiB, f"the scan allocated {peak} bytes"
    assert elapsed < 2.0


def test_inflation_stops_at_the_scan_budget_even_when_the_ratio_is_allowed(nested_bomb):
    limits = ScanLimits(max_ratio=10**9, max_inflated=8 * MiB)
    error, peak, _ = _scan_peak(nested_bomb, limits)
    assert error is not None and f"limit of {8 * MiB} bytes" in str(error)
    assert peak < 20 * MiB, f"the scan allocated {peak} bytes"


def test_the_inflation_budget_covers_the_whole_scan_not_each_archive():
    nested = _zip({"noise.bin": os.urandom(600 * 1024)}, zipfile.ZIP_STORED)
    outer = _zip({f"part{i}.zip": nested for i in range(3)}, zipfile.ZIP_STORED)
    reject_pickles("ok.zip", outer, ScanLimits(max_inflated=2 * MiB))  # 1.8 MiB in all: fits
    with pytest.raises(ArtifactError, match="inflate past the scan's limit of 1048576 bytes"):
        reject_pickles("outer.zip", outer, ScanLimits(max_inflated=MiB))  # each part fits, all do not


def test_pickle_inside_a_nested_archive_is_still_found():
    inner = _zip({"archive/data.pkl.bin": pickle.dumps([1, 2], protocol=2)}, zipfile.ZIP_DEFLATED)
    with pytest.raises(ArtifactError, match="pickled entry"):
        reject_pickles("model.pt2", _zip({"inner.zip": inner}, zipfile.ZIP_STORED))


def _safetensors_with_pickle_magic() -> bytes:
    """A real safetensors file whose header is 0x0280 = 640 bytes long: it starts ``80 02 00 ...``."""
    for k in range(1, 700):
        data = st_save({"w" * k: torch.arange(6, dtype=torch.float32).reshape(2, 3)})
        if data[:8] == b"\x80\x02\x00\x00\x00\x00\x00\x00":
            return data
    raise AssertionError("no tensor name length gives a 640-byte header")


def test_safetensors_file_whose_header_length_starts_like_a_pickle_is_accepted():
    data = _safetensors_with_pickle_magic()
    assert parse_header(data).header_len == 0x0280
    reject_pickles("weights.safetensors", data)
    assert torch.equal(next(iter(load_tensors(data).values())), torch.arange(6, dtype=torch.float32).reshape(2, 3))


def test_file_that_is_both_valid_safetensors_and_a_working_pickle_is_refused():
    # Header length 0x560280: bytes 80 02 56 00.. are PROTO 2 then UNICODE ('V'), whose argument
    # runs to the first raw newline, placed in the header's trailing white space; then '}' and the
    # tensor bytes are pickle opcodes too. Both parsers accept the file.
    program = b"0K\x2a."  # POP, BININT1 42, STOP
    n = 0x560280
    entry = json.dumps({"a": {"dtype": "U8", "shape": [len(program)], "data_offsets": [0, len(program)]}}).encode()
    header = entry[:-1] + b" " * (n - len(entry) - 1) + b"\n}"
    data = struct.pack("<Q", n) + header + program
    assert len(header) == n and parse_header(data).tensors["a"].nbytes == len(program)
    assert pickle.loads(data) == 42
    with pytest.raises(ArtifactError, match="is a pickle"):
        reject_pickles("weights.safetensors", data)


def test_plain_pickle_is_still_refused():
    with pytest.raises(ArtifactError, match="weights.safetensors is a pickle"):
        reject_pickles("weights.safetensors", pickle.dumps({"a": 1}, protocol=2))
