"""
The dashboard in a real headless browser (Debian's chromium, driven through
chromium-driver by selenium), against real processes: C{twistd iap-manager} with its
web listener, C{twistd iap-proxy} on one sensor's path, and alerts sent by C{iap-send}
over real TLS sensor connections.

A screenshot of each page is saved in C{test-artifacts/} (or C{$IAPD_ARTIFACTS}).
Without chromium these tests skip, except under CI (C{CI=true}), where they fail.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from iapd.sensor import heartbeat_message

from .browser import HOSTILE, HOSTILE_HTML_BODY, Browser, artifacts_dir, hostile_alert, idmef_alert, require_browser
from .certs import TestPKI, make_test_pki
from .processes import Daemon, free_port, run

LOCAL = "127.0.0.1"
WAIT = 20

# Records what a successful injection would do, and what the CSP blocked, in every
# page the browser opens (injected by the browser itself, before any page script).
WATCH = """
window.__dialogs = [];
for (const name of ["alert", "confirm", "prompt", "print"]) {
  window[name] = function (message) { window.__dialogs.push(name + ": " + message); };
}
window.__csp = [];
document.addEventListener("securitypolicyviolation", function (e) {
  window.__csp.push(e.violatedDirective + " " + e.blockedURI + " " + (e.sample || ""));
});
"""


def _tls(pki: TestPKI, pair: tuple[Path, Path]) -> str:
    crt, key = pair
    return f'tls: {{certificate: "{crt}", key: "{key}", ca: "{pki.ca}"}}\n'


class Deployment:
    """A manager with its dashboard, a proxy in front of it, and two sensors' configs."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.pki = make_test_pki(directory / "pki")
        self.port, self.web_port, self.proxy_port = free_port(), free_port(), free_port()
        (directory / "manager.yaml").write_text(
            "identity: manager.test\n"
            f'listen: ["tcp:{self.port}:interface={LOCAL}"]\n'
            + _tls(self.pki, self.pki.manager)
            + 'store: "sqlite:///alerts.db"\n'
            'content_types: ["application/x-idef-alert", "text/html"]\n'
            f'web: {{listen: "tcp:{self.web_port}:interface={LOCAL}"}}\n'
        )
        (directory / "proxy").mkdir()
        (directory / "proxy" / "proxy.yaml").write_text(
            "identity: dmz-proxy.test\n"
            f'listen: ["tcp:{self.proxy_port}:interface={LOCAL}"]\n'
            f'routes: [{{match: "manager.test", upstream: "tcp:host={LOCAL}:port={self.port}"}}]\n'
        )
        self.sensor1 = directory / "sensor1.yaml"
        self.sensor1.write_text(
            "identity: sensor1.test\nmanager: manager.test\n"
            f'connect: "tcp:host={LOCAL}:port={self.port}"\n' + _tls(self.pki, self.pki.sensor)
        )
        self.sensor2 = directory / "sensor2.yaml"  # through the proxy: a VIA path
        self.sensor2.write_text(
            "identity: sensor2.test\nmanager: manager.test\n"
            f'connect: "tcp:host={LOCAL}:port={self.proxy_port}"\n' + _tls(self.pki, self.pki.sensor2)
        )
        self.daemons: list[Daemon] = []
        self.sent = 0

    def start(self) -> None:
        manager = Daemon(["iap-manager", "-c", str(self.dir / "manager.yaml")], self.dir)
        self.daemons.append(manager)
        manager.wait_for(f"QuietSite starting on {self.web_port}")
        manager.wait_for(f"ManagerFactory starting on {self.port}")
        proxy = Daemon(["iap-proxy", "-c", str(self.dir / "proxy" / "proxy.yaml")], self.dir / "proxy")
        self.daemons.append(proxy)
        proxy.wait_for(f"ProxyFactory starting on {self.proxy_port}")

    def stop(self) -> None:
        for daemon in self.daemons:
            daemon.stop()
        for daemon in self.daemons:
            assert "Traceback" not in daemon.log(), daemon.log()

    def send(self, sensor: Path, *bodies: bytes, content_type: str | None = None) -> None:
        """Deliver with iap-send: a real sensor process, a real TLS connection."""
        files = []
        for body in bodies:
            self.sent += 1
            path = self.dir / f"alert-{self.sent}.xml"
            path.write_bytes(body)
            files.append(str(path))
        args = ["iapd.send", "-c", str(sensor), *files]
        if content_type:
            args[3:3] = ["--content-type", content_type]
        result = run(args)
        assert result.returncode == 0, result.stderr

    def url(self, path: str) -> str:
        return f"http://{LOCAL}:{self.web_port}{path}"


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    d = Deployment(tmp_path_factory.mktemp("dashboard"))
    try:
        d.start()
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    require_browser()
    b = Browser()
    try:
        b.driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": WATCH})
        yield b
    finally:
        b.quit()


def wait(browser: Browser, condition: Any, what: str) -> Any:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(browser.driver, WAIT, poll_frequency=0.1).until(lambda d: condition(d))
    except TimeoutException:
        browser.screenshot(f"timeout-{what.replace(' ', '-')}")
        raise AssertionError(f"timed out waiting for {what}") from None


def classifications(browser: Browser) -> list[str]:
    return browser.driver.execute_script(
        "return Array.from(document.querySelectorAll('#alerts td.classification')).map(td => td.textContent)"
    )


def no_injection(browser: Browser) -> None:
    """Nothing ran, nothing was blocked, no console error on the current page."""
    d = browser.driver
    assert d.execute_script("return window.__dialogs") == []
    assert d.execute_script("return window.__csp") == []
    errors = [e for e in browser.console() if e["level"] == "SEVERE"]
    assert errors == [], errors


def open_live(browser: Browser, url: str) -> None:
    browser.driver.get(url)
    wait(browser, lambda d: d.execute_script("return document.body.getAttribute('data-live')") == "open",
         "the event stream to open")


def test_list_shows_an_alert_sent_through_a_real_sensor(deployment: Deployment, browser: Browser) -> None:
    deployment.send(deployment.sensor1, idmef_alert("first", classification="SSH brute force", severity="high"))
    deployment.send(deployment.sensor2, idmef_alert("second", classification="Port scan", severity="low",
                                                    analyzer=("dmz-ids", "suricata", "Suricata 7")))
    d = browser.driver
    d.get(deployment.url("/"))
    assert d.current_url == deployment.url("/alerts")
    assert classifications(browser)[:2] == ["Port scan", "SSH brute force"]  # newest first
    rows = d.execute_script(
        "return Array.from(document.querySelectorAll('#alerts tr')).map(tr => "
        "Array.from(tr.cells).map(td => td.textContent))"
    )
    assert rows[0][2:5] == ["sensor2.test", "low", "Port scan"] and rows[0][7] == "dmz-proxy.test"
    assert rows[1][2:5] == ["sensor1.test", "high", "SSH brute force"] and rows[1][7] == "direct"
    wait(browser, lambda d: d.execute_script("return document.querySelector('#chart svg rect.bar-high') !== null"),
         "the chart")
    no_injection(browser)
    browser.screenshot("alerts-list")


def test_alert_detail_shows_summary_via_and_sensor(deployment: Deployment, browser: Browser) -> None:
    d = browser.driver
    d.get(deployment.url("/alerts?classification=port+scan"))
    d.find_element("css selector", "#alerts tr a").click()
    wait(browser, lambda d: "/alerts/" in d.current_url and d.find_elements("css selector", "pre.body"), "detail")

    def field(name: str) -> str:
        return d.execute_script(
            "for (const th of document.querySelectorAll('table.fields > tbody > tr > th'))"
            " if (th.textContent === arguments[0]) return th.nextElementSibling.textContent;", name)

    assert field("Sensor (authenticated)") == "sensor2.test"
    assert field("VIA path") == "dmz-proxy.test"
    assert field("Classification") == "Port scan"
    assert field("Message id") == "second"
    assert "Suricata 7" in field("Analyzer chain (outermost first)")
    body = d.find_element("css selector", "pre.body").get_attribute("textContent")
    assert '<Classification text="Port scan"/>' in body and "\n    <Analyzer" in body  # pretty-printed
    no_injection(browser)
    browser.screenshot("alert-detail")


def test_filters(deployment: Deployment, browser: Browser) -> None:
    deployment.send(deployment.sensor1, idmef_alert("f-ssh-low", classification="ssh probe", severity="low"))
    d = browser.driver
    d.get(deployment.url("/alerts"))
    d.find_element("name", "classification").send_keys("SSH")
    d.find_element("id", "sev-high").click()
    d.find_element("css selector", "#filters button[type=submit]").click()
    wait(browser, lambda d: "classification=SSH" in d.current_url, "the filtered page")
    assert "severity=high" in d.current_url
    assert classifications(browser) == ["SSH brute force"]
    assert d.find_element("id", "sev-high").is_selected()
    assert d.find_element("name", "classification").get_attribute("value") == "SSH"
    browser.screenshot("alerts-filtered")
    # by sensor: the sensor link of a row
    d.get(deployment.url("/alerts"))
    d.find_element("link text", "sensor2.test").click()
    wait(browser, lambda d: "sensor=sensor2.test" in d.current_url, "the sensor filter")
    assert classifications(browser) == ["Port scan"]
    # time range
    d.get(deployment.url("/alerts"))
    d.find_element("name", "until").send_keys("2000-01-01T00:00Z")
    d.find_element("css selector", "#filters button[type=submit]").click()
    wait(browser, lambda d: "until=" in d.current_url, "the time filter")
    assert classifications(browser) == []
    assert d.find_element("id", "empty").text == "No alert matches."
    d.get(deployment.url("/alerts?since=1h&until=2999-01-01T00:00Z"))
    assert len(classifications(browser)) == 3
    no_injection(browser)


def test_a_new_alert_appears_live(deployment: Deployment, browser: Browser) -> None:
    d = browser.driver
    open_live(browser, deployment.url("/alerts"))
    d.execute_script("window.__same_page = 42")
    before = classifications(browser)
    deployment.send(deployment.sensor1, idmef_alert("live-1", classification="Live one", severity="medium"))
    wait(browser, lambda d: classifications(browser)[:1] == ["Live one"], "the live alert")
    assert classifications(browser)[1:] == before
    assert d.execute_script("return window.__same_page") == 42  # no reload
    # a filtered page gets only what its filters select
    open_live(browser, deployment.url("/alerts?severity=high"))
    deployment.send(deployment.sensor1, idmef_alert("live-2", classification="Not for this page", severity="low"),
                    idmef_alert("live-3", classification="Live high", severity="high"))
    wait(browser, lambda d: classifications(browser)[:1] == ["Live high"], "the live high alert")
    assert "Not for this page" not in classifications(browser)
    wait(browser, lambda d: d.execute_script(
        "return document.querySelectorAll('#chart rect.bar-high').length > 0"), "the chart to follow")
    no_injection(browser)
    browser.screenshot("alerts-live")


def test_hostile_alert_renders_as_text(deployment: Deployment, browser: Browser) -> None:
    d = browser.driver
    # arriving live: the row is built by dashboard.js
    open_live(browser, deployment.url("/alerts"))
    deployment.send(deployment.sensor1, hostile_alert())
    wait(browser, lambda d: classifications(browser)[:1] == [HOSTILE["classification"]], "the hostile alert, live")
    live_row = d.execute_script("return Array.from(document.querySelector('#alerts tr').cells).map(c => c.textContent)")
    assert live_row[3] == HOSTILE["severity"]
    assert live_row[5] == f'{HOSTILE["source"]}, {HOSTILE["source_name"]}'
    assert live_row[6] == HOSTILE["target"]
    browser.screenshot("alerts-hostile-live")
    no_injection(browser)
    # rendered by the server
    d.get(deployment.url("/alerts"))
    assert classifications(browser)[0] == HOSTILE["classification"]
    assert d.execute_script("return document.querySelectorAll('main img, main iframe, #injected, main b').length") == 0
    no_injection(browser)
    # the detail page: every field exactly the string the alert carried
    d.find_element("css selector", "#alerts tr a").click()
    wait(browser, lambda d: d.find_elements("css selector", "pre.body"), "the hostile detail")
    fields = d.execute_script(
        "const out = {}; for (const th of document.querySelectorAll('table.fields > tbody > tr > th'))"
        " out[th.textContent] = th.nextElementSibling.textContent; return out;")
    assert fields["Message id"] == HOSTILE["messageid"]
    assert fields["Classification"] == HOSTILE["classification"]
    assert fields["Severity"] == HOSTILE["severity"]
    assert fields["Create time"] == HOSTILE["create_time"]
    assert fields["Target"] == HOSTILE["target"]
    analyzers = d.execute_script(
        "return Array.from(document.querySelectorAll('table.analyzers td')).map(td => td.textContent)")
    assert analyzers == [HOSTILE["analyzer_name"], HOSTILE["analyzer_model"], HOSTILE["analyzerid"]]
    h1 = d.execute_script("return Array.from(document.querySelectorAll('h1')).map(h => h.textContent)")
    assert h1 == [f"Alert {d.current_url.rsplit('/', 1)[1]}: {HOSTILE['classification']}"]
    assert d.execute_script("return document.title").startswith("Alert ")
    assert d.execute_script("return document.querySelectorAll('main img, main iframe, #injected, main b').length") == 0
    no_injection(browser)
    browser.screenshot("alert-hostile-detail")
    # an HTML body, not IDMEF: shown as text, control characters made visible
    deployment.send(deployment.sensor1, HOSTILE_HTML_BODY, content_type="text/html")
    d.get(deployment.url("/alerts"))
    d.find_element("css selector", "#alerts tr a").click()
    wait(browser, lambda d: d.find_elements("css selector", "pre.body"), "the HTML body")
    body = d.find_element("css selector", "pre.body").get_attribute("textContent")
    assert body == HOSTILE_HTML_BODY.decode().replace("\x00", "\u2400").replace("\x1b", "\u241b")
    no_injection(browser)
    browser.screenshot("alert-hostile-body")
    # and the API says the same, with nothing for a browser to parse as markup
    d.get(deployment.url("/api/alerts?limit=2"))
    page = json.loads(d.find_element("tag name", "body").text)
    assert page["alerts"][1]["idmef"]["classification"] == HOSTILE["classification"]
    no_injection(browser)


def test_sensors_page(deployment: Deployment, browser: Browser) -> None:
    deployment.send(deployment.sensor1, heartbeat_message("sensor1.test", 1))
    deployment.send(deployment.sensor2, heartbeat_message("sensor2.test", 3600))
    time.sleep(2.2)  # sensor1's heartbeat is now two intervals late
    d = browser.driver
    d.get(deployment.url("/sensors"))
    rows = d.execute_script(
        "return Array.from(document.querySelectorAll('table.sensors tbody tr')).map(tr => "
        "Array.from(tr.cells).map(td => td.textContent))"
    )
    by_name = {r[0]: r for r in rows}
    assert set(by_name) == {"sensor1.test", "sensor2.test"}
    assert by_name["sensor1.test"][1] == "OVERDUE" and by_name["sensor1.test"][6] == "1s"
    assert by_name["sensor2.test"][1] == "ok" and by_name["sensor2.test"][9] == "dmz-proxy.test"
    assert int(by_name["sensor2.test"][2]) == 2  # the Port scan and the heartbeat
    no_injection(browser)
    browser.screenshot("sensors")
    d.find_element("link text", "sensor2.test").click()
    wait(browser, lambda d: "sensor=sensor2.test" in d.current_url, "the sensor's alerts")
    assert classifications(browser) == ["Port scan"]
    assert (artifacts_dir() / "sensors.png").stat().st_size > 0


def test_missing_browser_fails_under_ci_and_skips_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    from . import browser as helpers

    monkeypatch.setattr(helpers, "CHROMIUM", "/nonexistent/chromium")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="browser tests cannot run under CI"):
        helpers.require_browser()
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception, match="no headless browser"):
        helpers.require_browser()
