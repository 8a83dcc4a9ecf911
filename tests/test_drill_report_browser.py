"""A drill report as an on-call engineer opens it: the self-contained HTML page rendered by a
real headless Chromium from a file (nothing fetched from the network), measured and
photographed. Screenshots go to the artifacts directory (tests/browser.py)."""

from __future__ import annotations

import json

import pytest

from geomirror.drill import html
from tests.browser import CHROMIUM, Browser, artifacts_dir
from tests.test_drill import finished_report

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/setup.sh installs it)")


async def test_a_drill_report_renders_readably_in_chromium(tmp_path):
    report = finished_report()
    page = tmp_path / f"{report['id']}.html"
    page.write_text(html.render(report))
    b = await Browser.launch(width=1200, height=900)
    try:
        await b.goto(page.as_uri())
        text = await b.eval("document.body.innerText")
        assert "PASS" in text and "site-a → site-b" in text and "0 epochs lost" in text, text[:400]
        assert "route seen moved" in text and "site-b<x>" in text  # escaped in the source, shown as text
        # both charts are drawn with a real size, and nothing on the page overflows its width
        boxes = await b.eval("JSON.stringify([...document.querySelectorAll('svg')].map(s => "
                             "{const r = s.getBoundingClientRect(); return [r.width, r.height]}))")
        sizes = json.loads(boxes)
        assert len(sizes) == 2 and all(w > 300 and h > 60 for w, h in sizes), sizes
        assert await b.eval("document.documentElement.scrollWidth <= window.innerWidth + 1")
        assert not [m for m in b.console if "error" in str(m).lower()], b.console
        shot = await b.screenshot(artifacts_dir() / "drill-report-pass.png")
        print(f"\ndrill report screenshot: {shot}")
    finally:
        await b.close()
