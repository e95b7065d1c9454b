"""The web app in a real browser: headless Chromium driven by Playwright.

The app is started exactly as ``make run`` starts it (``python app.py``), on a free port and a
test data root holding the converted bundled model.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
import urllib.request
from urllib.parse import urlparse

import pytest

from conftest import ROOT, chromium_path

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(bundled_home, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("app") / "app.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "app.py", "--home", str(bundled_home), "--port", str(port)],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the app exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail(f"the app did not start in 180 s:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield url, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def browser():
    path = chromium_path()
    if path is None:
        pytest.skip("Chromium is not installed (make test installs it with apt-get when run as root)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def test_app_binds_localhost_and_prints_load_time(app_url):
    url, log = app_url
    assert urlparse(url).hostname == "127.0.0.1"
    text = log.read_text()
    assert "loaded in" in text


def test_chat_message_gets_a_streamed_reply(app_url, browser, tmp_path):
    url, _ = app_url
    page = browser.new_page()
    outside: list[str] = []
    page.on("request", lambda r: outside.append(r.url) if urlparse(r.url).hostname not in ("127.0.0.1", "localhost") and not r.url.startswith(("data:", "blob:")) else None)
    page.goto(url)
    page.wait_for_selector("#chat-input textarea", timeout=60_000)
    page.wait_for_selector("#status :text('loaded in')", timeout=60_000)

    page.fill("#chat-input textarea", "What is the capital of France?")
    page.press("#chat-input textarea", "Enter")

    bot = page.locator("#chat .message.bot, #chat [data-testid='bot']").last
    seen: list[str] = []
    deadline = time.time() + 120
    while time.time() < deadline:
        text = bot.inner_text() if bot.count() else ""
        if text and (not seen or text != seen[-1]):
            seen.append(text)
        if "Paris" in text and len(seen) > 2:
            # Keep watching until the text stops changing.
            time.sleep(1.5)
            final = bot.inner_text()
            if final == text:
                break
        time.sleep(0.05)
    page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
    assert seen, "no reply appeared"
    assert "Paris" in seen[-1]
    assert len(seen) >= 3, f"the reply did not stream: {seen}"
    assert all(seen[-1].startswith(partial.rstrip()) for partial in seen), seen
    assert outside == [], f"the page reached outside the machine: {outside[:5]}"


def test_library_tab_imports_dropped_files_and_shows_reads_and_deletes_them(app_url, browser, tmp_path):
    url, _ = app_url
    folder = tmp_path / "drop"
    folder.mkdir()
    hostile_title = "<img src=x onerror=\"document.title='pwned'\"> notes"
    (folder / "garden.md").write_text(f"# {hostile_title}\n\nThe basil grows best in the sun on the balcony.\n")
    (folder / "me.json").write_text('{"name": "Ana", "pet": "a turtle named Timothy", "city": "Lisbon"}')
    (folder / "empty.txt").write_bytes(b"")
    page = browser.new_page()
    page.goto(url)
    page.get_by_role("tab", name="Library").click()
    page.wait_for_selector("#library-drop", timeout=60_000)
    page.set_input_files("#library-drop input[type=file]", [str(p) for p in sorted(folder.iterdir())])
    page.wait_for_timeout(1500)  # the upload finishes before the import starts
    page.click("#library-import")
    results = page.locator("#library-results")
    page.wait_for_function(
        "() => { const t = document.querySelector('#library-results')?.innerText || ''; "
        "return t.includes('garden.md') && t.includes('me.json') && t.includes('empty.txt'); }", timeout=180_000)
    text = results.inner_text()
    assert text.count("added") == 2 and "failed" in text and "empty" in text.lower(), text

    sources = page.locator("#library-sources")
    page.wait_for_function("() => (document.querySelector('#library-sources')?.innerText || '').includes('notes')",
                           timeout=30_000)
    assert "Profile: Ana" in sources.inner_text()
    # A title taken from a user's file is shown as text, never run as HTML.
    assert page.title() != "pwned"
    assert page.locator("#library-sources img").count() == 0

    source_id = re.search(r"garden\.md.*?\(source (\d+)\)", text, re.S).group(1)
    page.fill("#library-source-id input", source_id)
    page.click("#library-open")
    page.wait_for_function("() => (document.querySelector('#library-content textarea')?.value || '')"
                           ".includes('basil grows best')", timeout=30_000)
    page.click("#library-delete")
    page.wait_for_function("() => !(document.querySelector('#library-sources')?.innerText || '').includes('notes')",
                           timeout=30_000)
    page.screenshot(path=str(tmp_path / "library.png"), full_page=True)


def test_training_tab_creates_a_pack_trains_it_in_the_worker_and_survives_a_reload(app_url, browser, tmp_path):
    url, _ = app_url
    profile = tmp_path / "me.md"
    profile.write_text("- My dog is called Pixel.\n- I live in Porto.\n")
    page = browser.new_page()
    page.goto(url)
    page.get_by_role("tab", name="Library").click()
    page.set_input_files("#library-drop input[type=file]", [str(profile)])
    page.wait_for_timeout(1500)
    page.click("#library-import")
    page.wait_for_function("() => (document.querySelector('#library-results')?.innerText || '').includes('me.md')",
                           timeout=120_000)

    page.get_by_role("tab", name="Memory & training").click()
    page.locator("#pack-create-box").get_by_text("Create a pack").click()
    page.fill("#pack-name textarea, #pack-name input", "browser")
    page.click("#pack-create")
    page.wait_for_function("() => (document.querySelector('#packs-table')?.innerText || '').includes('browser')",
                           timeout=30_000)
    page.get_by_text("Advanced options").click()
    page.fill("#train-max-steps input", "3")
    page.click("#train-evaluate input")  # no evaluation: the test only needs the version
    page.click("#train-start")
    page.wait_for_function("() => (document.querySelector('#train-progress')?.innerText || '').includes('running')"
                           " || (document.querySelector('#train-progress')?.innerText || '').includes('done')",
                           timeout=120_000)
    page.reload()  # the job lives in the worker and SQLite: the page finds it again
    page.get_by_role("tab", name="Memory & training").click()
    page.wait_for_function("() => (document.querySelector('#train-progress')?.innerText || '').includes('done')",
                           timeout=300_000)
    assert "wrote version 1" in page.locator("#train-progress").inner_text()
    page.wait_for_function("() => (document.querySelector('#train-versions')?.innerText || '').includes('yes')",
                           timeout=30_000)
    assert "version 1 written and active" in page.locator("#train-log textarea").input_value()
    page.wait_for_timeout(2000)  # let the loss chart draw
    page.screenshot(path=str(tmp_path / "train.png"), full_page=True)
