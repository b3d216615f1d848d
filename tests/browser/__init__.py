"""
Helpers for the dashboard's tests: IDMEF alerts (ordinary and hostile), and a real
headless Chromium driven through chromium-driver (Debian's C{chromium} and
C{chromium-driver} packages, which C{.ci/run} installs) with the C{selenium} package.

Not a test module.  Screenshots go to C{$IAPD_ARTIFACTS}, else C{test-artifacts/} at
the top of the repository (ignored by git).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

# Strings that would run script, break out of an attribute or a table cell, or smuggle
# a template expression, if a page wrote them as markup.  Each carries a marker so that
# a test can tell which field it came through.
HOSTILE = {
    "messageid": '<script>alert("xss-messageid")</script>',
    "analyzerid": '"><img src=x onerror=alert("xss-analyzerid")>',
    "analyzer_name": "'><svg onload=alert('xss-analyzer-name')>",
    "analyzer_model": '</td></tr></table><h1 id="injected">xss-model</h1>',
    "create_time": '<iframe src="javascript:alert(`xss-time`)"></iframe>',
    "classification": '<script>alert("xss-classification")</script><b onmouseover=alert(1)>bold</b>',
    "severity": '"><script>alert("xss-severity")</script>',
    "source": '<img src=x onerror=alert("xss-source")>',
    "target": 'javascript:alert("xss-target")//<a href="javascript:alert(1)">x</a>',
    "source_name": "{{constructor.constructor('alert(\"xss-template\")')()}} ${alert('x')} &amp; &lt;",
}


def idmef_alert(
    messageid: str = "alert-1",
    classification: str = "Port scan",
    severity: str | None = "medium",
    source: str = "192.0.2.10",
    target: str = "198.51.100.20",
    analyzer: tuple[str, str, str] = ("sensor-a", "snort", "Snort 3"),
    create_time: str = "2026-11-23T10:00:00Z",
    source_name: str | None = None,
) -> bytes:
    """An IDMEF Alert whose every field is given; values are escaped as XML requires."""
    analyzerid, name, model = analyzer
    impact = f"<Assessment><Impact severity={quoteattr(severity)}/></Assessment>" if severity is not None else ""
    second_source = (
        f"<Source><Node><name>{escape(source_name)}</name></Node></Source>" if source_name is not None else ""
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<IDMEF-Message xmlns="http://iana.org/idmef" version="1.0">'
        f"<Alert messageid={quoteattr(messageid)}>"
        f"<Analyzer analyzerid={quoteattr(analyzerid)} name={quoteattr(name)} model={quoteattr(model)}/>"
        f"<CreateTime ntpstamp=\"0x0.0x0\">{escape(create_time)}</CreateTime>"
        f"<Source><Node><Address category=\"ipv4-addr\"><address>{escape(source)}</address></Address></Node></Source>"
        f"{second_source}"
        f"<Target><Node><Address category=\"ipv4-addr\"><address>{escape(target)}</address></Address></Node></Target>"
        f"<Classification text={quoteattr(classification)}/>"
        f"{impact}"
        "</Alert></IDMEF-Message>\n"
    ).encode("utf-8")


def hostile_alert() -> bytes:
    """An alert with script and markup in every IDMEF field the summary keeps."""
    h = HOSTILE
    return idmef_alert(
        messageid=h["messageid"], classification=h["classification"], severity=h["severity"],
        source=h["source"], target=h["target"],
        analyzer=(h["analyzerid"], h["analyzer_name"], h["analyzer_model"]),
        create_time=h["create_time"], source_name=h["source_name"],
    )


HOSTILE_HTML_BODY = (
    b"<html><body onload=\"alert('xss-body-onload')\"><script>alert('xss-body')</script>"
    b"<img src=x onerror=alert('xss-body-img')>\x00\x1b[31m</body></html>"
)
"""A non-IDMEF body (content type text/html) that a page must show as text."""


def artifacts_dir() -> Path:
    path = Path(os.environ.get("IAPD_ARTIFACTS") or ROOT / "test-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def browser_missing() -> str | None:
    """Why no browser test can run here, or None."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        return f"{' and '.join(missing)} missing (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "the selenium package is missing (pip install '.[test]')"
    return None


def require_browser() -> None:
    """Skip the test when there is no browser, except under CI, where that fails."""
    why = browser_missing()
    if why is None:
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"browser tests cannot run under CI: {why}", pytrace=False)
    pytest.skip(f"no headless browser: {why}")


class Browser:
    """One headless Chromium with its own empty profile."""

    def __init__(self) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.profile = tempfile.mkdtemp(prefix="iapd-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in (
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", "--window-size=1280,1000", f"--user-data-dir={self.profile}",
        ):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        self.driver.set_page_load_timeout(30)

    def screenshot(self, name: str) -> Path:
        path = artifacts_dir() / f"{name}.png"
        # the whole page, not just the window
        height = self.driver.execute_script("return document.documentElement.scrollHeight")
        self.driver.set_window_size(1280, max(1000, min(int(height) + 40, 6000)))
        self.driver.save_screenshot(str(path))
        self.driver.set_window_size(1280, 1000)
        return path

    def console(self) -> list[dict[str, Any]]:
        return self.driver.get_log("browser")

    def quit(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)
