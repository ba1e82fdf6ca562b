"""The demo page (GET /, ttds_ray/static/index.html) in a real headless Chromium against a running app.

The app (serving.create_app over a private copy of the shared tiny run, no Ray) runs under uvicorn in a
background thread on 127.0.0.1. Chromium (Debian's ``chromium`` package: ``apt-get install -y chromium``;
``TTDS_CHROMIUM`` names another binary) is driven over the DevTools protocol on a pipe
(``--remote-debugging-pipe``: JSON messages separated by NUL bytes on file descriptors 3 and 4), so the test
needs no Python package beyond the standard library and no port for the browser. The page is used as a
user would: text typed with ``Input.insertText``, buttons clicked, the DOM read back and compared with what
the HTTP API answers for the same request. Each test saves a screenshot under its tmp dir.
Skips (saying how to install it) only when no Chromium binary is found.
"""
from __future__ import annotations

import base64
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import copy_run

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--no-default-browser-check", "--mute-audio", "--hide-scrollbars",
                  "--remote-debugging-pipe"]


_TRAMPOLINE = """
import fcntl, os, sys
a, b = (fcntl.fcntl(int(fd), fcntl.F_DUPFD, 10) for fd in sys.argv[1:3])
os.dup2(a, 3); os.dup2(b, 4)
for fd in {a, b, int(sys.argv[1]), int(sys.argv[2])} - {3, 4}:
    os.close(fd)
os.execv(sys.argv[3], sys.argv[3:])
"""


def chromium_binary() -> str | None:
    """The browser: $TTDS_CHROMIUM, else chromium / chromium-browser / google-chrome on PATH; None: none."""
    env = os.environ.get("TTDS_CHROMIUM")
    if env:
        return shutil.which(env) or env               # a wrong setting fails in the fixture, saying so
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


NO_CHROMIUM = ("no Chromium binary: install Debian's package (apt-get install -y chromium) "
               "or set TTDS_CHROMIUM to a Chromium/Chrome executable")

# decided before any fixture runs, so a machine without a browser does not build the tiny run for nothing
pytestmark = pytest.mark.skipif(chromium_binary() is None, reason=NO_CHROMIUM)


# ----------------------------------------------------------------------------- the browser

class CdpError(AssertionError):
    pass


class Browser:
    """A headless Chromium driven over the DevTools protocol on a pipe (fd 3: commands in, fd 4: replies out)."""

    def __init__(self, exe: str, profile: Path, log: Path):
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()
        self.log = log
        self._log_f = open(log, "wb")
        # a small Python trampoline moves the pipe ends to fds 3 and 4 (where --remote-debugging-pipe expects
        # them) and execs chromium: no preexec_fn (the app's server thread is running)
        cmd = [sys.executable, "-c", _TRAMPOLINE, str(to_chrome_r), str(from_chrome_w), exe, *CHROMIUM_FLAGS,
               f"--user-data-dir={profile}", "about:blank"]
        self.proc = subprocess.Popen(cmd, pass_fds=(to_chrome_r, from_chrome_w), stdin=subprocess.DEVNULL,
                                     stdout=self._log_f, stderr=subprocess.STDOUT, start_new_session=True)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf, self._id, self.events = b"", 0, []

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        data = json.dumps(msg).encode() + b"\0"
        while data:
            data = data[os.write(self._w, data):]
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline, method)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise CdpError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def _read(self, deadline: float, what: str) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"chromium did not answer {what}; its log:\n{self.log_tail()}")
            if select.select([self._r], [], [], left)[0]:
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    raise CdpError(f"chromium exited (rc={self.proc.poll()}); its log:\n{self.log_tail()}")
                self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def log_tail(self, n: int = 3000) -> str:
        self._log_f.flush()
        return self.log.read_bytes()[-n:].decode(errors="replace")

    def new_page(self, width: int = 1280, height: int = 900) -> "Page":
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session, target)
        for m in ("Page.enable", "Runtime.enable"):
            page.cmd(m)
        page.cmd("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                        "mobile": False})
        return page

    def close(self):
        try:
            self.send("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._w, self._r):
            os.close(fd)
        self._log_f.close()


class Page:
    """One tab: evaluate JS, wait for a condition, type, click, screenshot."""

    def __init__(self, browser: Browser, session: str, target: str):
        self.b, self.session, self.target = browser, session, target

    def cmd(self, method: str, params: dict | None = None, timeout: float = 30):
        return self.b.send(method, params, self.session, timeout)

    def js(self, expr: str):
        r = self.cmd("Runtime.evaluate", {"expression": expr, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in r:
            raise CdpError(f"JS error in {expr!r}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait(self, expr: str, timeout: float = 30, what: str = ""):
        deadline = time.monotonic() + timeout
        while True:
            v = self.js(expr)
            if v:
                return v
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what or expr}; error box: {self.error_text()!r}; "
                                     f"page errors: {self.page_errors()}")
            time.sleep(0.05)

    def goto(self, url: str):
        self.cmd("Page.navigate", {"url": url})
        self.wait("document.readyState === 'complete' && document.body && document.body.dataset.ready === '1'",
                  what=f"{url} to load")

    def q(self, selector: str) -> str:
        return f"document.querySelector({json.dumps(selector)})"

    def exists(self, selector: str) -> bool:
        return self.js(f"{self.q(selector)} !== null")

    def click(self, selector: str):
        assert self.js(f"(() => {{ const e = {self.q(selector)}; if (!e || e.disabled) return false; "
                       f"e.scrollIntoView({{block: 'center'}}); e.click(); return true; }})()"), \
            f"no enabled element {selector}"

    def type(self, selector: str, text: str):
        """Replace the value of an input by typing ``text`` into it (real input events)."""
        assert self.js(f"(() => {{ const e = {self.q(selector)}; if (!e) return false; e.focus(); e.value = ''; "
                       f"return document.activeElement === e; }})()"), f"cannot focus {selector}"
        if text:
            self.cmd("Input.insertText", {"text": text})
        assert self.js(f"{self.q(selector)}.value") == text

    def text(self, selector: str) -> str:
        return self.js(f"{self.q(selector)}.textContent")

    def texts(self, selector: str) -> list[str]:
        return self.js(f"Array.from(document.querySelectorAll({json.dumps(selector)}), e => e.textContent)")

    def attrs(self, selector: str, attr: str) -> list[str]:
        return self.js(f"Array.from(document.querySelectorAll({json.dumps(selector)}), "
                       f"e => e.getAttribute({json.dumps(attr)}))")

    def visible(self, selector: str) -> bool:
        return self.js(f"(() => {{ const e = {self.q(selector)}; return !!e && e.getClientRects().length > 0 && "
                       f"getComputedStyle(e).visibility !== 'hidden'; }})()")

    def error_text(self) -> str | None:
        try:
            return self.js("(() => { const e = document.getElementById('error'); "
                           "return e && e.getClientRects().length ? e.textContent.trim() : null; })()")
        except CdpError:
            return None

    def idle(self):
        self.wait("!document.body.dataset.busy", what="the page's requests to finish")

    def page_errors(self) -> list[str]:
        """Uncaught JS exceptions and console.error calls of this tab so far."""
        out = []
        for e in self.b.events:
            if e.get("sessionId") != self.session:
                continue
            if e.get("method") == "Runtime.exceptionThrown":
                d = e["params"]["exceptionDetails"]
                out.append(d.get("exception", {}).get("description") or d.get("text"))
            elif e.get("method") == "Runtime.consoleAPICalled" and e["params"].get("type") == "error":
                out.append(" ".join(str(a.get("value", a.get("description"))) for a in e["params"]["args"]))
        return out

    def screenshot(self, path: Path) -> Path:
        """A PNG of the whole page (the viewport is stretched to the document height)."""
        h = int(self.js("Math.ceil(document.documentElement.scrollHeight)"))
        self.cmd("Emulation.setDeviceMetricsOverride", {"width": 1280, "height": max(h, 600), "deviceScaleFactor": 1,
                                                        "mobile": False})
        self.js("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
        path.write_bytes(base64.b64decode(self.cmd("Page.captureScreenshot", {"format": "png"})["data"]))
        return path


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def app(tiny_run, tmp_path_factory):
    """``(base_url, service)``: the app over a private copy of the tiny run (the tests add items) under uvicorn
    in a background thread on a free port of 127.0.0.1."""
    import uvicorn
    from ttds_ray.serving import ServeSettings, TTDSService, create_app

    run_dir = copy_run(tiny_run[1].root, tmp_path_factory.mktemp("demo_page") / "run")
    svc = TTDSService(ServeSettings(run_dir=str(run_dir)))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(svc), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="demo-page-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}/", svc
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    exe = chromium_binary()
    if exe is None:
        pytest.skip(NO_CHROMIUM)
    assert os.access(exe, os.X_OK), f"TTDS_CHROMIUM={exe} is not an executable"
    tmp = tmp_path_factory.mktemp("chromium")
    b = Browser(exe, tmp / "profile", tmp / "chromium.log")
    try:
        version = b.send("Browser.getVersion", timeout=60)
    except Exception:
        b.close()
        raise
    assert "Chrome" in version["product"], version
    yield b
    b.close()


@pytest.fixture
def page(browser, app):
    p = browser.new_page()
    p.goto(app[0])
    yield p
    errors = p.page_errors()
    browser.send("Target.closeTarget", {"targetId": p.target})
    assert not errors, f"JS errors on the page: {errors}"


def call(base: str, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    """The same HTTP API the page uses, called directly (the reference the page is checked against)."""
    req = urllib.request.Request(base + path, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width == 1280 and height >= 600 and len(data) > 20_000, (path, width, height, len(data))


def search_and_add(page: Page, query: str, item_id: str) -> None:
    page.type("#search-q", query)
    page.click("#search-btn")
    page.idle()
    sel = f'[data-testid=search-result][data-item-id="{item_id}"] [data-testid=search-add]'
    page.wait(f"{page.q(sel)} !== null", what=f"{item_id} in the search results of {query!r}")
    page.click(sel)


def rendered_rows(page: Page) -> list[dict]:
    return page.js("""Array.from(document.querySelectorAll('[data-testid=rec-row]'), r => ({
        rank: r.querySelector('[data-testid=rec-rank]').textContent,
        title: r.querySelector('[data-testid=rec-title]').textContent,
        item_id: r.querySelector('[data-testid=rec-item-id]').textContent,
        score_text: r.querySelector('[data-testid=rec-score]').textContent,
        score: Number(r.querySelector('[data-testid=rec-score]').dataset.score),
        semantic_id: r.querySelector('[data-testid=rec-sid]').textContent,
        row_id: r.dataset.itemId}))""")


def check_rows(page: Page, expected: dict) -> None:
    rows = rendered_rows(page)
    assert len(rows) == len(expected["items"])
    for i, (row, item) in enumerate(zip(rows, expected["items"])):
        assert row["rank"] == str(i + 1)
        assert (row["title"], row["item_id"], row["row_id"], row["semantic_id"]) == \
            (item["title"], item["item_id"], item["item_id"], item["semantic_id"])
        assert row["score"] == pytest.approx(item["score"], abs=1e-9)
        assert re.fullmatch(r"-?\d+\.\d{3}", row["score_text"]), f"row {i + 1} shows score {row['score_text']!r}"
        assert abs(float(row["score_text"]) - item["score"]) <= 0.0005 + 1e-9, (row, item)


def click_recommend(page: Page) -> None:
    before = int(page.js("Number(document.body.dataset.recommended || 0)"))
    page.click("#recommend-btn")
    page.idle()
    if page.error_text() is None:
        page.wait(f"Number(document.body.dataset.recommended || 0) > {before}", what="the recommendations")


# ----------------------------------------------------------------------------- tests

def test_search_history_and_recommend_match_the_api(page, app, tmp_path):
    base, svc = app
    _, meta = call(base, "GET", "metadata")
    assert page.text("#meta-dataset") == meta["dataset_name"]
    assert page.text("#meta-backbone").startswith(meta["backbone"])
    assert page.text("#meta-items").split()[0] == str(meta["n_items"])
    assert page.text("#meta-version") == meta["model_version"]

    # an empty history: the API's 422 detail shows in the error box
    assert page.error_text() is None
    click_recommend(page)
    assert "history is empty" in (page.error_text() or ""), page.error_text()
    assert "422" in page.text("#error-title")

    # search by a title word: the results are GET /search's; add four items, remove the second
    word = max(svc.rec.titles[0].split(), key=len)
    page.type("#search-q", word)
    page.click("#search-btn")
    page.idle()
    assert page.error_text() is None                       # a successful action clears the error box
    _, found = call(base, "GET", "search?" + urllib.parse.urlencode({"q": word, "limit": 20}))
    assert page.attrs("[data-testid=search-result]", "data-item-id") == [i["item_id"] for i in found["items"]]
    assert page.texts("[data-testid=search-result] .t") == [i["title"] for i in found["items"]]
    page.click(f'[data-testid=search-result][data-item-id="{svc.rec.item_ids[0]}"] [data-testid=search-add]')
    for item_id in svc.rec.item_ids[1:4]:                  # an exact item id also finds the item
        search_and_add(page, item_id, item_id)
    assert page.attrs("[data-testid=history-item]", "data-item-id") == svc.rec.item_ids[:4]
    page.click("[data-testid=history-item]:nth-child(2) [data-testid=history-remove]")
    history = [svc.rec.item_ids[i] for i in (0, 2, 3)]
    assert page.attrs("[data-testid=history-item]", "data-item-id") == history   # oldest first

    # k out of range: the API's message, not a page-side guess
    page.type("#k", "0")
    click_recommend(page)
    assert "greater than or equal to 1" in (page.error_text() or ""), page.error_text()

    for k, exclude_seen in ((7, True), (5, False)):
        page.type("#k", str(k))
        if page.js("document.getElementById('exclude-seen').checked") != exclude_seen:
            page.click("#exclude-seen")
        click_recommend(page)
        assert page.error_text() is None
        status, expected = call(base, "POST", "recommend", {"history": history, "k": k, "exclude_seen": exclude_seen})
        assert status == 200 and len(expected["items"]) == k
        check_rows(page, expected)
        assert page.text("#user-sid") == expected["user_semantic_id"] and page.visible("#user-sid")
        assert not page.visible("#truncated-note")
        if exclude_seen:
            assert not set(history) & set(page.attrs("[data-testid=rec-row]", "data-item-id"))

    # a result can be added to the history; a history over the model's limit shows the truncation note
    page.click("[data-testid=rec-row]:first-child [data-testid=rec-add]")
    assert page.attrs("[data-testid=history-item]", "data-item-id")[-1] == expected["items"][0]["item_id"]
    page.click("#clear-history")
    long = (svc.rec.item_ids * 3)[:svc.rec.cfg.data.max_history + 3]
    for item_id in long:
        search_and_add(page, item_id, item_id)
    click_recommend(page)
    _, expected = call(base, "POST", "recommend", {"history": long, "k": 5, "exclude_seen": False})
    assert expected["truncated_history"] is True
    check_rows(page, expected)
    assert page.visible("#truncated-note") and "most recent" in page.text("#truncated-note")

    shot = page.screenshot(tmp_path / "demo_page_recommend.png")
    check_png(shot)


def test_cold_start_item_through_the_form(page, app, tmp_path):
    base, svc = app
    n_items = int(page.text("#meta-items").split()[0])
    history = svc.rec.item_ids[5:8]
    for item_id in history:
        search_and_add(page, item_id, item_id)
    # HTML in the title must show as text, never be parsed
    title = '<img src=x onerror="window.__xss = 1"> Demo <b>cold-start</b> & "item"'
    page.type("#new-id", "demo-cold-1")
    page.type("#new-title", title)
    page.type("#new-text", "A hand-made item added through the demo page: " + svc.rec.titles[5])
    page.click("#new-submit")
    page.idle()
    assert page.error_text() is None
    page.wait("!document.getElementById('new-result').hidden", what="the new item's semantic ID")
    status, item = call(base, "GET", "items/demo-cold-1")
    assert status == 200 and item["cold_start"] is True
    assert page.text("#new-sid") == item["semantic_id"] and page.visible("[data-testid=new-item-sid]")
    assert page.text("#new-result-title") == item["title"] == " ".join(title.split())
    assert page.text("#new-modalities") == "from text + collaborative"   # co-items = the history
    assert page.js("document.querySelectorAll('img').length") == 0 and page.js("window.__xss") is None
    page.wait(f"document.getElementById('meta-items').textContent.startsWith('{n_items + 1} ')",
              what="the item count to grow")

    # the same id again: the API's 409 shows in the error box
    page.type("#new-id", "demo-cold-1")
    page.type("#new-text", "again")
    page.click("#new-submit")
    page.idle()
    assert "already exists" in (page.error_text() or "") and "409" in page.text("#error-title")

    # the new item goes into the history and is recommendable at once: the page ranks exactly what the API
    # ranks for a history that includes it (all items at k = n_items on the tiny catalogue)
    page.click("#new-add-history")
    history = history + ["demo-cold-1"]
    assert page.attrs("[data-testid=history-item]", "data-item-id") == history
    assert page.text("[data-testid=history-item]:last-child .t") == item["title"]
    assert page.exists("[data-testid=history-item]:last-child [data-testid=cold-badge]")
    k = min(100, n_items + 1)
    page.type("#k", str(k))
    page.click("#exclude-seen")                              # off: the new item may be recommended again
    click_recommend(page)
    assert page.error_text() is None
    _, expected = call(base, "POST", "recommend", {"history": history, "k": k, "exclude_seen": False})
    check_rows(page, expected)
    ids = [i["item_id"] for i in expected["items"]]
    if n_items + 1 <= 100:
        assert "demo-cold-1" in ids
    if "demo-cold-1" in ids:
        row = f'[data-testid=rec-row][data-item-id="demo-cold-1"]'
        assert page.exists(f"{row} [data-testid=cold-badge]")

    page.type("#k", "10")                                    # a screenshot of a readable length
    click_recommend(page)
    check_rows(page, call(base, "POST", "recommend", {"history": history, "k": 10, "exclude_seen": False})[1])
    shot = page.screenshot(tmp_path / "demo_page_cold_start.png")
    check_png(shot)
