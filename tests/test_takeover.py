"""`kill -9` of the node that dispatches, in the middle of a burst of posts (issue 14, item 3).

Two `herald serve` on one PostgreSQL and a real redis-server share dispatch by shard leases. The
users posted to are in shards node A holds; the posts go to node B, so every one of them is
acked (201) while A, then nobody, then B dispatches them. A is killed mid-burst (or frozen with
SIGSTOP, then let go once B has taken over: whatever A was dispatching when it froze goes on
after B has taken its shards, the overlap a lease does not fence); B takes A's shards once A's
leases have run out. Then:

* every 201 is in the store (delta);
* every device, on B from the start or on A and resumed on B from its last position, ends equal
  to delta, positions strictly increasing, no duplicates;
* one push is queued per (subscription, change), counted as the store queues them (a trigger
  on `deliveries`, in the test's own schema);
* pushes A had claimed and not settled (in flight: the Web Push stand-in delays its answers)
  are sent by B after their lease (`push_lease`);
* the takeover time, from the kill to B holding every shard, is printed and bounded.

And the lease timings are settings (a short `dispatch_lease_ttl` makes a takeover that much
faster), and each node reports its share of the shards on /metrics.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from herald.auth.issuer import LocalIssuer
from herald.outbound.leases import RENEW_SECONDS, TTL_SECONDS
from herald.store import SHARDS
from tests.conftest import free_port
from tests.devices import api, open_stream, subscription_body
from tests.pg import application_url
from tests.processes import register, start
from tests.redis import RedisServer
from tests.standins.tls import make_tls
from tests.standins.webpush import WebPushStandIn
from tests.test_nodes import delta, stop

pytestmark = pytest.mark.postgres

HOST = "takeover.example.com"
USERS_ON_A = 4  # users in A's shards: dispatched by A until the kill
USERS_ON_B = 2  # users in B's shards: dispatched by B all along
CLIENTS = 6
PAUSE = 0.05  # per client between posts: about 100 posts/s in all
KILL_AFTER = 1.5  # s into the burst
BURST_AFTER_KILL = TTL_SECONDS + 2.5  # the burst goes on past the takeover
PUSH_LEASE = 3.0
WAIT = 30.0

# Observation only, in the test's schema: every delivery queued, and every claim of one, with the
# node that made it (its connections' application_name) and when.
AUDIT_SQL = """
CREATE TABLE queued_audit (subscription_id text NOT NULL, position bigint NOT NULL);
CREATE FUNCTION queued_audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO queued_audit VALUES (NEW.subscription_id, NEW.position); RETURN NEW; END $$;
CREATE TRIGGER queued_audit AFTER INSERT ON deliveries FOR EACH ROW EXECUTE FUNCTION queued_audit();
CREATE TABLE claim_audit (id bigint, attempts int, node text, at timestamptz, due timestamptz);
CREATE FUNCTION claim_audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO claim_audit VALUES
    (NEW.id, NEW.attempts, current_setting('application_name'), clock_timestamp(), NEW.due);
RETURN NEW; END $$;
CREATE TRIGGER claim_audit AFTER UPDATE ON deliveries FOR EACH ROW
    WHEN (NEW.attempts > OLD.attempts) EXECUTE FUNCTION claim_audit();
"""
# Deliveries whose latest claim is node A's: in flight on A (a settle deletes or re-dues them).
IN_FLIGHT_SQL = """
SELECT d.id, c.attempts, c.due FROM deliveries d CROSS JOIN LATERAL (SELECT * FROM claim_audit c
WHERE c.id = d.id ORDER BY c.attempts DESC LIMIT 1) c WHERE c.node = 'herald-a'
AND c.attempts = d.attempts
"""

# The nodes' sessions, for a failure message: what each one was doing, and since when.
SESSIONS_SQL = """
SELECT application_name, pid, state, wait_event_type, wait_event, now() - xact_start AS xact,
now() - state_change AS since, pg_blocking_pids(pid) AS blocked_by, left(query, 80) AS query
FROM pg_stat_activity
WHERE application_name LIKE 'herald-%' ORDER BY application_name, xact_start
"""


async def owners(db: asyncpg.Connection) -> dict[int, str]:
    """Shard -> the pid of the node holding a live lease on it."""
    rows = await db.fetch(
        "SELECT shard, owner FROM dispatch_shards WHERE owner IS NOT NULL AND expires > now()"
    )
    return {r[0]: r[1].split(":")[1] for r in rows}


async def until_owned(db: asyncpg.Connection, want: dict[str, int], wait: float = 20.0) -> float:
    """Wait until each pid holds this many shards; the time it took."""
    began = time.monotonic()
    while True:
        counts = Counter((await owners(db)).values())
        if all(counts[pid] == n for pid, n in want.items()):
            return time.monotonic() - began
        assert time.monotonic() - began < wait, f"shards held: {dict(counts)}, wanted {want}"
        await asyncio.sleep(0.05)


async def node_sessions(url: str) -> list[asyncpg.Record]:
    """The nodes' sessions (on a connection of its own: the test's may be busy)."""
    db = await asyncpg.connect(url)
    try:
        return await db.fetch(SESSIONS_SQL)
    finally:
        await db.close()


async def until_quiet(db: asyncpg.Connection, node: str) -> None:
    """Until none of a stopped node's statements can still make progress. What it sent just
    before it stopped is carried out after: a settle's COMMIT, say, deleting pushes that a
    snapshot taken at once would count as in flight (CI saw B never claim again pushes A had
    sent, and A's log said its settle was cut off by the freeze). A statement that waits for
    the stopped node itself (to read what it sent, or for a lock one of its own transactions
    holds) will not move until the node does, so it counts as quiet; so does a transaction
    that failed and waits for its ROLLBACK. (A CI run hung here for good: one of those, it is
    not known which.)"""
    quiet = 0
    deadline = time.monotonic() + WAIT
    while quiet < 3:
        active = await db.fetchval(_MOVING_SQL, node)
        quiet = quiet + 1 if active == 0 else 0
        if time.monotonic() > deadline:
            raise AssertionError(f"{node} still running: {await db.fetch(SESSIONS_SQL)}")
        await asyncio.sleep(0.05)


# A node's statements that may still make progress on their own.
_MOVING_SQL = """
SELECT count(*) FROM pg_stat_activity a
WHERE a.application_name = $1 AND a.state NOT LIKE 'idle%'
AND a.wait_event_type IS DISTINCT FROM 'Client'
AND NOT (cardinality(pg_blocking_pids(a.pid)) > 0 AND pg_blocking_pids(a.pid) <@ ARRAY(
    SELECT o.pid FROM pg_stat_activity o WHERE o.application_name = $1))
"""


async def users_in(db: asyncpg.Connection, shards: set[int], count: int) -> list[str]:
    """`count` new user ids whose shard (computed as the store computes it) is in `shards`."""
    found: list[str] = []
    while len(found) < count:
        candidates = [f"kill-{uuid.uuid4().hex[:12]}" for _ in range(32)]
        rows = await db.fetch(
            "SELECT u, (hashtextextended(u, 0) & 63)::int FROM unnest($1::text[]) AS u",
            candidates,
        )
        found += [r[0] for r in rows if r[1] in shards]
    return found[:count]


class Device:
    """A live stream that resumes on `fallback` from its last position when its node dies."""

    def __init__(self, base: str, fallback: str, sub: str, token: str) -> None:
        self.base, self.fallback, self.sub, self.token = base, fallback, sub, token
        self.messages: list[dict[str, Any]] = []
        self.position = 0
        self.resumed = 0
        self.ready = asyncio.Event()

    async def follow(self) -> None:
        while True:
            try:
                async with open_stream(
                    "ws", self.base, self.sub, self.token, after=self.position
                ) as stream:
                    await stream.ready()
                    self.ready.set()
                    while True:
                        message = await stream.next(wait=WAIT)
                        self.messages.append(message)
                        self.position = message["position"]
            except (AssertionError, OSError) as exc:  # the stream ended: its node is gone
                if self.base == self.fallback:
                    raise AssertionError(
                        f"a device on the survivor lost its stream: {exc}"
                    ) from exc
                self.base = self.fallback
                self.resumed += 1


@pytest.mark.parametrize("fault", ["kill", "freeze"])
def test_kill_9_of_the_dispatching_node_mid_burst_loses_and_repeats_nothing(
    tmp_path: Path, postgres_store: str, redis_service: RedisServer, fault: str
) -> None:
    client_id = register(tmp_path, postgres_store, HOST)
    issuer = LocalIssuer.load_or_create(tmp_path, "urn:herald:local", "api://herald")
    tls = make_tls(tmp_path / "tls")
    env = {
        "HERALD_BROKER": "redis",
        "HERALD_REDIS_URL": redis_service.url,
        "HERALD_PUSH_CA_FILE": str(tls.ca_file),
        "HERALD_PUSH_ALLOW_PRIVATE_ENDPOINTS": "true",
        "HERALD_PUSH_VAPID_SUBJECT": "mailto:takeover-tests@example.com",
        "HERALD_PUSH_TIMEOUT": "2",
        "HERALD_PUSH_LEASE": str(PUSH_LEASE),
        "HERALD_PUSH_BACKOFF_BASE": "0.2",
        "HERALD_PUSH_BACKOFF_MAX": "1",
    }
    ports = free_port(), free_port()
    node_a, node_b = (f"http://127.0.0.1:{port}" for port in ports)
    procs: list[subprocess.Popen[bytes]] = []
    with WebPushStandIn(tls) as push:

        async def scenario() -> None:
            db = await asyncpg.connect(postgres_store)
            try:
                await run(db)
            finally:
                await db.close()

        async def run(db: asyncpg.Connection) -> None:
            procs.append(
                start(tmp_path, ports[0], application_url(postgres_store, "herald-a"), **env)
            )
            pid_a = str(procs[0].pid)
            await until_owned(db, {pid_a: SHARDS})
            procs.append(
                start(tmp_path, ports[1], application_url(postgres_store, "herald-b"), **env)
            )
            pid_b = str(procs[1].pid)
            await until_owned(db, {pid_a: SHARDS // 2, pid_b: SHARDS // 2})
            held = await owners(db)
            on_a = await users_in(db, {s for s, p in held.items() if p == pid_a}, USERS_ON_A)
            on_b = await users_in(db, {s for s, p in held.items() if p == pid_b}, USERS_ON_B)
            users = on_a + on_b
            tokens = [issuer.mint(client_id=client_id, user_id=u) for u in users]
            await db.execute(AUDIT_SQL)

            devices: list[Device] = []
            webpush: dict[str, tuple[str, str]] = {}  # subscription id -> (target, token)
            for token in tokens:
                async with api(node_b, token) as client:
                    key = (await client.get("/beta/webPushKey")).json()["applicationServerKey"]
                    channel = push.subscribe(key)
                    body = subscription_body(HOST, "webPush", pushChannel=channel)
                    r = await client.post("/beta/me/notificationSubscriptions", json=body)
                    assert r.status_code == 201, r.text
                    webpush[r.json()["id"]] = (push.target_of(channel["endpoint"]), token)
                    for base in (node_a, node_b):
                        r = await client.post(
                            "/beta/me/notificationSubscriptions",
                            json=subscription_body(HOST, "live"),
                        )
                        assert r.status_code == 201, r.text
                        devices.append(Device(base, node_b, r.json()["id"], token))
            followers = [asyncio.create_task(d.follow()) for d in devices]
            try:
                async with asyncio.timeout(WAIT):
                    await asyncio.gather(*(d.ready.wait() for d in devices))
                push.delay(0.5)  # pushes stay in flight for a while: some are when A dies
                acked, takeover, in_flight = await burst(db, tokens, pid_b)
                await settle(db, devices, tokens, acked, webpush, push)
                await reclaimed(db, in_flight)
            finally:
                for task in followers:
                    task.cancel()
                errors = await asyncio.gather(*followers, return_exceptions=True)
            for e in errors:
                assert isinstance(e, asyncio.CancelledError), e
            resumed = sum(d.resumed for d in devices)
            # Every device on A resumed on B; a frozen A kept its devices' streams.
            assert resumed == (len(tokens) if fault == "kill" else 0)
            sent = Counter((d.target, d.message["position"]) for d in push.accepted())
            again = sum(n - 1 for n in sent.values())
            what = "kill -9" if fault == "kill" else "SIGSTOP"
            print(
                f"\n{what} of the dispatching node: {len(acked)} posts acked by B;"
                f" A stopped {KILL_AFTER} s into the burst; B held every shard"
                f" {takeover:.2f} s after it (lease TTL {TTL_SECONDS:g} s, renewal every"
                f" {RENEW_SECONDS:g} s); {resumed} devices resumed on B; {len(in_flight)} pushes in"
                f" flight on A then, claimed again by B after the {PUSH_LEASE:g} s push"
                f" lease and sent; {again} pushes reached the push service twice (sent by A"
                " and again by B: at-least-once sending)"
            )
            assert takeover <= TTL_SECONDS + 2.0, takeover

        async def burst(
            db: asyncpg.Connection, tokens: list[str], pid_b: str
        ) -> tuple[dict[str, str], float, list[asyncpg.Record]]:
            """Post to B; kill A mid-burst; id -> user of every 201, the takeover time."""
            acked: dict[str, str] = {}
            stop_at = time.monotonic() + KILL_AFTER + BURST_AFTER_KILL
            numbers = iter(range(1_000_000))

            async def client() -> None:
                sessions = [api(node_b, token) for token in tokens]
                try:
                    for i in numbers:
                        if time.monotonic() >= stop_at:
                            return
                        body = {
                            "targetHostName": HOST,
                            "payload": {"visualContent": {"title": f"message {i}"}},
                        }
                        try:
                            r = await sessions[i % len(tokens)].post(
                                "/beta/me/notifications", json=body
                            )
                        except httpx.TimeoutException as e:  # what held it up, in the message
                            raise AssertionError(
                                f"post {i} timed out: {await node_sessions(postgres_store)}"
                            ) from e
                        assert r.status_code == 201, r.text
                        acked[r.json()["id"]] = tokens[i % len(tokens)]
                        await asyncio.sleep(PAUSE)
                finally:
                    for session in sessions:
                        await session.aclose()

            posting = asyncio.gather(*(client() for _ in range(CLIENTS)))
            await asyncio.sleep(KILL_AFTER)
            deadline = time.monotonic() + WAIT
            while not await db.fetch(IN_FLIGHT_SQL):  # A is pushing (the stand-in holds 0.5 s)
                assert time.monotonic() < deadline, "node A never had a push in flight"
                await asyncio.sleep(0.01)
            if fault == "kill":
                procs[0].kill()  # SIGKILL: no release, no goodbye to PostgreSQL or Redis
                procs[0].wait()
            else:
                procs[0].send_signal(signal.SIGSTOP)
            killed = time.monotonic()
            await until_quiet(db, "herald-a")
            in_flight = await db.fetch(IN_FLIGHT_SQL)
            await until_owned(db, {pid_b: SHARDS})
            takeover = time.monotonic() - killed
            if fault == "freeze":
                # Let A go once B has claimed A's pushes again (A would settle them otherwise):
                # A finishes the batch it was dispatching, of shards that are B's now.
                deadline = time.monotonic() + WAIT
                while not await all_reclaimed(db, in_flight):
                    if time.monotonic() >= deadline:
                        rows = await db.fetch(
                            "SELECT id, attempts, due, now() FROM deliveries WHERE id = ANY($1)",
                            [r[0] for r in in_flight],
                        )
                        held = await node_sessions(postgres_store)
                        raise AssertionError(f"B did not claim A's pushes again: {rows}; {held}")
                    await asyncio.sleep(0.05)
                procs[0].send_signal(signal.SIGCONT)
            await posting
            return acked, takeover, in_flight

        async def settle(
            db: asyncpg.Connection,
            devices: list[Device],
            tokens: list[str],
            acked: dict[str, str],
            webpush: dict[str, tuple[str, str]],
            push: WebPushStandIn,
        ) -> None:
            heads: dict[str, tuple[list[str], int]] = {}
            for token in set(tokens):
                heads[token] = await delta(node_b, token, 0)
            for id_, token in acked.items():
                assert id_ in heads[token][0], f"acked {id_} is not in the store"
            loop = asyncio.get_running_loop()
            deadline = loop.time() + WAIT
            while any(d.position < heads[d.token][1] for d in devices):
                behind = [(d.position, heads[d.token][1]) for d in devices]
                assert loop.time() < deadline, f"devices behind: {behind}"
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # a duplicate would arrive now
            for d in devices:
                positions = [m["position"] for m in d.messages]
                assert positions == sorted(set(positions)), "strictly increasing, no duplicate"
                assert [m["id"] for m in d.messages] == heads[d.token][0], "equal to delta"
            # One push queued per (subscription, change): every change is a create, so one alert
            # to each user's Web Push subscription.
            queued = Counter((r[0], r[1]) for r in await db.fetch("SELECT * FROM queued_audit"))
            assert all(n == 1 for n in queued.values()), [k for k, n in queued.items() if n > 1]
            for sub, (_, token) in webpush.items():
                positions = sorted(p for s, p in queued if s == sub)
                assert positions == list(range(1, heads[token][1] + 1)), f"{sub}: queued pushes"
            assert sum(queued.values()) == len(acked)
            # Every queued push is sent, those in flight on A at the kill too (after the lease).
            deadline = loop.time() + WAIT
            while True:
                sent = {
                    (target, d.message["position"])
                    for target, _ in webpush.values()
                    for d in push.accepted(target)
                }
                wanted = {(webpush[s][0], p) for s, p in queued}
                left = await db.fetchval("SELECT count(*) FROM deliveries")
                if wanted <= sent and left == 0:
                    break
                assert loop.time() < deadline, (
                    f"{len(wanted - sent)} pushes not sent, {left} queued"
                )
                await asyncio.sleep(0.1)

        async def all_reclaimed(db: asyncpg.Connection, in_flight: list[asyncpg.Record]) -> bool:
            for delivery, attempts, _ in in_flight:
                again = await db.fetchval(
                    "SELECT count(*) FROM claim_audit WHERE id = $1 AND attempts = $2",
                    delivery,
                    attempts + 1,
                )
                if not again:
                    return False
            return True

        async def reclaimed(db: asyncpg.Connection, in_flight: list[asyncpg.Record]) -> None:
            """Each push in flight on A when it died was claimed again by B, not before its
            lease ran out (and, as `settle` checked, sent)."""
            assert in_flight
            for delivery, attempts, due in in_flight:
                rows = await db.fetch(
                    "SELECT node, at FROM claim_audit WHERE id = $1 AND attempts = $2",
                    delivery,
                    attempts + 1,
                )
                assert [r[0] for r in rows] == ["herald-b"], (delivery, rows)
                assert rows[0][1] >= due  # not before A's lease on it ran out

        try:
            asyncio.run(scenario())
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGCONT)
                stop(proc)


@pytest.mark.parametrize("broker", ["memory", "redis"])
def test_a_node_stopped_cleanly_hands_its_shards_over_at_once(
    tmp_path: Path, postgres_store: str, broker: str, request: pytest.FixtureRequest
) -> None:
    """SIGTERM (a rolling restart): the node releases its shards as it stops. With Redis it says
    so and the other node takes them at once; without, at its next renewal. Either way not when
    the leases would have run out."""
    env: dict[str, str] = {}
    if broker == "redis":
        redis: RedisServer = request.getfixturevalue("redis_service")
        env = {"HERALD_BROKER": "redis", "HERALD_REDIS_URL": redis.url}
    ports = free_port(), free_port()
    procs = [start(tmp_path, port, postgres_store, **env) for port in ports]

    async def scenario() -> float:
        db = await asyncpg.connect(postgres_store)
        try:
            pids = [str(p.pid) for p in procs]
            await until_owned(db, {pid: SHARDS // 2 for pid in pids})
            began = time.monotonic()
            procs[0].terminate()
            await until_owned(db, {pids[1]: SHARDS})
            return time.monotonic() - began
        finally:
            await db.close()

    try:
        handover = asyncio.run(scenario())
        procs[0].wait(10)  # uvicorn re-raises SIGTERM once it has shut down: -15
        print(f"\nSIGTERM, {broker} broker: the other node held every shard {handover:.2f} s after")
        # Redis: well under a renewal period (measured 0.17 s, 0.53 s on a loaded machine; 1.01 s
        # before the hand-over message, when the other node waited for its renewal).
        bound = 0.75 * RENEW_SECONDS if broker == "redis" else RENEW_SECONDS + 1.0
        assert handover < bound < TTL_SECONDS, handover
    finally:
        for proc in procs:
            stop(proc)


SHORT_TTL, SHORT_RENEW = 1.5, 0.3
# Scheduling on a busy machine: processes woken late, a renewal transaction waiting its turn.
SLACK = 1.0


@pytest.mark.parametrize(
    ("ttl", "renew"),
    [(SHORT_TTL, SHORT_RENEW), (TTL_SECONDS, RENEW_SECONDS)],
    ids=["short", "default"],
)
def test_a_killed_node_s_shards_are_taken_after_the_configured_lease_ttl(
    tmp_path: Path, postgres_store: str, ttl: float, renew: float
) -> None:
    """kill -9 of one of two nodes: the survivor holds every shard within ttl + 2 renewals (the
    dead node's last renewal may be one period before the kill, and the survivor takes the
    shards at its first renewal after they lapse). With a 1.5 s TTL that is well before the
    default 5 s TTL could have run out; with the default it is not that fast."""
    env = {"HERALD_DISPATCH_LEASE_TTL": str(ttl), "HERALD_DISPATCH_RENEW_INTERVAL": str(renew)}
    ports = free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []

    async def scenario() -> float:
        db = await asyncpg.connect(postgres_store)
        try:
            procs.append(start(tmp_path, ports[0], postgres_store, **env))
            procs.append(start(tmp_path, ports[1], postgres_store, **env))
            pids = [str(p.pid) for p in procs]
            await until_owned(db, {pid: SHARDS // 2 for pid in pids})
            procs[0].kill()
            procs[0].wait()
            killed = time.monotonic()
            await until_owned(db, {pids[1]: SHARDS}, wait=TTL_SECONDS + 3 * RENEW_SECONDS + SLACK)
            return time.monotonic() - killed
        finally:
            await db.close()

    try:
        took = asyncio.run(scenario())
    finally:
        for proc in procs:
            stop(proc)
    short_bound = SHORT_TTL + 2 * SHORT_RENEW + SLACK
    print(f"\nkill -9, lease TTL {ttl:g} s, renewal every {renew:g} s: taken over in {took:.2f} s")
    if ttl == SHORT_TTL:
        assert took <= short_bound, took
    else:  # at least ttl - renew after the kill: the default's leases outlive the short bound
        assert short_bound < took <= ttl + 2 * renew + SLACK, took


def shares(base: str) -> tuple[float, dict[str, float]]:
    """A node's herald_dispatch_shards_held and its shard changes (gained, lost), from /metrics."""
    r = httpx.get(f"{base}/metrics", timeout=5, trust_env=False)
    assert r.status_code == 200, r.text
    families = {f.name: f.samples for f in text_string_to_metric_families(r.text)}
    (held,) = families["herald_dispatch_shards_held"]
    changes = {
        s.labels["change"]: s.value
        for s in families["herald_dispatch_shard_changes"]
        if s.name.endswith("_total")
    }
    return held.value, changes


def test_each_node_reports_the_shards_it_holds_on_metrics(
    tmp_path: Path, postgres_store: str
) -> None:
    """Two nodes on one PostgreSQL: their herald_dispatch_shards_held gauges sum to 64 once
    settled, 32 each, and each one's gained - lost is what it holds (the first node took all 64
    alone, then gave 32 to the second); once the first stops cleanly, the second reports 64."""
    ports = free_port(), free_port()
    bases = [f"http://127.0.0.1:{port}" for port in ports]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(start(tmp_path, ports[0], postgres_store))
        procs.append(start(tmp_path, ports[1], postgres_store))
        deadline = time.monotonic() + 20
        while [shares(b)[0] for b in bases] != [SHARDS // 2] * 2:
            assert time.monotonic() < deadline, [shares(b) for b in bases]
            time.sleep(0.1)
        (held_a, a), (held_b, b) = (shares(base) for base in bases)
        assert held_a + held_b == SHARDS
        assert a["gained"] - a["lost"] == held_a and a["lost"] >= SHARDS // 2, a
        assert b["gained"] - b["lost"] == held_b, b
        procs[0].terminate()
        procs[0].wait(10)
        deadline = time.monotonic() + 2 * RENEW_SECONDS + SLACK  # well before a lease runs out
        while shares(bases[1])[0] != SHARDS:
            assert time.monotonic() < deadline, shares(bases[1])
            time.sleep(0.1)
        held_b, b = shares(bases[1])
        assert b["gained"] - b["lost"] == SHARDS, b
    finally:
        for proc in procs:
            stop(proc)
