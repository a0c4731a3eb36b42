"""The web page in a real browser (Debian's Chromium through Playwright) against a real
`t2v serve` process with the tiny model. Screenshots go to test-artifacts/."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from servers import Server
from t2v.pipeline_config import DEFAULT_MODEL_DIR
from t2v.rewrite import VOCABULARY_FILE
from t2v.serve.auth import KeyStore
from t2v.serve.store_sqlite import SqliteStore

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PHONE = {"width": 390, "height": 844}

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's Chromium: `make browser` installs it"
)

VIDEO_PLAYS = """() => {
    const v = document.querySelector('#result video');
    return v !== null && v.readyState >= 2 && v.duration > 0;
}"""
GIF_SHOWN = """() => {
    const img = document.querySelector('#result img');
    return img !== null && img.complete && img.naturalWidth > 0;
}"""
UNLABELLED = """() => [...document.querySelectorAll('input, select, textarea')]
    .filter(c => !document.querySelector(`label[for="${c.id}"]`)).map(c => c.id || c.outerHTML)"""


@pytest.fixture
def browser():
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield chromium
        finally:
            chromium.close()


def open_page(browser, url: str):
    page = browser.new_page(viewport=PHONE)
    problems = []
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("requestfailed", lambda r: problems.append(f"{r.url}: {r.failure}"))
    page.goto(url)
    return page, problems


def test_generate_and_watch_the_video_play(tmp_path, tiny_model_dir, browser):
    ARTIFACTS.mkdir(exist_ok=True)
    with Server(tmp_path / "data", tiny_model_dir, step_delay=0.05) as server:
        page, problems = open_page(browser, server.url)
        assert page.evaluate(UNLABELLED) == []
        page.get_by_label("Prompt", exact=True).fill("a red circle moving right")
        page.get_by_text("Options").click()
        # the form is built from the model's knobs, as GET /v1/models states them
        knobs = server.client.get("/v1/models").json()["data"][0]["knobs"]
        page.locator("#model", has_text="frames").wait_for()
        assert page.get_by_label("Steps").get_attribute("max") == str(knobs["steps"]["max"])
        assert page.get_by_label("Steps").get_attribute("placeholder") == str(
            knobs["steps"]["default"]
        )
        frames = page.get_by_label("Frames", exact=True)
        assert frames.is_disabled() and frames.input_value() == str(knobs["frames"]["default"])
        maxlength = page.get_by_label("Prompt", exact=True).get_attribute("maxlength")
        assert maxlength == str(knobs["max_prompt_chars"])
        page.get_by_label("Steps").fill("20")
        page.get_by_label("Seed").fill("3")
        page.get_by_role("button", name="Generate").click()

        page.locator("#status", has_text="of 20").wait_for(timeout=30_000)  # live progress
        page.wait_for_function(VIDEO_PLAYS, timeout=60_000)
        page.screenshot(path=ARTIFACTS / "serve-generate.png", full_page=True)

        assert page.locator("#status").inner_text() == "Done."
        link = page.get_by_role("link", name="Download MP4")
        assert link.get_attribute("download").endswith(".mp4")
        history = page.locator("#history li").first
        history.filter(has_text="a red circle moving right").wait_for()
        assert "completed" in history.inner_text() and "seed 3" in history.inner_text()
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")

        page.reload()  # the history comes from the API, so it survives a reload
        page.locator("#history li", has_text="a red circle moving right").wait_for()
        assert problems == []


def test_the_page_asks_for_a_key_when_auth_is_on(tmp_path, tiny_model_dir, browser):
    ARTIFACTS.mkdir(exist_ok=True)
    _, key = KeyStore(SqliteStore(tmp_path / "data")).create("browser")
    with Server(tmp_path / "data", tiny_model_dir, "--auth") as server:
        page, problems = open_page(browser, server.url)
        page.get_by_label("API key").wait_for()
        page.get_by_label("API key").fill(key)
        page.get_by_role("button", name="Save key").click()
        assert page.evaluate("localStorage.getItem('t2v-api-key')") == key
        page.get_by_label("Prompt", exact=True).fill("a blue square moving left")
        page.get_by_text("Options").click()
        page.get_by_label("Format").select_option("gif")
        page.get_by_role("button", name="Generate").click()
        page.wait_for_function(GIF_SHOWN, timeout=60_000)
        page.screenshot(path=ARTIFACTS / "serve-auth-gif.png", full_page=True)
        assert page.get_by_role("link", name="Download GIF").is_visible()
        assert not page.locator("#key-form").is_visible()
        assert [p for p in problems if "401" not in p] == []  # the first, keyless, request


def test_the_page_shows_how_the_model_read_the_prompt(tmp_path, tiny_model_dir, browser):
    """A prompt in free words: the page says what the model read it as, and its warning."""
    ARTIFACTS.mkdir(exist_ok=True)
    model = shutil.copytree(tiny_model_dir, tmp_path / "tiny-reading")
    shutil.copy(DEFAULT_MODEL_DIR / VOCABULARY_FILE, model / VOCABULARY_FILE)  # the rewriter's
    with Server(tmp_path / "data", model) as server:
        page, problems = open_page(browser, server.url)
        page.get_by_label("Prompt", exact=True).fill("a crimson giraffe circle moving right")
        page.get_by_role("button", name="Generate").click()
        page.locator("#reading", has_text="Read as: a red circle moving right").wait_for()
        assert "'giraffe'" in page.locator("#warnings li").first.inner_text()
        page.wait_for_function(VIDEO_PLAYS, timeout=60_000)
        page.screenshot(path=ARTIFACTS / "serve-reading.png", full_page=True)
        history = page.locator("#history li").first
        assert "a crimson giraffe circle moving right" in history.inner_text()  # as typed
        page.get_by_label("Prompt", exact=True).fill("a red circle moving right")
        page.get_by_role("button", name="Generate").click()
        page.wait_for_function(VIDEO_PLAYS, timeout=60_000)
        assert not page.locator("#reading").is_visible()  # read as typed: nothing to say
        assert not page.locator("#warnings").is_visible()
        assert problems == []
