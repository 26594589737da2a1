"""The chat page in headless Chromium: type a prompt, watch the answer stream in."""

from __future__ import annotations

import shutil
import time

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


@pytest.fixture
def browser():
    if not CHROMIUM or not DRIVER:
        pytest.skip("needs Debian's chromium and chromium-driver (scripts/setup installs them when run as root)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in hizli[test]")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def _wait(condition, timeout: float, what: str):
    """Poll until ``condition()`` is truthy (a liveness bound for a slow shared CPU, not a speed check)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_chat_page_streams_an_answer(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(server.url + "/")
    _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#model option"), 60, "the model list")
    Select(browser.find_element(By.ID, "model")).select_by_value("smollm2-135m-instruct")
    browser.find_element(By.ID, "temperature").clear()
    browser.find_element(By.ID, "temperature").send_keys("0")
    browser.find_element(By.ID, "max_tokens").clear()
    browser.find_element(By.ID, "max_tokens").send_keys("40")
    browser.find_element(By.ID, "prompt").send_keys("Write a short sentence about the sea.")
    browser.find_element(By.ID, "send").click()

    def answer() -> str:
        found = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")
        return found[-1].text if found else ""

    # streamed: text appears while the Stop button is still enabled (the answer is not finished)
    seen = []

    def partial() -> bool:
        text, running = answer(), browser.find_element(By.ID, "cancel").is_enabled()
        if text and running:
            seen.append(text)
        return not running and bool(text)

    _wait(partial, 300, "the answer to finish")
    assert seen, "no text appeared before the answer was complete"
    assert len(set(seen)) > 1, "the answer appeared in one piece, not streamed"
    final = answer()
    assert "finish: length" in final or "finish: stop" in final
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")
    assert browser.find_element(By.CSS_SELECTOR, ".msg.user").text == "Write a short sentence about the sea."

    browser.find_element(By.ID, "reset").click()
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg")
