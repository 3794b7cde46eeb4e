"""`fedcommons release site`: a static site of a registry, checked in headless Chromium."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from fedcommons.releases.integrations.site import build_site
from fedcommons.releases.registry import Registry
from fedcommons.releases.signing import Signer, public_pem
from tests.release_helpers import digits_weights, publish_digits

BIN = Path(sys.executable).parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
#: Where the browser test also saves its screenshot of the front page (docs/ keeps one).
SCREENSHOT_ENV = "FEDCOMMONS_SITE_SCREENSHOT"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """Four digits releases on one chain, @stable on 1.0.1; 1.0.3's weights tampered with."""
    reg = Registry(tmp_path_factory.mktemp("site") / "reg")
    signer = Signer.generate()
    parent = None
    for steps in (5, 30, 80, 200):
        parent = publish_digits(reg, signer, digits_weights(steps), parent=parent)
    reg.promote("1.0.1", "stable", signer=signer)
    data = bytearray(parent.weights_path.read_bytes())
    data[-1] ^= 1  # one flipped bit in the last release's weights
    parent.weights_path.chmod(0o644)
    parent.weights_path.write_bytes(bytes(data))
    return reg


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append(tag)


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--window-size=1200,940",
    ):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))


@pytest.mark.slow
@pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="no chromium/chromedriver binary (apt-get install chromium chromium-driver)",
)
def test_the_site_shows_every_release_the_chart_and_the_tampered_release_in_chromium(
    registry: Registry, tmp_path: Path
) -> None:
    pytest.importorskip("selenium", reason="selenium is not installed (pip install '.[test]')")
    from selenium.webdriver.common.by import By

    out = tmp_path / "site"
    done = subprocess.run(
        [str(BIN / "fedcommons"), "release", "site", "-o", str(out), "-r", str(registry.root)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr  # one release fails verification
    assert "FAIL digits 1.0.3" in done.stdout
    driver = _browser()
    try:
        driver.get((out / "index.html").as_uri())
        assert driver.title == "fedcommons releases"
        rows = driver.find_elements(By.CSS_SELECTOR, "tr.release")
        assert [r.get_attribute("data-version") for r in rows] == [
            "1.0.0", "1.0.1", "1.0.2", "1.0.3",
        ]  # fmt: skip
        status = {r.get_attribute("data-version"): r.find_element(By.CLASS_NAME, "verify").text
                  for r in rows}  # fmt: skip
        assert status == {"1.0.0": "verified", "1.0.1": "verified", "1.0.2": "verified",
                          "1.0.3": "verification failed"}  # fmt: skip
        assert "failed" in rows[3].get_attribute("class")
        assert "@stable" in rows[1].text and "@candidate" in rows[3].text
        chart = driver.find_element(By.CSS_SELECTOR, "svg.chart")
        assert chart.size["width"] > 300 and chart.size["height"] > 100
        lines = chart.find_elements(By.CSS_SELECTOR, "polyline.series")
        assert {line.get_attribute("data-series") for line in lines} == {
            "accuracy", "worst-class-accuracy",
        }  # fmt: skip
        for line in lines:
            assert line.size["width"] > 100  # drawn across the four versions
        # the tampered release's figures are not charted: 3 verified versions x 2 series
        assert len(chart.find_elements(By.CSS_SELECTOR, "circle.point")) == 6
        if os.environ.get(SCREENSHOT_ENV):
            driver.save_screenshot(os.environ[SCREENSHOT_ENV])
        assert driver.get_screenshot_as_png()[:4] == b"\x89PNG"
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert severe == []
        rows[2].find_element(By.TAG_NAME, "a").click()  # 1.0.2's page
        assert driver.find_element(By.TAG_NAME, "h1").text.startswith("digits 1.0.2")
        links = {a.text: a.get_attribute("href")
                 for a in driver.find_elements(By.CSS_SELECTOR, "ul.downloads a")}  # fmt: skip
        assert "weights (safetensors)" in links
        patch = next(href for text, href in links.items() if text.startswith("patch from 1.0.1"))
        for href in links.values():
            assert Path(href.removeprefix("file://")).is_file(), href
        from fedcommons.releases.patches import apply_patch

        rebuilt = apply_patch(registry.weights_bytes(registry.get("1.0.1")),
                              Path(patch.removeprefix("file://")).read_bytes())  # fmt: skip
        assert rebuilt == registry.weights_bytes(registry.get("1.0.2"))
        driver.get((out / "digits" / "1.0.3.html").as_uri())
        error = driver.find_element(By.CSS_SELECTOR, "p.verify").text
        assert "verification failed" in error and "weights file" in error
        assert driver.find_elements(By.CSS_SELECTOR, "ul.downloads a") == []
        assert driver.find_elements(By.CSS_SELECTOR, "table.validation") == []
        assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []
        driver.execute_script("console.error('probe')")  # the capture itself works
        assert any("probe" in e["message"] for e in driver.get_log("browser"))
    finally:
        driver.quit()


def test_text_from_the_registry_is_escaped_not_run(tmp_path: Path) -> None:
    """Input tried: a release whose manifest names its strategy with a <script> element."""
    reg = Registry(tmp_path / "reg")
    publish_digits(reg, Signer.generate(), digits_weights(5), strategy="<script>x()</script>")
    summary = build_site(reg, tmp_path / "site")
    assert summary.failed == []
    page = (tmp_path / "site" / "digits" / "1.0.0.html").read_text()
    parser = _Tags()
    parser.feed(page)
    assert "script" not in parser.tags
    assert "&lt;script&gt;x()&lt;/script&gt;" in page


def test_a_key_pinned_with_trust_that_did_not_sign_fails_every_release(
    registry: Registry, tmp_path: Path
) -> None:
    """Input tried: --trust with another signer's public key."""
    stranger = Signer.generate()
    key = tmp_path / "stranger.pub"
    key.write_bytes(public_pem(stranger.public_key))
    from fedcommons.releases.signing import load_public_key

    summary = build_site(
        registry, tmp_path / "site", public_key=load_public_key(key.read_bytes(), str(key))
    )
    assert summary.pinned and summary.verified == 0 and len(summary.failed) == 4
    index = (tmp_path / "site" / "index.html").read_text()
    assert "pinned with <code>--trust</code>" in index
    assert not (tmp_path / "site" / "files").exists()  # nothing failing is offered


def test_a_signed_manifest_with_fields_of_the_wrong_type_is_shown_failing_not_crashing(
    tmp_path: Path,
) -> None:
    """Input tried: a release whose (validly signed) manifest has a list as its config."""
    reg = Registry(tmp_path / "reg")
    publish_digits(reg, Signer.generate(), digits_weights(5), config=["not", "a", "mapping"])
    summary = build_site(reg, tmp_path / "site")
    assert summary.failed == ["digits 1.0.0"]
    page = (tmp_path / "site" / "digits" / "1.0.0.html").read_text()
    assert "manifest fields of the wrong type: config" in page
