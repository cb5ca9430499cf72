"""The HTML audit report in a real headless browser, at phone and desktop widths: nothing wider
than the screen, the ROC plot loaded and inside the page. Screenshots go to the test's output
(their paths are printed and recorded as ``screenshot-<width>`` properties)."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from owner._audit_report import build_report, render_html
from protocol.audit import verify_log
from protocol.keys import Identity
from tests.owner.privacy_helpers import trail_with_audit

BROWSER = next((found for name in ("chromium", "chromium-browser", "google-chrome") if (found := shutil.which(name))), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no headless browser on PATH (apt-get install chromium)")

MEASURE = """<script>
const f = document.getElementById('f');
f.onload = () => {
  const d = f.contentDocument, img = d.querySelector('img');
  document.body.setAttribute('data-fit', [d.documentElement.scrollWidth, f.contentWindow.innerWidth,
    img && img.complete ? img.naturalWidth : 0, img ? Math.ceil(img.getBoundingClientRect().right) : 0].join(' '));
};
</script>"""


def _browser(tmp_path: Path, *args: str) -> str:
    cmd = [str(BROWSER), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}"]
    done = subprocess.run([*cmd, "--virtual-time-budget=5000", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-1000:]
    return done.stdout


@pytest.mark.parametrize(("width", "height"), [(390, 2600), (1280, 1800)])
def test_html_report_fits_phone_and_desktop_widths_with_the_roc_plot(
    tmp_path: Path, width: int, height: int, record_property: pytest.RecordProperty
) -> None:
    owner, entity = Identity.generate("owner", "clinic"), Identity.generate("entity", "service")
    trail = trail_with_audit(tmp_path, owner, entity)
    report = build_report(trail, verify_log(trail, owner=owner.card, entity=entity.card), owner=owner.card, owner_pinned=True, entity_pinned=True)
    page = tmp_path / f"at-{width}.html"
    frame = f"<iframe id=f style='width:{width}px;height:{height}px;border:0' srcdoc=\"{html.escape(render_html(report), quote=True)}\"></iframe>"
    page.write_text(f"<!doctype html><html><body style=margin:0>{frame}{MEASURE}</body></html>")
    dom = _browser(tmp_path, f"--window-size={width + 40},{height}", "--dump-dom", page.as_uri())
    found = re.search(r'data-fit="(\d+) (\d+) (\d+) (\d+)"', dom)
    assert found, dom[-500:]
    scroll, inner, natural, right = map(int, found.groups())
    assert scroll <= inner, f"the page is {scroll}px wide in a {inner}px viewport"
    assert natural > 0 and right <= inner, f"ROC plot: natural width {natural}, right edge {right}px of {inner}px"
    shot = tmp_path / f"report-{width}px.png"
    _browser(tmp_path, f"--window-size={width},{height}", f"--screenshot={shot}", page.as_uri())
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record_property(f"screenshot-{width}", str(shot))
    print(f"screenshot at {width}px: {shot}")
