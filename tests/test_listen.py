"""`herald listen` as a subprocess (it streams) against a real server: it registers a `live`
subscription, prints what an app server posts, resumes after a restart and replaces a deleted
subscription."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Generator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, cast

import pytest
from click.testing import CliRunner

from herald.cli import main
from herald.cli.listen import parse_time
from herald.settings import Settings
from tests.conftest import RegisteredApp, Server, make_settings, serve_in_thread

WAIT = 20.0  # seconds: any single step longer than this is a hang


class Listen:
    """A running `herald listen`; its stdout and stderr lines are collected by two threads."""

    def __init__(
        self, server: Server, app: RegisteredApp, user: str, *extra: str, **env: str
    ) -> None:
        args = ["--app", app.client_id, "--user", user, "--url", server.base_url, *extra]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "herald", "listen", *args, *server.cli_args],
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.out: queue.Queue[str | None] = queue.Queue()
        self.err: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        assert self.proc.stdout and self.proc.stderr
        self.threads = [_pump(self.proc.stdout, self.out), _pump(self.proc.stderr, self.err)]

    def wait_for(self, text: str) -> str:
        """Block until stderr has a line containing `text`."""
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            try:
                line = self.err.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            self.stderr.append(line)
            if text in line:
                return line
        raise AssertionError(f"no {text!r} on stderr; got {self.stderr} (exit {self.proc.poll()})")

    def ready(self) -> None:
        self.wait_for("listening on subscription")

    def line(self) -> str:
        line = self.out.get(timeout=WAIT)
        assert line is not None, f"stdout closed; stderr: {self.drain_stderr()}"
        return line

    def finish(self) -> tuple[int, list[str]]:
        """Wait for the exit; the exit status and every stdout line not read yet."""
        try:
            code = self.proc.wait(timeout=WAIT)
        finally:
            self.close()
        lines = []
        while (line := self.out.get(timeout=WAIT)) is not None:
            lines.append(line)
        return code, lines

    def drain_stderr(self) -> list[str]:
        while not self.err.empty():
            line = self.err.get()
            if line is not None:
                self.stderr.append(line)
        return self.stderr

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(WAIT)
        for thread in self.threads:
            thread.join(WAIT)
        assert self.proc.stdout and self.proc.stderr
        self.proc.stdout.close()
        self.proc.stderr.close()


def _pump(stream: IO[str], into: queue.Queue[str | None]) -> threading.Thread:
    def pump() -> None:
        for line in stream:
            into.put(line.rstrip("\n"))
        into.put(None)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def listeners() -> Iterator[list[Listen]]:
    """Started listeners, killed at the end whatever happened."""
    started: list[Listen] = []
    yield started
    for listener in started:
        listener.close()


def start(
    listeners: list[Listen],
    server: Server,
    app: RegisteredApp,
    user: str,
    *extra: str,
    **env: str,
) -> Listen:
    listener = Listen(server, app, user, *extra, **env)
    listeners.append(listener)
    return listener


def post(server: Server, app: RegisteredApp, user: str, title: str) -> dict[str, Any]:
    """What an app server does: post to the user with an app-only token."""
    body = {
        "targetHostName": app.host_name,
        "payload": {"visualContent": {"title": title, "body": f"{title} body"}},
        "groupName": "g",
    }
    with server.client(server.token(app, None)) as c:
        r = c.post(f"/beta/users/{user}/notifications", json=body)
    assert r.status_code == 201, r.text
    result: dict[str, Any] = r.json()
    return result


def state_file(server: Server, app: RegisteredApp, user: str) -> Path:
    return server.data / "listen" / f"{app.client_id}-{user}.json"


def changes(lines: list[str]) -> list[tuple[str, str, str]]:
    """(type, id, title) of the change messages among printed JSON lines."""
    out = []
    for line in lines:
        msg = json.loads(line)
        if msg["type"] not in {"created", "updated", "deleted", "expired"}:
            continue
        title = msg.get("notification", {}).get("payload", {}).get("visualContent", {}).get("title")
        out.append((msg["type"], msg["id"], title))
    return out


def test_prints_posts_as_json_and_resumes_after_a_restart(
    server: Server, app: RegisteredApp, user: str, listeners: list[Listen]
) -> None:
    first = start(listeners, server, app, user, "--json", "--count", "2")
    first.ready()
    a, b = post(server, app, user, "A"), post(server, app, user, "B")
    code, lines = first.finish()
    assert code == 0, first.drain_stderr()
    assert changes(lines) == [("created", a["id"], "A"), ("created", b["id"], "B")]
    positions = [json.loads(line)["position"] for line in lines]
    assert positions == sorted(positions) and len(set(positions)) == 2
    saved = json.loads(state_file(server, app, user).read_text())
    assert saved["position"] == positions[-1]

    c = post(server, app, user, "C")  # while nobody listens
    second = start(listeners, server, app, user, "--json", "--count", "2")
    second.ready()
    assert any(f"after position {positions[-1]}" in line for line in second.stderr)
    d = post(server, app, user, "D")
    code, lines = second.finish()
    assert code == 0, second.drain_stderr()
    # C (posted while stopped) comes first; A and B are not printed again.
    assert changes(lines) == [("created", c["id"], "C"), ("created", d["id"], "D")]
    assert (
        json.loads(state_file(server, app, user).read_text())["subscription"]
        == (saved["subscription"])
    )


def test_renews_its_token_when_the_stream_closes_for_expiry(
    server: Server, app: RegisteredApp, user: str, listeners: list[Listen]
) -> None:
    # Two-second tokens: the server closes the stream with tokenExpired at their `exp`.
    listener = start(listeners, server, app, user, "--json", "--count", "2", HERALD_TOKEN_TTL="2")
    listener.ready()
    a = post(server, app, user, "A")
    assert changes([listener.line()]) == [("created", a["id"], "A")]
    listener.wait_for("tokenExpired")
    listener.ready()
    b = post(server, app, user, "B")
    code, lines = listener.finish()
    assert code == 0, listener.drain_stderr()
    # --json prints the server's `closing` messages too (one per expired token).
    closings = [json.loads(line) for line in lines if '"closing"' in line]
    assert closings and {c["reason"] for c in closings} == {"tokenExpired"}
    assert changes(lines) == [("created", b["id"], "B")]


def test_renews_a_subscription_near_its_expiry(
    server: Server, app: RegisteredApp, user: str, listeners: list[Listen]
) -> None:
    first = start(listeners, server, app, user, "--json", "--once")
    first.ready()
    post(server, app, user, "A")
    assert first.finish()[0] == 0
    sub = json.loads(state_file(server, app, user).read_text())["subscription"]
    soon = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    with server.client(server.token(app, user)) as c:
        path = f"/beta/me/notificationSubscriptions/{sub}"
        assert c.patch(path, json={"expirationDateTime": soon}).status_code == 200

        second = start(listeners, server, app, user, "--json", "--once")
        second.ready()
        renewed = parse_time(c.get(path).json()["expirationDateTime"])
    assert renewed is not None and renewed - datetime.now(UTC) > timedelta(days=29)


def test_a_deleted_subscription_is_replaced(
    server: Server, app: RegisteredApp, user: str, listeners: list[Listen]
) -> None:
    first = start(listeners, server, app, user, "--json", "--once")
    first.ready()
    post(server, app, user, "A")
    assert first.finish()[0] == 0
    old = json.loads(state_file(server, app, user).read_text())["subscription"]
    with server.client(server.token(app, user)) as c:
        subs = c.get("/beta/me/notificationSubscriptions").json()["value"]
        assert [(s["id"], s["platform"], s["application"]) for s in subs] == [
            (old, "live", app.host_name)
        ]
        assert subs[0]["displayName"].startswith("herald listen on ")
        assert c.delete(f"/beta/me/notificationSubscriptions/{old}").status_code == 204
    post(server, app, user, "missed")  # before the new subscription exists

    second = start(listeners, server, app, user, "--json", "--once")
    second.wait_for(f"subscription {old} is gone")
    second.ready()
    e = post(server, app, user, "E")
    code, lines = second.finish()
    assert code == 0, second.drain_stderr()
    assert changes(lines) == [("created", e["id"], "E")]
    assert json.loads(state_file(server, app, user).read_text())["subscription"] != old


def test_human_output_shows_state_changes_and_deletes(
    server: Server, app: RegisteredApp, user: str, listeners: list[Listen]
) -> None:
    listener = start(listeners, server, app, user, "--count", "3")
    listener.ready()
    n = post(server, app, user, "Hello")
    with server.client(server.token(app, None)) as c:
        path = f"/beta/users/{user}/notifications/{n['id']}"
        assert c.patch(path, json={"readState": "read"}).status_code == 200
        assert c.delete(path).status_code == 204
    code, lines = listener.finish()
    assert code == 0, listener.drain_stderr()
    assert len(lines) == 3, lines
    created, updated, deleted = lines
    assert "created" in created and "Hello — Hello body" in created and "group=g" in created
    assert "unread/none" in created
    assert "updated" in updated and "read/none" in updated
    assert "deleted" in deleted and n["id"] in deleted


def test_sigterm_exits_cleanly(
    server: Server, app: RegisteredApp, user: str, listeners: list[Listen]
) -> None:
    listener = start(listeners, server, app, user, "--json", "--verbose")
    listener.ready()
    listener.proc.send_signal(signal.SIGTERM)
    code, lines = listener.finish()
    assert code == 0, listener.drain_stderr()
    assert [json.loads(line)["type"] for line in lines] == ["ready"]  # --verbose shows it


def test_a_saved_position_ahead_of_the_feed_is_refused(
    server: Server, app: RegisteredApp, user: str, listeners: list[Listen]
) -> None:
    first = start(listeners, server, app, user, "--json", "--once")
    first.ready()
    post(server, app, user, "A")
    assert first.finish()[0] == 0
    path = state_file(server, app, user)
    path.write_text(json.dumps({**json.loads(path.read_text()), "position": 10**12}))
    second = start(listeners, server, app, user, "--json")
    code, lines = second.finish()
    assert code == 1 and lines == []
    assert any("refused the stream: 400" in line for line in second.drain_stderr())


def test_refused_tokens_fail_with_a_clear_message(
    server: Server, app: RegisteredApp, user: str, listeners: list[Listen]
) -> None:
    expired = start(listeners, server, app, user, "--token", server.expired_token(app, user))
    code, _ = expired.finish()
    assert code == 1
    assert any("401" in line for line in expired.drain_stderr()), expired.stderr

    other = server.register()  # a token of another app cannot register for this app
    foreign = start(listeners, server, app, user, "--token", server.token(other, user))
    code, _ = foreign.finish()
    assert code == 1
    assert any("403" in line for line in foreign.drain_stderr()), foreign.stderr


def test_unknown_app_fails(server: Server) -> None:
    r = CliRunner().invoke(main, ["listen", "--app", "nope", "--user", "u", *server.cli_args])
    assert r.exit_code == 1 and "no app" in r.output


def restartable(settings: Settings) -> Generator[str, None, None]:
    """A server in a thread that `.close()` stops; the next one can take the same port."""
    return cast(Generator[str, None, None], serve_in_thread(settings))


def test_reconnects_after_the_server_restarts(
    tmp_path: Path, user: str, listeners: list[Listen]
) -> None:
    # Short keep-alives: the server notices closed streams at its next send, so stopping it
    # waits for them no longer than this.
    settings = make_settings(tmp_path, keepalive_interval=1.0)
    running = restartable(settings)
    server = Server(settings, next(running))
    app = server.register()
    listener = start(listeners, server, app, user, "--json", "--count", "2")
    listener.ready()
    a = post(server, app, user, "A")
    assert changes([listener.line()]) == [("created", a["id"], "A")]

    running.close()  # stops the server: the stream drops
    server.close_clients()
    listener.wait_for("reconnecting")
    restarted = restartable(settings)
    next(restarted)
    try:
        listener.ready()
        b = post(server, app, user, "B")
        code, lines = listener.finish()
    finally:
        restarted.close()
        server.close_clients()
    assert code == 0, listener.drain_stderr()
    assert changes(lines) == [("created", b["id"], "B")]
