"""The web chat page in a real headless Chromium, driven over the Chrome DevTools Protocol.

Stack: the fallback model server (fast to start; the page and relay are the same for vLLM) on a
tiny random model with an API key -> `tunedag web` -> Chromium. The test types into the
page, waits for the streamed answer and checks it equals what the API itself answers (greedy).
Needs Debian's chromium (scripts/install-system.sh). Set TUNEDAG_SCREENSHOTS=<dir> to keep the
screenshots.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
import pytest

from tests.test_serve import KEY, NAME, spec_for, tiny_model  # noqa: F401  (tiny_model is a fixture)
from tunedag.serving.server import Server, free_port

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed: run scripts/install-system.sh")


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Page:
    """The few DevTools Protocol calls the test needs, over the page target's websocket."""

    def __init__(self, ws_url: str):
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=None)
        self.next_id = 0

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:  # events arrive interleaved with replies; skip them
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                return message["result"]

    def eval(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def type_and_enter(self, selector: str, text: str) -> None:
        """Real input events: focus, insert the text, press Enter (the page sends on Enter)."""
        self.eval(f"document.querySelector({json.dumps(selector)}).focus()")
        self.call("Input.insertText", text=text)
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13)

    def screenshot(self, path: Path) -> bytes:
        png = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        path.write_bytes(png)
        return png


@pytest.fixture(scope="module")
def backend(tiny_model, tmp_path_factory):  # noqa: F811
    with Server(spec_for(tiny_model, "hf"), log=tmp_path_factory.mktemp("logs") / "hf.log") as server:
        yield server


@pytest.fixture(scope="module")
def web(backend):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunedag", "web", "--port", str(port), "--url", f"{backend.spec.url}/v1",
         "--model", NAME, "--api-key", KEY], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/"

    def up():
        try:
            return urllib.request.urlopen(url, timeout=2).status == 200
        except OSError:
            assert proc.poll() is None, proc.stderr.read().decode()
            return False

    wait_for(up, 60, "the web chat server")
    yield url
    proc.terminate()
    proc.wait(30)


@pytest.fixture(scope="module")
def page(web, tmp_path_factory):
    profile = tmp_path_factory.mktemp("chromium-profile")  # new and empty: no state between runs
    browser = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
         "--window-size=1100,700", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        # Chromium writes the port it picked into the profile.
        port_file = profile / "DevToolsActivePort"
        port = wait_for(lambda: port_file.exists() and port_file.read_text().split("\n")[0], 60, "Chromium")
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list"))
        page = Page(next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page"))
        page.call("Page.enable")
        page.call("Page.navigate", url=web)
        wait_for(lambda: page.eval("document.readyState === 'complete' && document.getElementById('model').options.length"),
                 30, "the page and its model list")
        yield page
        page.ws.close()
    finally:
        os.killpg(browser.pid, 9)
        browser.wait(30)


def last_answer(page: Page) -> dict:
    wait_for(lambda: page.eval("(document.querySelector('#messages .msg:last-child') || {dataset: {}}).dataset.done"),
             120, "the streamed answer")
    return page.eval("""(() => { const m = document.querySelector('#messages .msg:last-child');
        return {text: m.textContent, cls: m.className, chunks: Number(m.dataset.chunks)}; })()""")


def save(page: Page, tmp_path: Path, name: str) -> None:
    png = page.screenshot(tmp_path / name)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    if os.environ.get("TUNEDAG_SCREENSHOTS"):
        Path(os.environ["TUNEDAG_SCREENSHOTS"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / name, Path(os.environ["TUNEDAG_SCREENSHOTS"]) / name)


def test_page_streams_answers_with_sidebar_settings_and_history(page, backend, tmp_path):
    api = openai.OpenAI(base_url=f"{backend.spec.url}/v1", api_key=KEY, max_retries=0)
    assert page.eval("document.getElementById('model').value") == NAME
    # Sidebar: greedy (temperature 0 is the default) and at most 6 tokens per answer.
    page.eval("document.getElementById('max-tokens').value = '6'")

    page.type_and_enter("#input", "Who are you?")
    first = last_answer(page)
    history = [{"role": "user", "content": "Who are you?"}]
    expected = api.chat.completions.create(model=NAME, messages=history, temperature=0, max_tokens=6)
    assert first["cls"] == "msg bot"
    assert first["text"] == expected.choices[0].message.content
    assert first["chunks"] >= 2, "the page did not receive the answer as a stream"

    # The second turn is answered with the first in its history.
    page.type_and_enter("#input", "Tell me more.")
    second = last_answer(page)
    history += [{"role": "assistant", "content": first["text"].strip()}, {"role": "user", "content": "Tell me more."}]
    expected = api.chat.completions.create(model=NAME, messages=history, temperature=0, max_tokens=6)
    assert second["text"] == expected.choices[0].message.content
    history.append({"role": "assistant", "content": second["text"].strip()})
    assert page.eval("conversation") == history  # what the page sends with the next turn
    assert page.eval("document.querySelectorAll('#messages .user').length") == 2
    save(page, tmp_path, "chat_ui.png")


def test_page_shows_server_errors(page, tmp_path):
    page.eval("const s = document.getElementById('model'); s.add(new Option('no-such-model', 'no-such-model')); "
              "s.value = 'no-such-model'")
    page.type_and_enter("#input", "Hello?")
    answer = last_answer(page)
    assert answer["cls"] == "msg error"
    assert "does not exist" in answer["text"]
    save(page, tmp_path, "chat_ui_error.png")
    # Back to the served model: the page (and server) still work.
    page.eval(f"document.getElementById('model').value = {json.dumps(NAME)}")
    page.type_and_enter("#input", "Hello again")
    assert last_answer(page)["cls"] == "msg bot"
