"""The playground page in a real browser: headless Chromium (Debian's `chromium` and
`chromium-driver`, installed by `make setup`) driven by Selenium against the running
system. Without a token the page says so; with it: upload, ask, the answer streams in,
the picture shows the kept-token count the API reports, a second question is a cache
hit, and a file over the body limit shows the 413. A screenshot is kept in out/."""

from __future__ import annotations

import time
from pathlib import Path

import openai
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from services.vision.config import VisionConfig
from tests.integration.conftest import API_TOKEN
from tests.integration.test_system_openai import data_uri, messages

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parents[2] / "out"
SCREENSHOT = ARTIFACTS / "playground.png"
# what Chromium needs to start, and not to stall on a closed network
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1400,1000")
Q1, Q2 = "What is in this picture?", "What is she holding?"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail("headless Chromium is missing: `make setup` installs chromium and "
                    "chromium-driver")
    options = Options()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium')}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def picture(photo, tmp_path_factory) -> Path:
    """A photo new to the system (a crop of no other test's), cut into 2x2 tiles."""
    path = tmp_path_factory.mktemp("playground") / "astronaut-wide.png"
    photo.crop((0, 40, 512, 360)).resize((768, 480)).save(path)
    return path


def wait(driver, condition, timeout: float = 120.0):
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d))


def text(driver, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).text


def answered(driver) -> bool:
    """The answer is complete: its usage figures are in and Ask is enabled again."""
    return (text(driver, "fig-speed") not in ("–", "…")
            and driver.find_element(By.ID, "ask").is_enabled())


def ask(driver, question: str) -> None:
    field = driver.find_element(By.ID, "question")
    field.clear()
    field.send_keys(question)
    # count the answer's updates: streamed text arrives in several
    driver.execute_script("""
        window.answerUpdates = 0;
        new MutationObserver(() => { window.answerUpdates += 1; })
          .observe(document.getElementById('answer'),
                   {childList: true, characterData: true, subtree: true});""")
    driver.find_element(By.ID, "ask").click()
    wait(driver, lambda d: text(d, "fig-speed") == "…")  # started
    wait(driver, answered)


def test_the_playground_asks_streams_shows_the_kept_tokens_and_the_errors(
        system, browser, picture, tmp_path):
    started = time.monotonic()
    base = system.http_url.removesuffix("/v1")
    browser.get(base + "/")
    assert browser.title == "HERO Serve playground"
    # the page needs no token; the API does, and the page says so
    error = wait(browser, lambda d: d.find_element(By.ID, "error").is_displayed()
                 and d.find_element(By.ID, "error"))
    assert "Not authenticated" in error.text and "HTTP 401" in error.text
    token = browser.find_element(By.ID, "token")
    token.send_keys(API_TOKEN, Keys.TAB)  # change: the methods load
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#method option")) > 1)
    assert browser.find_element(By.ID, "method").get_attribute("value") == "hero"
    assert browser.find_element(By.ID, "retention").get_attribute("value") == "0.111"
    assert not browser.find_element(By.ID, "error").is_displayed()

    browser.find_element(By.ID, "file").send_keys(str(picture))
    ask(browser, Q1)
    answer = text(browser, "answer")
    assert answer and browser.execute_script("return window.answerUpdates") >= 2
    assert text(browser, "fig-cache") == "miss"
    kept, total = (int(v) for v in text(browser, "fig-kept").split(" (")[0].split(" of "))
    for figure in ("fig-vision", "fig-ttft"):
        assert text(browser, figure).endswith(")") and " ms" in text(browser, figure)
    assert "tokens/s" in text(browser, "fig-speed")
    assert "KiB to the language model" in text(browser, "fig-bytes")
    # the picture: the layout endpoint's count is the answer's, and the API's
    wait(browser, lambda d: d.find_element(By.ID, "picture-kept").get_attribute("data-kept"))
    shown = browser.find_element(By.ID, "picture-kept")
    assert int(shown.get_attribute("data-kept")) == kept
    assert shown.text.startswith(f"{kept} of {total} (hero at retention 0.111)")
    assert text(browser, "tiles-caption").startswith("tiles 2×2: ")
    with openai.OpenAI(base_url=system.http_url, api_key=API_TOKEN, max_retries=0,
                       timeout=120) as client:
        same = client.chat.completions.create(
            model="tiny", messages=messages(data_uri(picture.read_bytes()), Q1),
            max_tokens=2, extra_body={"hero": {"method": "hero", "retention": 0.111}})
    assert (same.usage.hero["visual_tokens_kept"], same.usage.hero["visual_tokens_total"]) \
        == (kept, total)

    ask(browser, Q2)  # a second question on the same image: the cache serves it
    assert text(browser, "fig-cache") == "hit"
    assert text(browser, "answer") and not browser.find_element(By.ID, "error").is_displayed()
    wait(browser, lambda d: "hero at retention" in text(d, "picture-kept"))
    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(SCREENSHOT)) and SCREENSHOT.stat().st_size > 10_000

    # a file whose upload is over the body limit: the 413, said plainly
    limit = VisionConfig.load(values={"allow_unauthenticated": True}).max_http_body_bytes
    big = tmp_path / "huge.png"
    with big.open("wb") as out:
        out.write(b"\x89PNG\r\n\x1a\n")
        out.truncate(limit * 3 // 4 + (1 << 20))  # as base64 in JSON: past the limit
    browser.find_element(By.ID, "file").send_keys(str(big))
    browser.find_element(By.ID, "ask").click()
    error = wait(browser, lambda d: d.find_element(By.ID, "error").is_displayed()
                 and d.find_element(By.ID, "error"))
    assert "too large" in error.text and "HTTP 413" in error.text, error.text
    print(f"browser test: {time.monotonic() - started:.1f} s")
