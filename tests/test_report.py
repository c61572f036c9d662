"""The static HTML report, rendered in headless Chromium (Debian's chromium + chromium-driver, which
.ci/run installs): every image loads, no console errors, boxes and importance bars are drawn.
Skips with the reason where Chromium, its driver or selenium are missing."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from pipeline.report import ReportConfig, write_report

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def browser():
    if not Path(CHROMIUM).is_file() or not Path(DRIVER).is_file():
        pytest.skip(
            f"headless Chromium not installed ({CHROMIUM}, {DRIVER}); `apt-get install chromium chromium-driver`"
        )
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (it is in requirements.lock: run `make install`)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    # a closed network: no background connections, no first-run or sync traffic
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1800",
    ):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(DRIVER), options=opts)


def test_report_renders_in_headless_chromium(demo_run, tmp_path):
    page = write_report(ReportConfig(items=8), demo_run.root / "predictions", demo_run.manifest, tmp_path / "report")
    assert not any(str(demo_run.root / "raw") in line for line in page.read_text().splitlines()), (
        "the report must not point into the dataset folder: it is copied with its thumbnails"
    )
    driver = browser()
    try:
        driver.get(page.as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])"
        )
        assert len(images) == 8 and all(ok and width > 0 for _, ok, width in images), images
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert not errors, errors
        boxes = driver.execute_script(
            "return ['rect.box.face', 'rect.box.ocr', 'rect.box.view', 'rect.box.top', '.card .bar i', 'svg[role=img]']"
            ".map(s => document.querySelectorAll(s).length)"
        )
        faces, ocr, views, top, bars, plots = boxes
        assert faces > 0 and ocr > 0 and top > 0, f"boxes drawn: faces {faces}, ocr {ocr}, highlighted {top}"
        # the shipped image views: the three thirds on every poster, the whole image where it mattered most
        assert 8 * 3 <= views <= 8 * 4, views
        assert bars >= 8 * 3 and plots == 2
        checked = driver.execute_script(  # every drawn box lies inside its poster's image
            "return Array.from(document.querySelectorAll('.poster')).flatMap(p => {"
            " const r = p.getBoundingClientRect();"
            " return Array.from(p.querySelectorAll('rect.box')).map(b => { const q = b.getBoundingClientRect();"
            " return q.width > 0 && q.height > 0 && q.left >= r.left - 1 && q.right <= r.right + 1"
            " && q.top >= r.top - 1 && q.bottom <= r.bottom + 1; }); })"
        )
        assert len(checked) == faces + ocr + views and len(checked) > 0 and all(checked), checked
        shot = tmp_path / "report.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 50_000
        if os.environ.get("DMMS_SCREENSHOT_DIR"):  # keep it for a look (the tmp folder is removed)
            target = Path(os.environ["DMMS_SCREENSHOT_DIR"])
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, target / "report.png")
    finally:
        driver.quit()
