"""The `herald` CLI, in process, against the same data directory as a running server."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from herald.cli import main
from tests.conftest import RegisteredApp, Server, free_port
from tests.redis import redis_server


def test_app_create_list_and_token_work_while_server_runs(server: Server) -> None:
    runner = CliRunner()
    data = server.cli_args
    created = runner.invoke(main, ["app", "create", "--host-name", "cli.example.com", *data])
    assert created.exit_code == 0, created.output
    info = json.loads(created.stdout)
    assert info["hostName"] == "cli.example.com" and len(info["clientSecret"]) >= 32
    listed = runner.invoke(main, ["app", "list", *data])
    assert info["clientId"] in listed.stdout and info["clientSecret"] not in listed.stdout
    token = runner.invoke(main, ["token", "--app", info["clientId"], "--user", "zoe", *data])
    assert token.exit_code == 0
    with server.client(token.stdout.strip()) as c:
        assert c.get("/beta/me/notifications").status_code == 200
    dup = runner.invoke(main, ["app", "create", "--host-name", "cli.example.com", *data])
    assert dup.exit_code != 0 and "cli.example.com" not in dup.stdout


def test_token_for_unknown_app_fails(server: Server) -> None:
    r = CliRunner().invoke(main, ["token", "--app", "nope", "--user", "u", *server.cli_args])
    assert r.exit_code != 0 and "no app" in r.output


def test_bad_host_name_is_refused(tmp_path: Path) -> None:
    r = CliRunner().invoke(
        main, ["app", "create", "--host-name", "not a host", "--data", str(tmp_path)]
    )
    assert r.exit_code == 2


def test_send_posts_a_notification(server: Server, app: RegisteredApp) -> None:
    args = [
        "send",
        "--app",
        app.client_id,
        "--user",
        "sam",
        "--title",
        "Hi",
        "--body",
        "there",
        "--group",
        "g",
        "--platform",
        "ios",
        *server.cli_args,
        "--url",
        server.base_url,
    ]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    n = json.loads(r.stdout)
    assert n["payload"]["visualContent"] == {"title": "Hi", "body": "there"}
    assert n["targetPolicy"]["platformTypes"] == ["iOS"] and n["groupName"] == "g"
    with server.client(server.token(app, "sam")) as c:
        assert c.get("/beta/me/notifications/$count").text == "1"


def test_config_check(tmp_path: Path) -> None:
    file = tmp_path / "h.toml"
    file.write_text("prot = 1\n")
    runner = CliRunner()
    ok = runner.invoke(main, ["config", "check", "--config", str(file), "--data", str(tmp_path)])
    assert ok.exit_code == 0 and "answers" in ok.stdout, ok.output
    strict = runner.invoke(
        main, ["config", "check", "--strict", "--config", str(file), "--data", str(tmp_path)]
    )
    assert strict.exit_code == 1 and "prot" in strict.output
    bad_store = runner.invoke(
        main, ["config", "check", "--store", "postgresql://u:secret@127.0.0.1:1/none"]
    )
    assert bad_store.exit_code == 1 and "secret" not in bad_store.output
    defaults = runner.invoke(main, ["config", "defaults"])
    assert "max_payload_bytes = 4096" in defaults.stdout


def test_config_check_pings_redis_with_the_redis_broker(tmp_path: Path) -> None:
    """With broker = 'redis', `config check` answers for Redis too: a dead Redis fails it (the
    password never printed), a running one passes."""
    runner = CliRunner()
    args = ["config", "check", "--data", str(tmp_path)]
    dead = free_port()  # nothing listens there
    env = {"HERALD_BROKER": "redis", "HERALD_REDIS_URL": f"redis://:hush@127.0.0.1:{dead}/0"}
    down = runner.invoke(main, args, env=env)
    assert down.exit_code == 1 and "redis 127.0.0.1" in down.output, down.output
    assert "hush" not in down.output
    for redis in redis_server():
        env["HERALD_REDIS_URL"] = redis.url
        up = runner.invoke(main, args, env=env)
        assert up.exit_code == 0 and f"127.0.0.1:{redis.port}/0 answers" in up.stdout, up.output
