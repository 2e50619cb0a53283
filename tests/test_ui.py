"""The status page (/ui) in a real browser: headless Chromium from Debian driven by selenium,
against a real berthd with real replicas. Sign in (a wrong token refused), see endpoints and
GPUs, an event arriving live, scale an endpoint from its page and watch the new replica come
without a reload, restart it; the page fits a phone's width. Screenshots of the overview and
an endpoint page are written to BERTH_UI_SCREENSHOTS (docs/ for the README) when it is set."""

from __future__ import annotations

import os
import shutil
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from helpers import SESSION, TEST_LABEL, Berthd, config_text

ADMIN = "ui-admin-secret"
WAIT_S = 20


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.fail("chromium and chromium-driver (Debian) are needed: scripts/test installs "
                    "them", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,860", "--hide-scrollbars"):
        options.add_argument(arg)
    b = webdriver.Chrome(service=Service(driver), options=options)
    yield b
    b.quit()


@pytest.fixture
def daemon(tmp_path, network, model_image, docker_host) -> Iterator[Berthd]:
    config = tmp_path / "config.toml"
    config.write_text(config_text(tmp_path / "state", network, model_image,
                                  {"alpha": {"gpus": 1}}))
    d = Berthd(tmp_path, config, env={"BERTH_ADMIN_TOKEN": ADMIN})
    d.token = ADMIN
    d.wait_message("READY=1")
    yield d
    d.close()


def until(b: WebDriver, check: Callable[[WebDriver], object], what: str) -> object:
    try:
        return WebDriverWait(b, WAIT_S, poll_frequency=0.05,
                             ignored_exceptions=(StaleElementReferenceException,)).until(check)
    except TimeoutException:
        raise AssertionError(f"page never showed {what}; summary: "
                             f"{b.find_element(By.ID, 'summary').text!r}") from None


def rows(b: WebDriver, table: str) -> list[list[str]]:
    """The table's cells as shown, read in one step (the page redraws tables as data comes);
    a table that says it is empty has no rows."""
    return b.execute_script(  # type: ignore[no-any-return]
        "return [...document.getElementById(arguments[0]).tBodies[0].rows]"
        ".filter(tr => tr.cells.length > 1).map(tr => [...tr.cells].map(td => td.innerText))",
        table)


def sign_in(b: WebDriver, token: str) -> None:
    until(b, lambda b: b.find_element(By.ID, "token").is_displayed(), "the sign-in form")
    b.find_element(By.ID, "token").send_keys(token)
    b.find_element(By.CSS_SELECTOR, "#sign-in-form button").click()


def screenshot(b: WebDriver, tmp: Path, name: str) -> None:
    b.save_screenshot(str(tmp / name))
    folder = os.environ.get("BERTH_UI_SCREENSHOTS")
    if folder:
        shutil.copy(tmp / name, Path(folder) / name)


def test_status_page_in_a_real_browser(browser, daemon, model_image, tmp_path):
    d, b = daemon, browser
    assert d.request("POST", "/v1/endpoints", {
        "name": "beta", "image": model_image, "min_replicas": 1, "max_replicas": 3,
        "models": ["beta-embed"], "labels": {TEST_LABEL: SESSION},
        "readiness": {"path": "/health", "period_s": 0.1}})[0] == 201
    status, token = d.request("POST", "/v1/endpoints/beta/tokens")
    assert status == 201
    d.wait_endpoint("alpha", lambda e: any(r["state"] == "ready" for r in e["replicas"]))
    d.wait_endpoint("beta", lambda e: any(r["state"] == "ready" for r in e["replicas"]))
    base = f"http://127.0.0.1:{d.port}"
    b.get(f"{base}/ui")

    # A wrong token and an endpoint's own token are refused; nothing of the box is shown.
    for wrong in ("not-the-token", token["token"]):
        sign_in(b, wrong)
        until(b, lambda b: "Token refused" in b.find_element(By.ID, "sign-in-error").text,
              "the refusal")
        assert not b.find_element(By.ID, "overview").is_displayed()
        assert "alpha" not in b.find_element(By.TAG_NAME, "body").text

    sign_in(b, ADMIN)
    until(b, lambda b: len(rows(b, "endpoints")) == 2 and rows(b, "endpoints")[1][2] == "1/1",
          "both endpoints with a ready replica")
    assert [r[0] for r in rows(b, "endpoints")] == ["alpha", "beta"]
    assert rows(b, "endpoints")[1][5] == "beta-embed"
    gpus = rows(b, "gpus")
    assert [g[1] for g in gpus] == ["Test GPU", "Test GPU"]
    assert sorted(g[5].split(" ")[0] for g in gpus) == ["alpha", "free"]
    assert b.find_element(By.ID, "summary").text.startswith("All is well: 2 endpoint(s)")
    b.execute_script("window.__sameDocument = true")  # gone if the page ever reloads

    # An event arrives live (a write by someone else, over the API).
    d.request("POST", "/v1/endpoints", {"name": "gamma", "image": model_image,
                                        "min_replicas": 0, "labels": {TEST_LABEL: SESSION}})
    until(b, lambda b: "endpoint gamma created" in b.find_element(By.ID, "events").text,
          "the live event")
    until(b, lambda b: len(rows(b, "endpoints")) == 3, "the new endpoint's row")
    screenshot(b, tmp_path, "ui-overview.png")

    # The endpoint page: scale from the page, the new replica appears without a reload.
    b.find_element(By.LINK_TEXT, "beta").click()
    until(b, lambda b: b.find_element(By.ID, "ep-name").text == "beta", "beta's page")
    until(b, lambda b: "model server listening" in b.find_element(By.ID, "logs").text,
          "followed logs")
    field = b.find_element(By.ID, "scale-min")
    field.clear()
    field.send_keys("2")
    b.find_element(By.ID, "scale-apply").click()
    until(b, lambda b: [r[1] for r in rows(b, "replicas")] == ["ready", "ready"],
          "two ready replicas")
    assert d.endpoint("beta")["spec"]["min_replicas"] == 2
    assert b.execute_script("return window.__sameDocument") is True
    until(b, lambda b: "last" in b.find_element(By.ID, "starts").text, "cold starts")
    screenshot(b, tmp_path, "ui-endpoint.png")

    # Restart rolls both replicas to generation 2.
    b.find_element(By.ID, "restart").click()
    until(b, lambda b: [r[2] for r in rows(b, "replicas")] == ["2", "2"],
          "replicas of generation 2 only")
    assert b.execute_script("return window.__sameDocument") is True

    # Readable on a phone: nothing wider than the screen but the tables' own scrollers.
    b.set_window_size(390, 844)
    b.get(f"{base}/ui/#/")
    until(b, lambda b: len(rows(b, "endpoints")) == 3, "the overview on a phone")
    assert b.execute_script("return document.documentElement.scrollWidth") <= \
        b.execute_script("return window.innerWidth")


def test_page_is_served_with_a_strict_policy_and_no_outside_assets(daemon):
    base = f"http://127.0.0.1:{daemon.port}"
    with urllib.request.urlopen(f"{base}/ui/") as resp:
        html = resp.read().decode()
        policy = resp.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert "unsafe-inline" not in policy
    assert "http" not in html.replace('href="/ui/', "").split("<body>")[0].lower()
    for name in ("app.js", "style.css"):
        with urllib.request.urlopen(f"{base}/ui/{name}") as resp:
            body = resp.read().decode()
        assert resp.status == 200 and "https://" not in body and "http://" not in body
        assert "innerHTML" not in body  # API text reaches the page through textContent only
    status, _ = daemon.get_bytes("/ui/../config.toml")
    assert status == 404


def test_open_mode_shows_the_page_without_sign_in(browser, tmp_path, network, model_image,
                                                  docker_host):
    config = tmp_path / "config.toml"
    config.write_text(config_text(tmp_path / "state", network, model_image,
                                  {"solo": {"min_replicas": 0}}))
    d = Berthd(tmp_path, config)
    try:
        d.wait_message("READY=1")
        browser.get(f"http://127.0.0.1:{d.port}/ui/")
        until(browser, lambda b: rows(b, "endpoints") and rows(b, "endpoints")[0][:2] ==
              ["solo", "idle"], "the endpoint, with no sign-in")
        assert not browser.find_element(By.ID, "sign-in").is_displayed()
        assert not browser.find_element(By.ID, "sign-out").is_displayed()
    finally:
        d.close()
