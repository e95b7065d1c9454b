"""The web app trusts no one it should not: requests for foreign host names (DNS rebinding) are
refused, failed logins are limited, Gradio's copies of user files stay under the data root and
are removed once used, and the data root is private to its user.

The app is served for real (``launch`` as ``app.py`` runs it, on 127.0.0.1 and a free port, with a
tiny model) and spoken to over HTTP.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import stat
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from engram_app.cli import cli
from engram_app.errors import EngramError
from engram_app.service import Service
from engram_app.settings import Settings, allowed_host_names
from engram_app.ui.security import HostPolicy, LoginLimiter, host_name
from test_training import PROFILE_A, add_profile, run_inline, stop_worker

REFUSED = ("Refused: Engram Studio does not answer to the host name 'evil.example'. If you opened the app by that "
           "name yourself, start it with --allowed-host evil.example (or ENGRAM_ALLOWED_HOSTS).")
PASSWORD = "correct horse"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@contextlib.contextmanager
def served(settings: Settings):
    """The app served in this process as ``app.py`` serves it; yields an HTTP client for it."""
    from engram_app.ui import launch

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_TEMP_DIR", os.environ.get("GRADIO_TEMP_DIR", ""))  # restored afterwards
        app = launch(settings, block=False)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{settings.port}", timeout=60) as client:
                yield client
        finally:
            app.close(verbose=False)
            stop_worker(settings.home)


@pytest.fixture(scope="module")
def open_app(tmp_path_factory, tiny_model_dir):
    """No password, one extra allowed name, and a file a killed app left in Gradio's cache."""
    tmp = tmp_path_factory.mktemp("open")
    settings = Settings(home=tmp / "home", model=str(tiny_model_dir), device="cpu", port=free_port(),
                        allowed_hosts=("studio.lan",))
    stale = settings.home / "cache" / "left-by-a-killed-app.txt"
    stale.parent.mkdir(parents=True)
    stale.write_text("an upload from before")
    with served(settings) as client:
        yield client, settings, stale


@pytest.fixture
def locked_app(tmp_path_factory, tiny_model_dir):
    """A password set. Not kept for the module: Gradio reads its cache folder from the environment
    when it checks uploads, so one app in a process at a time may take uploads."""
    tmp = tmp_path_factory.mktemp("locked")
    settings = Settings(home=tmp / "home", model=str(tiny_model_dir), device="cpu", port=free_port(),
                        password=PASSWORD)
    with served(settings) as client:
        yield client, settings


def call(client: httpx.Client, api_name: str, *data) -> list:
    """Call a Gradio API endpoint and return its outputs (or fail with the error it sent)."""
    started = client.post(f"/gradio_api/call/{api_name}", json={"data": list(data)})
    assert started.status_code == 200, started.text
    events = client.get(f"/gradio_api/call/{api_name}/{started.json()['event_id']}").text
    kinds = re.findall(r"^event: (\w+)$", events, re.M)
    payloads = re.findall(r"^data: (.*)$", events, re.M)
    assert kinds[-1] == "complete", events
    return json.loads(payloads[-1])


# --- Host header ---------------------------------------------------------------------------------

def test_a_foreign_host_name_is_refused_on_the_page_and_the_api(open_app):
    client, settings, _ = open_app
    foreign = {"Host": f"evil.example:{settings.port}"}
    for method, path in [("GET", "/"), ("GET", "/config"), ("GET", "/gradio_api/info"),
                         ("POST", "/gradio_api/call/show_source"), ("POST", "/gradio_api/upload")]:
        response = client.request(method, path, headers=foreign, json={"data": [1]} if method == "POST" else None)
        assert (response.status_code, response.text) == (400, REFUSED), (method, path)
        assert response.headers["content-type"] == "text/plain; charset=utf-8"


def test_the_loopback_names_and_an_allowed_name_are_served(open_app):
    client, settings, _ = open_app
    for host in ["127.0.0.1", "localhost", "[::1]", "studio.lan", "STUDIO.lan"]:
        headers = {"Host": f"{host}:{settings.port}"}
        page = client.get("/", headers=headers)
        assert page.status_code == 200 and '"title":"Engram Studio"' in page.text, host
        config = client.get("/config", headers=headers)
        assert config.status_code == 200 and config.json()["title"] == "Engram Studio", host
        info = client.get("/gradio_api/info", headers=headers)
        assert info.status_code == 200 and "/export_pack" in info.json()["named_endpoints"], host
    # A name that merely contains an allowed one is still foreign.
    assert client.get("/", headers={"Host": f"studio.lan.evil.example:{settings.port}"}).status_code == 400


def test_host_names_are_read_from_the_header_as_browsers_send_them():
    assert host_name("evil.example:7860") == "evil.example"
    assert host_name("LocalHost.:7860") == "localhost"
    assert host_name("[::1]:7860") == "::1"
    assert [host_name(h) for h in (None, "", "127.0.0.1:port", "a b:80", "evil.example/x")] == [None] * 5


def test_an_app_bound_to_every_interface_answers_to_ip_addresses_but_not_to_other_names():
    policy = HostPolicy.for_settings(Settings(host="0.0.0.0", allowed_hosts=("studio.lan",)))
    allowed = ("192.168.1.5:7860", "[fe80::1]:7860", "localhost:7860", "studio.lan")
    assert [policy.allows(h) for h in allowed] == [True] * 4
    assert [policy.allows(h) for h in ("evil.example:7860", "0x7f000001.example:7860", None)] == [False] * 3
    bound = HostPolicy.for_settings(Settings(host="192.168.1.5"))
    assert bound.allows("192.168.1.5:7860") and bound.allows("127.0.0.1:7860")
    assert not bound.allows("192.168.1.6:7860")  # only the address it is bound to


def test_allowed_hosts_come_from_the_option_and_the_environment_and_a_wildcard_is_refused(monkeypatch, tmp_path):
    assert allowed_host_names(["Studio.LAN", "a.example:7860, [fe80::1]:80 studio.lan"]) == \
        ("studio.lan", "a.example", "fe80::1")
    for bad in ("*", "*.example.com", "http://studio.lan", "studio.lan:port", "a..b", "[::1]x"):
        with pytest.raises(EngramError, match="is not a host name or an IP address"):
            allowed_host_names([bad])
    seen: list[Settings] = []
    monkeypatch.setattr("engram_app.ui.launch", seen.append)
    runner = CliRunner()
    result = runner.invoke(cli, ["serve", "--home", str(tmp_path), "--allowed-host", "a.lan",
                                 "--allowed-host", "b.lan"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["serve", "--home", str(tmp_path)], env={"ENGRAM_ALLOWED_HOSTS": "c.lan,d.lan"})
    assert result.exit_code == 0, result.output
    assert [s.allowed_hosts for s in seen] == [("a.lan", "b.lan"), ("c.lan", "d.lan")]
    result = runner.invoke(cli, ["serve", "--home", str(tmp_path), "--allowed-host", "*"])
    assert result.exit_code == 1 and "is not a host name" in result.output


# --- failed logins ---------------------------------------------------------------------------------

def test_failed_logins_are_limited_per_client_and_the_limit_lifts_after_the_window():
    now = [1000.0]
    limiter = LoginLimiter(max_failures=3, window=60.0, clock=lambda: now[0])
    for _ in range(3):
        assert limiter.retry_after("10.0.0.1") == 0
        limiter.failed("10.0.0.1")
        now[0] += 1
    assert limiter.retry_after("10.0.0.1") == 57.0  # the first failure leaves the window at 1060
    assert limiter.retry_after("10.0.0.2") == 0  # another client is not held back
    now[0] = 1060.0
    assert limiter.retry_after("10.0.0.1") == 0
    limiter.failed("10.0.0.1")
    limiter.succeeded("10.0.0.1")  # a success forgets the failures
    assert limiter._failures == {}


def test_after_five_failed_logins_the_app_refuses_even_the_right_password(locked_app):
    client, settings = locked_app
    wrong = {"username": "me", "password": "wrong"}
    for _ in range(4):
        response = client.post("/login", data=wrong)
        assert (response.status_code, response.json()) == (400, {"detail": "Incorrect credentials."})
    assert client.post("/login", data={"username": "me", "password": PASSWORD}).status_code == 200  # clears the count
    client.cookies.clear()
    for _ in range(5):
        assert client.post("/login", data=wrong).status_code == 400
    refused = client.post("/login", data={"username": "me", "password": PASSWORD})
    assert refused.status_code == 429
    seconds = int(refused.headers["Retry-After"])
    assert refused.text == f"Too many failed logins from your address: try again in {seconds} s."
    assert 290 < seconds <= 300
    assert client.get("/config").status_code == 401  # still nothing of the app without logging in
    # A foreign host name is refused before the password is even looked at.
    response = client.post("/login", data=wrong, headers={"Host": "evil.example"})
    assert (response.status_code, response.text) == (400, REFUSED)


# --- Gradio's files and the data root ------------------------------------------------------------

def test_gradio_keeps_uploads_under_the_data_root_and_drops_them_once_imported(open_app):
    client, settings, stale = open_app
    cache = settings.home / "cache"
    assert not stale.exists()  # what a killed app left is removed at start
    uploaded = client.post("/gradio_api/upload", files=[("files", ("notes.md", b"# Notes\n- I like tea.\n"))])
    assert uploaded.status_code == 200
    [path] = uploaded.json()
    assert Path(path).is_relative_to(cache) and Path(path).read_bytes() == b"# Notes\n- I like tea.\n"
    assert mode(Path(path)) == 0o600
    rows, *_ = call(client, "ingest", [{"path": path, "meta": {"_type": "gradio.FileData"}}], "auto", "default", "",
                    "ready")
    assert [r[:2] for r in rows["data"]] == [["notes.md", "added"]]
    left = [p for p in cache.rglob("*") if p.is_file() and p.read_bytes() == b"# Notes\n- I like tea.\n"]
    assert left == []


def test_a_pack_exported_for_download_lives_in_the_cache_and_is_gone_once_replaced_or_the_app_stops(
        tmp_path, tiny_model_dir):
    from gradio_client import Client

    settings = Settings(home=tmp_path / "home", model=str(tiny_model_dir), device="cpu", port=free_port())
    before = set(Path(tempfile.gettempdir()).glob("engram-export-*"))
    with served(settings) as client:
        [upload] = client.post("/gradio_api/upload", files=[("files", ("a.txt", b"private"))]).json()
        # One API session (as a browser tab is): the pack list it is offered is the one create_pack returned.
        api = Client(str(client.base_url), download_files=False, verbose=False)
        api.predict("me", "small", "engram", api_name="/create_pack")
        service = Service(settings)  # the same data root as the app's
        add_profile(service, tmp_path, "me.md", PROFILE_A)
        run_inline(service, "me", max_steps=2, evaluate=False)
        first = Path(api.predict("me", api_name="/export_pack")["path"])
        second = Path(api.predict("me", api_name="/export_pack")["path"])
        exports = settings.home / "cache" / "exports"
        assert first.is_relative_to(exports) and second.is_relative_to(exports) and second.name == "me-v1.zip"
        assert not first.exists()  # a new export replaces the last one
        assert mode(second) == 0o600 and mode(second.parent) == 0o700
        download = client.get(f"/gradio_api/file={second}")
        assert download.status_code == 200 and download.content[:2] == b"PK"
        assert Path(upload).exists()
        api.close()
    # Gradio empties its cache as its server shuts down, which a loaded machine may finish after close().
    deadline = time.monotonic() + 30
    while (second.exists() or Path(upload).exists()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not second.exists() and not Path(upload).exists()  # Gradio empties its cache when the app stops
    assert set(Path(tempfile.gettempdir()).glob("engram-export-*")) == before  # nothing written to /tmp


def test_a_new_data_root_and_its_database_are_private_to_the_user(tmp_path):
    service = Service(Settings(home=tmp_path / "fresh" / "home", device="cpu"))
    service.db()
    home = service.settings.home
    assert mode(home) == 0o700
    assert mode(home / "engram.db") == 0o600
    assert [mode(p) for p in home.glob("engram.db-*")] == [0o600] * len(list(home.glob("engram.db-*")))
    (home / "packs" / "me").mkdir(parents=True)
    (home / "packs" / "me" / "file.json").write_text("{}")
    assert (mode(home / "packs"), mode(home / "packs" / "me" / "file.json")) == (0o700, 0o600)


def test_an_existing_data_root_open_to_others_is_tightened(tmp_path):
    home = tmp_path / "old"
    home.mkdir(mode=0o755)
    home.chmod(0o755)
    for name in ("engram.db", "worker.log"):
        (home / name).write_text("")
        (home / name).chmod(0o644)
    (home / "notes.txt").write_text("the user's own file")
    (home / "notes.txt").chmod(0o644)
    Settings(home=home).ensure_home()
    assert (mode(home), mode(home / "engram.db"), mode(home / "worker.log")) == (0o700, 0o600, 0o600)
    assert mode(home / "notes.txt") == 0o644  # not the app's: left alone


def test_an_error_popup_shows_a_file_name_or_typed_text_as_text_not_html():
    """Gradio's pop-ups render their message as HTML; the service's refusals quote names a user chose
    (a file, a model path), so they reach the page escaped."""
    import gradio as gr

    from engram_app.ui.errors import user_errors

    with pytest.raises(gr.Error) as raised:
        with user_errors():
            raise EngramError("Model '<img src=x onerror=alert(1)>' not found.")
    assert raised.value.message == "Model '&lt;img src=x onerror=alert(1)&gt;' not found."
