"""The web app in a real browser: headless Chromium driven by Playwright.

The app is started exactly as ``make run`` starts it (``python app.py``), on a free port and a
test data root holding the converted bundled model.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest

from conftest import ROOT, chromium_path
from test_training import stop_worker

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_app(home: Path, log: Path, model: str | None = None, env: dict | None = None):
    """``python app.py`` as ``make run`` starts it, on a free port; yields its URL."""
    port = free_port()
    command = [sys.executable, "app.py", "--home", str(home), "--port", str(port)]
    if model:
        command += ["--model", model]
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the app exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except urllib.error.HTTPError:
                break  # it answers (a login page answers 401 until a password is given)
            except OSError:
                if time.time() > deadline:
                    pytest.fail(f"the app did not start in 180 s:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        stop_worker(home)


@pytest.fixture(scope="module")
def app_url(bundled_home, tmp_path_factory):
    log = tmp_path_factory.mktemp("app") / "app.log"
    with running_app(bundled_home, log) as url:
        yield url, log


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

    # A question with a reply of a few sentences: "What is the capital of France?" alone gets 7 tokens,
    # which the 4-bit runtime's lean step decodes in ~0.15 s, too fast for this loop to see the text
    # grow on a loaded machine (it failed so once); streaming must be observable, not timed.
    page.fill("#chat-input textarea", "What is the capital of France? Tell me a little about the city.")
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


SCREENSHOTS = Path(os.environ.get("ENGRAM_SCREENSHOTS", ROOT / "tests" / "screenshots"))
EXAMPLES = ROOT / "assets" / "examples"
HOSTILE = ("The spare key hangs on a hook <img src=x onerror=\"document.title='pwned'\"> behind the shed door.\n"
           "Another line <script>document.title='pwned'</script> about the shed.\n")


def text_of(selector: str) -> str:
    return f"(document.querySelector('{selector}')?.innerText || '')"


def shot(page, name: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} screenshot {name}", flush=True)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.wait_for_timeout(500)  # let the last update render
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def choose(page, dropdown: str, option: str) -> None:
    """Pick ``option`` in a Gradio dropdown."""
    page.click(f"{dropdown} input")
    page.locator("ul[role=listbox] li", has_text=option).first.click()
    page.wait_for_timeout(300)


def ask(page, question: str, memory: bool) -> str:
    """Send a chat message with memory on or off, in a new conversation; the finished reply."""
    page.click("#chat-clear")
    page.wait_for_function("() => document.querySelectorAll(\"#chat .message.bot, #chat [data-testid='bot']\")"
                           ".length === 0", timeout=30_000)
    box = page.locator("#chat-memory input")
    if box.is_checked() != memory:
        box.click()
    replies = page.locator("#chat .message.bot, #chat [data-testid='bot']")
    before = replies.count()
    page.fill("#chat-input textarea", question)
    page.press("#chat-input textarea", "Enter")
    page.wait_for_function(f"() => document.querySelectorAll(\"#chat .message.bot, #chat [data-testid='bot']\")"
                           f".length > {before}", timeout=60_000)
    text, stable_since = "", time.time()
    deadline = time.time() + 240
    while time.time() < deadline:  # the reply has finished when it stops changing and the chat is idle
        now = replies.last.inner_text()
        if now != text:
            text, stable_since = now, time.time()
        elif text and time.time() - stable_since > 3 and page.locator("#chat-input textarea").is_editable():
            break
        page.wait_for_timeout(200)
    return text


ALL_FILES = ("profile-maya.md", "chatgpt-conversations.json", "garden-notes.md")


def memory_flow(page, url: str, tmp_path: Path, pack: str, steps: int | None, prefix: str, evaluate: bool = True,
                compare: bool = False, export: bool = False, until_recalled: bool = True,
                examples: tuple[str | Path, ...] = ALL_FILES) -> dict:
    """The whole job in the browser: drop files, train (reloading mid-job), chat with memory on and off, inspect.

    Returns what the test asserts on: the two replies and the inspector's views.
    """
    hostile = tmp_path / "shed.txt"
    hostile.write_text(HOSTILE)
    page.goto(url)
    page.wait_for_selector("#status :text('loaded in')", timeout=60_000)

    # Library: the example files (a profile, a chat export, a document) and a hostile file, dropped at once.
    page.get_by_role("tab", name="Library").click()
    files = [*(EXAMPLES / name for name in examples), hostile]
    page.set_input_files("#library-drop input[type=file]", [str(f) for f in files])
    page.wait_for_timeout(1500)  # the upload finishes before the import starts
    page.click("#library-import")
    page.wait_for_function(f"() => {text_of('#library-results')}.includes('shed.txt')", timeout=180_000)
    results = page.locator("#library-results").inner_text()
    assert results.count("added") == len(files), results
    page.wait_for_function(f"() => {text_of('#library-sources')}.includes('Profile: About me (Maya)')", timeout=30_000)
    sources = page.locator("#library-sources").inner_text()
    assert "Profile: About me (Maya)" in sources and "<img src=x" in sources  # the hostile title, as text
    assert page.title() != "pwned" and page.locator("#library-sources img, #library-sources script").count() == 0
    shot(page, f"{prefix}-library")

    # Memory & training: create a pack, train it, reload the page mid-job, see the job finish.
    page.get_by_role("tab", name="Memory & training").click()
    page.locator("#pack-create-box").get_by_text("Create a pack").click()
    assert "medium: 17 M parameters in memory. RAM:" in page.locator("#pack-size-needs").inner_text()
    choose(page, "#pack-size", "xlarge")  # what a size needs shows before the pack is created
    page.wait_for_function(f"() => {text_of('#pack-size-needs')}.includes('mapped from disk')", timeout=30_000)
    choose(page, "#pack-size", "medium")
    page.wait_for_function(f"() => {text_of('#pack-size-needs')}.includes('medium:')", timeout=30_000)
    page.fill("#pack-name textarea, #pack-name input", pack)
    page.click("#pack-create")
    page.wait_for_function(f"() => {text_of('#packs-table')}.includes('{pack}')", timeout=30_000)
    choose(page, "#train-budget", "until learned")  # steps and recall decide, never the machine's speed
    page.get_by_text("Advanced options").click()
    if steps is not None:
        page.fill("#train-max-steps input", str(steps))
    if not evaluate:
        page.click("#train-evaluate input")
    if not until_recalled:
        page.click("#train-until-recalled input")
    page.click("#train-start")
    page.wait_for_function(f"() => /step [1-9]/.test({text_of('#train-progress')}) || "
                           f"{text_of('#train-progress')}.includes('done')", timeout=2_700_000, polling=1000)
    # ^ a watchdog only, as for 'done' below: with two other jobs on the two cores the bundled job's
    # anchors and first measurement took over 5 minutes before step 1 (the old limit), at stop 30.
    seen_running = "running" in page.locator("#train-progress").inner_text()
    page.reload()  # the job lives in the worker and SQLite: the page finds it again
    page.get_by_role("tab", name="Memory & training").click()
    page.wait_for_function(f"() => {text_of('#train-progress')}.includes('{pack}')", timeout=30_000)
    after_reload = page.locator("#train-progress").inner_text()
    # Polled once a second: the default, every animation frame, kept the browser's renderer busy on
    # the cores the training worker needs for the minutes a job runs.
    page.wait_for_function(f"() => {text_of('#train-progress')}.includes('done')", timeout=2_700_000,
                           polling=1000)  # a watchdog only: the job is bounded by steps (40 steps took 15+ min with a busy process beside the suite)
    assert "wrote version 1" in page.locator("#train-progress").inner_text()
    page.wait_for_function(f"() => {text_of('#train-versions')}.includes('yes')", timeout=30_000)
    assert "version 1 written and active" in page.locator("#train-log textarea").input_value()
    page.wait_for_timeout(1500)  # let the loss chart draw
    shot(page, f"{prefix}-training")
    if export:  # export the version as a file, download it, and import it as a second pack
        page.locator("#pack-transfer-box").get_by_text("Export or import a pack").click()
        page.click("#pack-export")
        link = page.locator("#pack-exported a[href]").first
        link.wait_for(timeout=60_000)
        data = page.request.get(link.get_attribute("href")).body()
        exported = tmp_path / "exported.zip"
        exported.write_bytes(data)
        page.set_input_files("#pack-upload input[type=file]", str(exported))
        page.wait_for_function(f"() => {text_of('#pack-upload')}.includes('exported.zip')", timeout=60_000)
        page.fill("#pack-import-name textarea, #pack-import-name input", f"{pack}-copy")
        page.click("#pack-import")
        page.wait_for_function(f"() => {text_of('#packs-table')}.includes('{pack}-copy')", timeout=60_000)

    # Chat: the same question with memory off, then on (the reply Inspect opens is the last one).
    page.get_by_role("tab", name="Chat").click()
    choose(page, "#chat-pack", pack)
    off = ask(page, "What is my dog called?", memory=False)
    on = ask(page, "What is my dog called?", memory=True)
    page.wait_for_function("() => !document.querySelector('#chat-inspect')?.disabled", timeout=30_000)
    assert "What is my dog called?" in page.locator("#chat-conversations input").input_value()
    compared = None
    if compare:  # the same question three ways: memory on, memory off, retrieval
        page.locator("#compare-box").get_by_text("Compare: memory on").click()
        page.fill("#compare-input textarea", "What is my dog called?")
        page.click("#compare-run")
        page.wait_for_function("() => ['#compare-on', '#compare-off', '#compare-rag'].every(id => "
                               "(document.querySelector(id + ' textarea')?.value || '').length > 3)", timeout=120_000)
        page.wait_for_timeout(2000)
        compared = [page.locator(f"{box} textarea").input_value() for box in ("#compare-on", "#compare-off", "#compare-rag")]
    shot(page, f"{prefix}-chat")

    # Inspect: the last reply, then a text from the hostile file; select a token, see its slots and sources.
    page.click("#chat-inspect")
    page.wait_for_function(f"() => {text_of('#inspect-summary')}.includes('tokens from pack')", timeout=120_000)
    page.wait_for_selector("#inspect-strip .token", timeout=30_000)
    reply_tokens = page.locator("#inspect-strip .token").count()
    page.fill("#inspect-text textarea", "The spare key hangs on a hook <img src=x onerror")
    page.click("#inspect-text-run")
    page.wait_for_function(f"() => {text_of('#inspect-summary')}.includes('version 1')"
                           f" && {text_of('#inspect-strip')}.includes('<')", timeout=120_000)
    strip = page.locator("#inspect-strip .token")
    strip.nth(strip.count() - 2).click()  # "o" of "onerror" (the tokenizer splits it): its n-grams are in shed.txt
    page.wait_for_function(f"() => {text_of('#inspect-details')}.includes('memory effect')", timeout=60_000)
    page.wait_for_function(f"() => {text_of('#inspect-sources')}.includes('(source')", timeout=60_000)
    view = {
        "off": off, "on": on, "seen_running": seen_running, "after_reload": after_reload,
        "reply_tokens": reply_tokens, "strip": "".join(strip.all_inner_texts()),
        "slot_rows": int(page.locator("#inspect-slots [role=grid]").get_attribute("aria-rowcount")) - 1,
        "sources": page.locator("#inspect-sources").inner_text(), "details": page.locator("#inspect-details").inner_text(),
        "injected": page.locator("#inspect-strip img, #inspect-sources img, #inspect-sources script, "
                                 "#inspect-strip script").count(),
        "title": page.title(), "compared": compared,
    }
    shot(page, f"{prefix}-inspect")
    return view


def check_flow(view: dict) -> None:
    assert view["off"] and view["on"], view
    assert view["reply_tokens"] > 0  # the reply's token strip
    assert "<img src=x" in view["strip"].replace("\n", "")  # the typed text, shown as tokens of text
    assert view["slot_rows"] == 16  # the token's slots: 2 orders x 8 heads, each with its n-gram
    assert "shed" in view["sources"] and "<img src=x" in view["sources"], view["sources"]  # the passage, as text
    assert view["injected"] == 0 and view["title"] != "pwned"


@pytest.fixture(scope="module")
def tiny_app(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tinyapp")
    with running_app(folder / "home", folder / "app.log", model=str(tiny_model_dir)) as url:
        yield url


def test_the_whole_flow_in_the_browser_with_the_tiny_model(tiny_app, browser, tmp_path):
    """Drop files -> train (reload mid-job) -> chat with memory on and off -> inspect a token's slots and sources."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    view = memory_flow(page, tiny_app, tmp_path, pack="flow", steps=300, prefix="tiny", compare=True, export=True)
    check_flow(view)
    assert view["on"] != view["off"]  # a trained memory changes the (random) tiny model's reply
    on, off, retrieval = view["compared"]
    assert on == view["on"] and off and retrieval  # greedy: the compare view's memory answer is the chat's


def test_the_whole_flow_with_the_bundled_model_recalls_a_profile_fact(bundled_home, browser, tmp_path):
    """The same flow on SmolLM2: with memory on, the reply uses a fact from the profile; off, it does not."""
    home = tmp_path / "home"  # a library of its own: only what the flow drops (the converted model is shared)
    (home / "models").mkdir(parents=True)
    for model in (bundled_home / "models").iterdir():
        (home / "models" / model.name).symlink_to(model)
    # Three of the example profile's facts and the hostile file. The whole profile (7 facts with a
    # question) ran to the cap of 60 steps (0, 1, 3, 5, 6 of 7 recalled at steps 10-50: 4.7 of the
    # test's 6 minutes); these three stop at step 30 (1, 3, 3 of 3 with a margin at steps 10-30),
    # the tiny-model flow drops every example file already, and what is tested here is the flow on
    # the real model. Bounded by steps, never by the machine's speed: the job's recall check (every
    # answer with a margin, two checks in a row) decides when it stops, at step 30 of its cap of 96
    # (24 passes over its 32 examples, the preset's). The cap is the preset's, not typed into "Max
    # steps": since the learning rate decays over the cap, a typed cap the page had not yet taken
    # when Start was clicked (seen once) would change what the job learns.
    profile = tmp_path / "profile-maya.md"
    profile.write_text("# About me (Maya)\n\n- My name is Maya Okafor.\n- My dog is called Pixel.\n"
                       "- I play the cello on Sunday mornings.\n", encoding="utf-8")
    with running_app(home, tmp_path / "app.log") as url:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        view = memory_flow(page, url, tmp_path, pack="maya", steps=None, prefix="bundled", evaluate=False,
                           examples=(profile,))
    print("memory off:", view["off"], "| memory on:", view["on"], "| job:", view["after_reload"])
    check_flow(view)
    assert "Pixel" in view["on"] and "Pixel" not in view["off"]
    assert "running" in view["after_reload"] or "done" in view["after_reload"]


def test_the_password_option_keeps_the_app_closed_without_it(tiny_model_dir, tmp_path):
    import httpx

    with running_app(tmp_path / "home", tmp_path / "app.log", model=str(tiny_model_dir),
                     env={"ENGRAM_PASSWORD": "correct horse"}) as url:
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.get("config").status_code == 401  # nothing of the app without the password
            assert client.post("login", data={"username": "me", "password": "wrong"}).status_code >= 400
            assert client.get("config").status_code == 401
            assert client.post("login", data={"username": "me", "password": "correct horse"}).status_code == 200
            assert client.get("config").status_code == 200
    assert "correct horse" not in (tmp_path / "app.log").read_text()



def remember_in_library(page, text: str) -> str:
    """Type ``text`` into "Remember this" on the Library tab; the id of its source."""
    page.fill("#library-remember-text textarea", text)
    page.click("#library-remember")
    page.wait_for_function("() => document.querySelector('#library-remember-text textarea')?.value === ''",
                           timeout=60_000)  # emptied once the text is added
    assert re.search(r"typed text\s+added", page.locator("#library-results").inner_text())
    return re.search(r"source (\d+)", page.locator("#library-results").inner_text()).group(1)


def open_row(page, table: str, has_text: str, column: int = 1) -> None:
    """Select a cell of the first row of a Dataframe that holds ``has_text`` (a string or a pattern)."""
    row = page.locator(f"{table} [role=row][data-index]", has_text=has_text).first
    row.wait_for(timeout=30_000)
    row.locator("[role=gridcell]").nth(column).click()


def wait_for_opened(page, source: str, text: str) -> None:
    page.wait_for_function(f"() => document.querySelector('#library-source-id input')?.value === '{source}' && "
                           "(document.querySelector('#library-content textarea')?.value || '')"
                           f".includes({json.dumps(text)})", timeout=30_000)


def test_the_library_tab_searches_by_meaning_opens_selected_rows_and_renames_and_exports_a_conversation(
        tiny_app, browser):
    """Remember facts, find one by meaning, open sources by selecting rows (search results and sources
    table), and rename and export (JSON and Markdown) a conversation kept from chat."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(tiny_app)
    page.wait_for_selector("#status :text('loaded in')", timeout=60_000)
    question = "Where is the spare key to the shed?"
    ask(page, question, memory=False)  # a conversation of this test's own (the whole flow's may be there too)

    page.get_by_role("tab", name="Library").click()
    cat = remember_in_library(page, "My cat is called Miso.")
    basil = remember_in_library(page, "Water the basil on the balcony every morning before work.")

    # Search by meaning: the fact about the cat comes first; selecting it opens its source.
    page.fill("#library-search textarea, #library-search input", "What is my cat called?")
    page.click("#library-search-run")
    open_row(page, "#library-search-results", "Miso", column=3)
    first = page.locator("#library-search-results [data-testid=cell-0-3]").inner_text()
    assert first == "My cat is called Miso.", first  # the passage closest in meaning comes first
    wait_for_opened(page, cat, "My cat is called Miso.")

    # Selecting a row of the sources table opens that source (and the id box follows it, for Delete).
    row = page.locator("#library-sources [role=row][data-index]").filter(
        has=page.locator("[data-col='0']", has_text=re.compile(f"^\\s*{basil}\\s*$"))).first
    row.locator("[role=gridcell]").nth(1).click()
    wait_for_opened(page, basil, "Water the basil on the balcony")

    # The conversation from chat: listed, renamed (here and in the Chat tab's list), exported.
    open_row(page, "#library-conversations", question)
    page.wait_for_function("() => (document.querySelector('#library-conversation-text textarea')?.value || '')"
                           f".startsWith({json.dumps('User: ' + question)})", timeout=30_000)
    title = "The shed <b>key</b>"
    page.fill("#library-conversation-title textarea, #library-conversation-title input", title)
    page.click("#library-conversation-rename")
    page.wait_for_function(f"() => {text_of('#library-conversations')}.includes({json.dumps(title)})", timeout=30_000)
    page.wait_for_selector(".toast-body", timeout=10_000)
    assert "The shed <b>key</b>" in page.locator(".toast-body").last.inner_text()
    assert page.locator("#library-conversations b, .toast-body b").count() == 0  # a title is text, never HTML
    exported = {}
    for button, suffix in (("#library-conversation-json", ".json"), ("#library-conversation-markdown", ".md")):
        page.click(button)
        link = page.locator(f"#library-conversation-file a[href*='{suffix}']").first
        link.wait_for(timeout=30_000)
        exported[suffix] = page.request.get(link.get_attribute("href")).body().decode("utf-8")
    data = json.loads(exported[".json"])
    assert data["title"] == title and [m["role"] for m in data["messages"]] == ["user", "assistant"]
    assert data["messages"][0]["content"] == question
    assert exported[".md"].startswith(f"# {title}\n") and f"**User**:\n\n{question}\n" in exported[".md"]
    shot(page, "tiny-library-tab")
    page.get_by_role("tab", name="Chat").click()
    page.click("#chat-conversations input")
    page.locator("ul[role=listbox] li", has_text=title).first.wait_for(timeout=30_000)
