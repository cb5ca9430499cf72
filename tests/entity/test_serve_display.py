"""What entity.serve shows the operator: every event one readable line, owner text inert."""

from __future__ import annotations

from entity.serve import _describe, _shown


def test_layer_progress_shows_the_layers_compression_rate() -> None:
    line = _describe(
        {
            "event": "pruning",
            "phase": "layer",
            "job_id": "job-1",
            "layer": "features.3.weight",
            "index": 2,
            "total": 6,
            "kept": 64,
            "kernels": 128,
            "error": "0.1234",
        }
    )
    assert line == "[job-1] layer 2/6 features.3.weight rate 4.50x error 0.1234"


def test_owner_text_in_an_event_is_escaped_and_not_read_as_markup() -> None:
    line = _describe({"event": "refused", "job_id": "job-1", "reason": "bad [bold red]\x1b[2Jcard"})
    shown = _shown(line or "")
    assert "\x1b" not in shown and "\\x1b[2J" in shown and "\\[bold red]" in shown
