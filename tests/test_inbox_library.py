"""`herald.js` as app developers use it (docs/inbox.md, "From another origin"): a web app served
from another origin imports the library from Herald, brings its own token source, and gets the
feed live, changes state and follows another device — through Herald's CORS answers and a
cross-origin WebSocket, in headless Chromium."""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.browser import WAIT_MS, Api, Browser, Herald, expect

# The app's page: its own markup, the library from Herald, a token from "its IdP" (here: handed
# over in the fragment, as the app's sign-in would have stored it).
APP_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Contoso</title><link rel="icon" href="data:,">
<script type="module" src="app.js"></script></head>
<body><main><h1>Contoso</h1><p id="state">starting</p><ul id="items"></ul></main></body></html>
"""
APP_JS = """
const herald = new URL(location.hash.slice(1).split("&")[0].slice("herald=".length));
const token = new URLSearchParams(location.hash.slice(1)).get("token");
const { HeraldClient } = await import(new URL("/inbox/herald.js", herald).href);

// Any object with clientId, user, ready, token(), renew() and an `expired` event will do.
const session = Object.assign(new EventTarget(), {
  clientId: new URLSearchParams(location.hash.slice(1)).get("app"),
  user: JSON.parse(atob(token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/"))).oid,
  ready: Promise.resolve(),
  token: async () => token,
  renew: async () => token,
});
const client = new HeraldClient({ baseUrl: new URL("/beta", herald).href, session });
window.client = client;
const render = () => {
  const ul = document.getElementById("items");
  ul.replaceChildren(...client.notifications().map((n) => {
    const li = document.createElement("li");
    li.dataset.id = n.id;
    li.dataset.readState = n.readState;
    li.dataset.actionState = n.userActionState;
    li.textContent = n.payload.visualContent.title;
    return li;
  }));
};
client.addEventListener("change", render);
client.addEventListener("status", (e) => {
  document.getElementById("state").textContent = e.detail.state;
});
await client.start();
render();
"""


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def app_origin(tmp_path: Path) -> Iterator[str]:
    """The web app's own server: another origin (another port) than Herald's."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text(APP_HTML)
    (site / "app.js").write_text(APP_JS)
    handler = functools.partial(_Quiet, directory=str(site))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_web_app_on_another_origin_uses_herald_js(
    browser: Browser, tmp_path: Path, app_origin: str, user: str
) -> None:
    herald = Herald(tmp_path / "herald")
    herald.data.mkdir()
    herald.start()
    try:
        app = herald.register()
        api = Api(herald, app, user)
        token = herald.token(app, user)
        device = browser.device("contoso")
        page = device.tab()
        page.goto(f"{app_origin}/#herald={herald.origin}&app={app.client_id}&token={token}")
        expect(page.locator("#state")).to_have_text("live", timeout=WAIT_MS)

        first = api.notify("From the app server", "posted over HTTP")["id"]
        item = page.locator(f'#items li[data-id="{first}"]')
        expect(item).to_have_text("From the app server", timeout=WAIT_MS)

        # A state change from the app's page (a preflighted cross-origin PATCH) reaches Herald.
        page.evaluate("id => window.client.markRead(id)", first)
        api.wait_state(first, readState="read")
        expect(item).to_have_attribute("data-read-state", "read", timeout=WAIT_MS)

        # Another device's change arrives over the cross-origin stream.
        second = api.notify("Second", "for dismissal")["id"]
        expect(page.locator(f'#items li[data-id="{second}"]')).to_have_count(1, timeout=WAIT_MS)
        path = f"/beta/users/{user}/notifications/{second}"
        answer = api.app_server.patch(path, json={"userActionState": "dismissed"})
        assert answer.status_code == 200, answer.text
        dismissed = page.locator(f'#items li[data-id="{second}"]')
        expect(dismissed).to_have_attribute("data-action-state", "dismissed", timeout=WAIT_MS)
        page.screenshot(path=browser.shot_path("contoso-live"), full_page=True)
        api.close()
        browser.check()
    finally:
        herald.stop()
