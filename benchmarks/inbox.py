"""Web inbox benchmark: how fast what an app server posts shows up in the inbox page, how fast the
page starts, and what it weighs; the browser path against a plain Python client of the same API,
measured in the same run.

One `herald serve` (embedded SQLite, a temporary data dir, rate limits raised through HERALD_*_RATE
and _BURST) and headless Chromium (`/usr/bin/chromium`, a fresh profile per page, Playwright's sync
API). Users sign in with `herald signin` links; tokens come from `herald token`.

1. Latency, for each feed size in `--shown` (that many notifications already on the page): the page
   is open for one user, and a raw `websockets` client in its own process streams its own `webPush`
   subscription of the same user: the baseline, i.e. the browser path minus Chromium, herald.js and
   the page. This process, as the app server, posts `--warmup` then `-n` notifications one at a time
   at `--rate`/s (open loop, app-only token, `POST /beta/users/{user}/notifications`). For each:
   from the 201 (`time.time()` right after it) to (a) `#feed li[data-id=…]` entering the page's DOM,
   recorded by a MutationObserver (installed with `add_init_script`) as `performance.timeOrigin +
   performance.now()`; (b) the page's WebSocket receiving the `created` message (a listener that
   runs before herald.js's own, which splits (a) into delivery and library + render); (c) the
   Python client receiving it (`time.time()` before parsing). All are wall-clock readings of this
   machine (the page's: its wall-clock time origin plus a monotonic offset); the script compares
   the two clocks before and after (`clock`, which must be ~0). (a) is the DOM, not the paint.
   While posting it also reads CPU time from /proc (Herald; Chromium with Playwright's driver; the
   client; this process; everything else on the machine) and the page's main-thread time per
   notification (CDP Performance metrics: all tasks, and script, style, layout among them).
2. Page start, for each feed size in `--feeds`, `--repeat` times: from `page.goto(<sign-in link>)`
   in a fresh profile to `#connection` being `live` with every item in the DOM ("first visit":
   static files, token exchange, subscription POST, delta pages, stream), then again after
   `page.reload()` (session and subscription kept, files revalidated). Baseline: the page's own
   requests back to back with httpx (config.json, token exchange, webPushKey, subscription POST or
   GET, every delta page) and the stream opened with `websockets` until `ready`. The phases of the
   last run are shown too (from the page's Navigation and Resource Timing).
3. Weight: the inbox's files raw and gzip -9 (Herald serves them gzipped), and the page's JS heap
   (CDP `Runtime.getHeapUsage` after a forced GC) and DOM size with each feed size shown.

Ratios are printed, nothing is asserted on time. Exit status 1 only if a POST was refused or a
notification never arrived. Everything started here (Herald, Chromium, the client process) is
stopped on exit, failure, Ctrl-C or SIGTERM. Needs Playwright (`pip install -e '.[test]'`) and
Chromium (`apt-get install chromium`).

Usage: .venv/bin/python benchmarks/inbox.py [-n 200] [--rate 20] [--shown 0,1000]
       [--feeds 100,1000] [--repeat 3] [--wait-quiet S] [--json] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import json
import math
import multiprocessing as mp
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import httpx
import ingest  # shared helpers: processes, ports, /proc CPU, app registration
from ingest import HOST, HOST_NAME

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext, CDPSession, Page, Playwright

WEB = ingest.REPO / "src" / "herald" / "web"
FILES = ("index.html", "inbox.css", "inbox.js", "herald.js", "sw.js", "icon.svg")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--disable-background-networking", "--disable-component-update"]
CHROMIUM_ARGS += ["--no-first-run", "--disable-sync"]
EXTRA_ENV = {"HERALD_TOKEN_RATE": "1000000", "HERALD_TOKEN_BURST": "1000000"}
SIGNIN_GRANT = "urn:herald:params:oauth:grant-type:signin-code"
WAIT_MS = 60_000  # the longest any wait on the page may take
CREATED = re.compile(r'^\{"type":"created","position":\d+,"id":"([^"]+)"')
# Installed in every page before its own scripts: when each feed item enters the DOM, when the
# connection turns live, and when the page's WebSocket receives each `created` message.
PROBE = """(() => {
  const now = () => performance.timeOrigin + performance.now();
  const bench = (window.__bench = { shown: {}, received: {}, live: null, count: 0 });
  const created = /^\\{"type":"created","position":\\d+,"id":"([^"]+)"/;
  window.WebSocket = class extends window.WebSocket {
    constructor(...args) {
      super(...args);
      this.addEventListener("message", (e) => {
        const m = typeof e.data === "string" && created.exec(e.data);
        if (m) bench.received[m[1]] ??= now();
      });
    }
  };
  const record = (records) => {
    const t = now();
    for (const r of records) {
      if (r.type === "attributes") {
        if (r.target.id === "connection" && r.target.dataset.state === "live") bench.live ??= t;
      } else if (r.target.id === "feed") {
        for (const node of r.addedNodes) {
          const id = node.nodeType === 1 ? node.dataset.id : undefined;
          if (id && !(id in bench.shown)) { bench.shown[id] = t; bench.count++; }
        }
      }
    }
  };
  // The whole document until it is parsed, then only #feed's children and #connection's state
  // (a subtree observer would be handed every text change of every item on each render).
  const early = new MutationObserver(record);
  early.observe(document, { subtree: true, childList: true, attributeFilter: ["data-state"] });
  document.addEventListener("DOMContentLoaded", () => {
    record(early.takeRecords());
    early.disconnect();
    const late = new MutationObserver(record);
    late.observe(document.getElementById("feed"), { childList: true });
    late.observe(document.getElementById("connection"), { attributeFilter: ["data-state"] });
  });
})();"""
# Where a page start's time went: DOMContentLoaded (files loaded, modules run) and the end of the
# last fetch (the last delta page), in ms since the navigation started.
PHASES = """() => ({
  origin: performance.timeOrigin,
  dcl: performance.getEntriesByType("navigation")[0].domContentLoadedEventEnd,
  fetched: Math.max(0, ...performance.getEntriesByType("resource")
    .filter((e) => e.initiatorType === "fetch").map((e) => e.responseEnd)),
})"""


@dataclass
class Stats:
    """Milliseconds; nearest-rank percentiles."""

    n: int = 0
    p50: float = math.nan
    p90: float = math.nan
    p99: float = math.nan
    max: float = math.nan

    @classmethod
    def of(cls, seconds: list[float]) -> Stats:
        xs = sorted(x * 1000 for x in seconds)
        if not xs:
            return cls()
        p50, p90, p99 = (xs[max(0, math.ceil(q * len(xs)) - 1)] for q in (0.5, 0.9, 0.99))
        return cls(len(xs), p50, p90, p99, xs[-1])


@dataclass
class Latency:
    shown: int
    posted: int = 0
    refused: list[str] = field(default_factory=list)  # POSTs not answered 201
    page_dom: Stats = field(default_factory=Stats)
    page_ws: Stats = field(default_factory=Stats)
    baseline: Stats = field(default_factory=Stats)
    post: Stats = field(default_factory=Stats)  # POST sent → 201
    missing_page: int = 0
    missing_baseline: int = 0
    cpu_pct: dict[str, float] = field(default_factory=dict)  # while posting, % of one core
    clock_ms: list[tuple[float, float]] = field(default_factory=list)  # page − Python, ± error
    renderer_ms: dict[str, float] = field(default_factory=dict)  # main thread, per notification


@dataclass
class Start:
    feed: int
    first: list[float] = field(default_factory=list)  # seconds, page
    reload: list[float] = field(default_factory=list)
    base_first: list[float] = field(default_factory=list)  # seconds, httpx + websockets
    base_reload: list[float] = field(default_factory=list)
    phases: dict[str, dict[str, float]] = field(default_factory=dict)  # last run, ms
    heap_bytes: int = 0
    dom_elements: int = 0
    delta_bytes: int = 0  # the feed as delta JSON


def median(xs: list[float]) -> float:
    ys = sorted(xs)
    return (ys[(len(ys) - 1) // 2] + ys[len(ys) // 2]) / 2 if ys else math.nan


class Herald:
    """`herald serve` and the CLI on its data dir."""

    def __init__(self, procs: ingest.Processes, work: Path) -> None:
        self.data, self.port = work / "data", ingest.free_port()
        self.env = ingest.server_env(EXTRA_ENV)
        self.data.mkdir()
        self.client_id = ingest.register_app(self.data, None, self.env)
        argv = [ingest.herald_bin(), "serve", "--data", str(self.data), "--port", str(self.port)]
        log_path = work / "herald.log"
        self.proc = procs.start(argv, self.env, log_path)
        ingest.wait_ready(self.proc, self.port, "/readyz", log_path)
        self.origin = f"http://{HOST}:{self.port}"
        self.app = self.client(self.cli("token"))

    def cli(self, *args: str) -> str:
        argv = [ingest.herald_bin(), *args, "--app", self.client_id, "--data", str(self.data)]
        done = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"herald {args[0]} failed:\n{done.stdout}{done.stderr}")
        return done.stdout.strip()

    def signin(self, user: str) -> str:
        return self.cli("signin", "--user", user, "--port", str(self.port))

    def client(self, token: str | None = None) -> httpx.Client:
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.origin, headers=auth, timeout=30, trust_env=False)

    def notify(self, user: str) -> httpx.Response:
        visual = {"title": "Build finished", "body": "All 412 checks passed on main"}
        body: dict[str, Any] = {"targetHostName": HOST_NAME, "appNotificationId": uuid.uuid4().hex}
        body["payload"] = {"visualContent": visual}
        return self.app.post(f"/beta/users/{user}/notifications", json=body)

    def fill(self, user: str, count: int) -> None:
        for _ in range(count):
            self.notify(user).raise_for_status()

    def stream_url(self, sub_id: str, token: str, after: str | None = None) -> str:
        query = (f"after={after}&" if after else "") + f"access_token={token}"
        return f"ws://{HOST}:{self.port}/beta/me/notificationSubscriptions/{sub_id}/stream?{query}"


def subscribe(me: httpx.Client) -> str:
    body = {"application": HOST_NAME, "platform": "webPush", "displayName": "benchmark"}
    r = me.post("/beta/me/notificationSubscriptions", json=body)
    r.raise_for_status()
    return str(r.json()["id"])


def open_page(pw: Playwright, work: Path, opened: list[BrowserContext]) -> Page:
    profile = tempfile.mkdtemp(prefix="profile-", dir=work)
    context = pw.chromium.launch_persistent_context(
        profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
    )
    opened.append(context)
    context.set_default_timeout(WAIT_MS)
    context.add_init_script(PROBE)
    return context.pages[0] if context.pages else context.new_page()


def wait_feed(page: Page, count: int, timeout_ms: float = WAIT_MS) -> dict[str, Any]:
    """Once live with `count` items in the DOM: the probe's record."""
    ready = "(n) => window.__bench?.live && window.__bench.count >= n"  # a function: CSP, no eval
    page.wait_for_function(ready, arg=count, timeout=timeout_ms)
    return dict(page.evaluate("window.__bench"))


def clock_offset(page: Page) -> tuple[float, float]:
    """The page's clock minus `time.time()` in ms, ± half the round trip (best of 5)."""
    best = (math.inf, 0.0)
    for _ in range(5):
        t0 = time.time()
        v = float(page.evaluate("performance.timeOrigin + performance.now()")) / 1000
        t1 = time.time()
        best = min(best, ((t1 - t0) / 2, v - (t0 + t1) / 2))
    return best[1] * 1000, best[0] * 1000


def tree_cpu(root: int) -> dict[int, float]:
    """CPU seconds of every live process descended from `root` (root included), by pid."""
    parent, cpu = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(stat.parent.name)
        parent[pid], cpu[pid] = int(fields[1]), (int(fields[11]) + int(fields[12]))
    mine = {}
    for pid, ticks in cpu.items():
        p = pid
        while p > 1 and p != root:
            p = parent.get(p, 0)
        if p == root:
            mine[pid] = ticks / ingest.CLK_TCK
    return mine


def cpu_split(herald: int, client: int) -> dict[str, float]:
    """CPU seconds so far: Herald, the client, Chromium (with Playwright's driver), this
    process, and everything else on the machine."""
    tree = tree_cpu(os.getpid())
    mine = {"herald": tree.get(herald, 0.0), "ws client": tree.get(client, 0.0)}
    mine["chromium"] = sum(tree.values()) - sum(mine.values()) - tree.get(os.getpid(), 0.0)
    mine["harness"] = ingest.own_cpu()
    return {**mine, "other": ingest.system_busy_seconds() - sum(mine.values()), "t": time.time()}


def renderer(cdp: CDPSession) -> dict[str, float]:
    """The page's main-thread time so far (CDP Performance metrics), in seconds."""
    m = {x["name"]: x["value"] for x in cdp.send("Performance.getMetrics")["metrics"]}
    names = ("tasks", "script", "style", "layout")
    keys = ("TaskDuration", "ScriptDuration", "RecalcStyleDuration", "LayoutDuration")
    return {name: float(m[key]) for name, key in zip(names, keys, strict=True)}


# -- 1. latency ------------------------------------------------------------------------------------


def ws_client(url: str, expected: int, first: float, drain: float, conn: Connection) -> None:
    """The baseline device (its own process): when each `created` message arrived. It waits up
    to `first` s for the first one, then until `drain` s pass without one."""

    async def run() -> dict[str, float]:
        from websockets.asyncio.client import connect

        seen: dict[str, float] = {}
        async with connect(url) as ws:
            json.loads(await ws.recv())  # ready
            conn.send("ready")
            while len(seen) < expected:
                try:
                    data = await asyncio.wait_for(ws.recv(), drain if seen else first)
                except TimeoutError:
                    break
                t = time.time()
                m = CREATED.match(data if isinstance(data, str) else data.decode())
                if m:
                    seen.setdefault(m[1], t)
        return seen

    conn.send(asyncio.run(run()))


def latency(args: argparse.Namespace, herald: Herald, pw: Playwright, shown: int) -> Latency:
    user, result = f"inbox-latency-{shown}", Latency(shown)
    herald.fill(user, shown)
    token = herald.cli("token", "--user", user)
    with herald.client(token) as me:
        url = herald.stream_url(subscribe(me), token)
    total = args.warmup + args.notifications
    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    client_args = (url, total, args.wait_quiet + 120, args.drain, theirs)
    client = ctx.Process(target=ws_client, args=client_args, daemon=True)
    client.start()
    page: Page | None = None
    try:
        if not ours.poll(30) or ours.recv() != "ready":
            raise RuntimeError("the websockets client did not get its stream")
        page = open_page(pw, args.work, args.opened)
        page.goto(herald.signin(user))
        cdp = page.context.new_cdp_session(page)
        cdp.send("Performance.enable")
        wait_feed(page, shown)
        result.clock_ms.append(clock_offset(page))
        ingest.wait_quiet(args.wait_quiet, lambda: sum(tree_cpu(os.getpid()).values()), log)
        log(f"latency, {shown} shown: posting {args.warmup} + {args.notifications}")
        posts: list[tuple[str, float, float]] = []  # id, sent, 201
        cpu0: dict[str, float] = {}
        main0: dict[str, float] = {}
        begin = time.monotonic() + 0.1
        for i in range(total):
            if i == args.warmup:
                cpu0 = cpu_split(herald.proc.pid, client.pid or 0)
                main0 = renderer(cdp)
            time.sleep(max(0.0, begin + i / args.rate - time.monotonic()))
            sent = time.time()
            r = herald.notify(user)
            done = time.time()
            if r.status_code != 201:
                result.refused.append(f"{r.status_code} {r.text[:200]}")
            elif i >= args.warmup:
                posts.append((r.json()["id"], sent, done))
        cpu1 = cpu_split(herald.proc.pid, client.pid or 0)
        result.cpu_pct = {k: 100 * (cpu1[k] - v) / (cpu1["t"] - cpu0["t"]) for k, v in cpu0.items()}
        del result.cpu_pct["t"]
        with contextlib.suppress(Exception):  # what is missing then is reported as missing
            wait_feed(page, shown + total - len(result.refused), args.drain * 1000)
        bench = dict(page.evaluate("window.__bench"))
        main1 = renderer(cdp)
        result.renderer_ms = {
            k: (main1[k] - v) * 1000 / max(1, len(posts)) for k, v in main0.items()
        }
        result.clock_ms.append(clock_offset(page))
        base: dict[str, float] = ours.recv() if ours.poll(2 * args.drain) else {}
    finally:
        if page is not None:
            args.opened.remove(page.context)
            with contextlib.suppress(Exception):  # the driver may be gone (Ctrl-C)
                page.context.close()
        client.join(1)
        if client.is_alive():
            client.terminate()
            client.join(5)

    def since_201(times: dict[str, float], scale: float) -> list[float]:
        return [times[i] / scale - done for i, _, done in posts if i in times]

    result.posted = len(posts)
    result.page_dom = Stats.of(since_201(bench["shown"], 1000))
    result.page_ws = Stats.of(since_201(bench["received"], 1000))
    result.baseline = Stats.of(since_201(base, 1))
    result.post = Stats.of([done - sent for _, sent, done in posts])
    result.missing_page = sum(i not in bench["shown"] for i, _, _ in posts)
    result.missing_baseline = sum(i not in base for i, _, _ in posts)
    return result


# -- 2. page start ---------------------------------------------------------------------------------


def api_start(herald: Herald, code: str | None, token: str, sub: str | None) -> tuple[float, Any]:
    """The page's start-up requests, back to back: seconds, (token, subscription, delta bytes)."""
    from websockets.sync.client import connect

    with herald.client() as c:
        t0 = time.perf_counter()
        c.get("/inbox/config.json").raise_for_status()
        if code is not None:
            form = {"grant_type": SIGNIN_GRANT, "code": code, "client_id": herald.client_id}
            token = (
                c.post("/oauth2/v2.0/token", data=form).raise_for_status().json()["access_token"]
            )
        c.headers["Authorization"] = f"Bearer {token}"
        c.get("/beta/webPushKey").raise_for_status()
        if sub is None:
            sub = subscribe(c)
        else:
            c.get(f"/beta/me/notificationSubscriptions/{sub}").raise_for_status()
        link: str | None = "/beta/me/notifications/delta"
        size, after = 0, None
        while link:
            r = c.get(link).raise_for_status()
            size += len(r.content)
            doc = r.json()
            link = doc.get("@odata.nextLink")
            if not link:
                after = parse_qs(urlsplit(doc["@odata.deltaLink"]).query)["$deltatoken"][0]
        with connect(herald.stream_url(sub, token, after)) as ws:
            json.loads(ws.recv(timeout=30))  # ready
        return time.perf_counter() - t0, (token, sub, size)


def page_start(args: argparse.Namespace, herald: Herald, pw: Playwright, k: int) -> Start:
    user, result = f"inbox-feed-{k}", Start(k)
    herald.fill(user, k)

    def timed(page: Page, link: str | None, visit: str) -> float:
        """Open `link` (None: reload) and wait: seconds, and the phases noted."""
        t0 = time.time()
        page.goto(link) if link else page.reload()
        b = wait_feed(page, k)
        last = max(b["shown"].values(), default=math.nan)
        phases = page.evaluate(PHASES)
        at = phases["origin"] - t0 * 1000
        result.phases[visit] = {
            "files and modules": at + phases["dcl"],
            "requests done": at + phases["fetched"],
            "feed in the DOM": last - t0 * 1000,
            "live": b["live"] - t0 * 1000,
        }
        return float(max(b["live"], last if k else 0)) / 1000 - t0

    for rep in range(args.repeat):
        page = open_page(pw, args.work, args.opened)
        result.first.append(timed(page, herald.signin(user), "first visit"))
        result.reload.append(timed(page, None, "reload"))
        if rep == args.repeat - 1:
            cdp = page.context.new_cdp_session(page)
            cdp.send("HeapProfiler.collectGarbage")
            result.heap_bytes = int(cdp.send("Runtime.getHeapUsage")["usedSize"])
            result.dom_elements = int(page.evaluate("document.getElementsByTagName('*').length"))
        args.opened.remove(page.context)
        page.context.close()
        code = herald.signin(user).split("#signin=", 1)[1]
        seconds, (token, sub, result.delta_bytes) = api_start(herald, code, "", None)
        result.base_first.append(seconds)
        result.base_reload.append(api_start(herald, None, token, sub)[0])
    return result


# -- 3. weight, report -----------------------------------------------------------------------------


def weight() -> dict[str, tuple[int, int]]:
    files = {name: (WEB / name).read_bytes() for name in FILES}
    return {name: (len(data), len(gzip.compress(data, 9, mtime=0))) for name, data in files.items()}


def print_report(args: argparse.Namespace, lats: list[Latency], starts: list[Start]) -> None:
    p = print
    p(f"\nLatency, ms from the POST's 201: {args.notifications} notifications at {args.rate:g}/s")
    p(f"to one user after {args.warmup} warm-up, with `shown` notifications on the page before")
    head = f"{'shown':>6}  {'':<30}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}{'missing':>9}"
    p(head + "\n" + "-" * len(head))
    for lat in lats:
        rows = [
            ("baseline: websockets client", lat.baseline, lat.missing_baseline),
            ("page: WebSocket message", lat.page_ws, ""),
            ("page: item in the DOM", lat.page_dom, lat.missing_page),
        ]
        for i, (name, st, missing) in enumerate(rows):
            n = "" if i else lat.shown
            ps = "".join(f"{v:>8.2f}" for v in (st.p50, st.p90, st.p99))
            p(f"{n:>6}  {name:<30}{ps}{st.max:>8.1f}{missing:>9}")
        b, d = lat.baseline, lat.page_dom
        diff = "".join(
            f"{x - y:>8.2f}" for x, y in ((d.p50, b.p50), (d.p90, b.p90), (d.p99, b.p99))
        )
        p(f"{'':>6}  {'page (DOM) − baseline':<30}{diff}{d.max - b.max:>8.1f}")
        p(f"{'':>6}  {'page (DOM) / baseline':<30}{d.p50 / b.p50:>7.1f}x{d.p99 / b.p99:>15.1f}x")
    for lat in lats:
        cpu = ", ".join(f"{k} {v:.0f}" for k, v in lat.cpu_pct.items())
        clock = ", ".join(f"{o:+.2f} ±{e:.2f}" for o, e in lat.clock_ms)
        p(f"{lat.shown} shown: POST → 201 p50 {lat.post.p50:.1f} ms, p99 {lat.post.p99:.1f} ms;")
        main = ", ".join(f"{k} {v:.1f}" for k, v in lat.renderer_ms.items())
        p(f"  CPU while posting, % of one core: {cpu}")
        p(f"  page's main thread per notification, ms: {main}")
        p(f"  clock, page − Python: {clock} ms (before, after)")
        if lat.cpu_pct.get("other", 0) > 15:
            p("  warning: other processes used > 15 % of a core while posting: a shared machine")
        if lat.refused:
            p(f"  REFUSED POSTs: {len(lat.refused)}, first: {lat.refused[0]}")
    p(f"\nPage start, ms to `live` with the whole feed in the DOM (median of {args.repeat})")
    head = f"{'feed':>6}{'first visit':>13}{'baseline':>10}{'ratio':>8}"
    head += f"{'reload':>10}{'baseline':>10}{'ratio':>8}"
    p(head + "\n" + "-" * len(head))
    for s in starts:
        f, bf, r, br = (median(x) * 1000 for x in (s.first, s.base_first, s.reload, s.base_reload))
        p(f"{s.feed:>6}{f:>13.0f}{bf:>10.1f}{f / bf:>7.0f}x{r:>10.0f}{br:>10.1f}{r / br:>7.0f}x")
    for s in starts:
        for visit, phases in s.phases.items():
            p(f"  {s.feed}, {visit}: " + ", ".join(f"{k} {v:.0f}" for k, v in phases.items()))
    p("\nPage weight")
    files = weight()
    total = (sum(raw for raw, _ in files.values()), sum(gz for _, gz in files.values()))
    for name, (raw, gz) in [*files.items(), ("total", total)]:
        p(f"  {name:<12}{raw:>9,} B{gz:>9,} B gzip -9")
    for s in starts:
        p(
            f"  {s.feed:>5} shown: JS heap {s.heap_bytes / 2**20:.2f} MiB after GC, "
            f"{s.dom_elements:,} elements; the feed as delta JSON {s.delta_bytes / 1024:,.0f} KiB"
        )
    if len(starts) >= 2 and starts[-1].feed > starts[0].feed:
        lo, hi = starts[0], starts[-1]
        heap = (hi.heap_bytes - lo.heap_bytes) / (hi.feed - lo.feed) / 1024
        js = (hi.delta_bytes - lo.delta_bytes) / (hi.feed - lo.feed) / 1024
        p(f"  per notification shown: {heap:.1f} KiB of heap, {js:.2f} KiB of delta JSON")


def log(msg: str) -> None:
    print(f"inbox: {msg}", file=sys.stderr, flush=True)


def sizes(text: str) -> list[int]:
    return sorted(int(x) for x in text.split(",") if x.strip())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("-n", "--notifications", type=int, default=200, help="measured posts (200)")
    ap.add_argument("--rate", type=float, default=20.0, help="posts per second (20)")
    ap.add_argument("--warmup", type=int, default=20, help="posts before measuring (20)")
    ap.add_argument("--shown", type=sizes, default=[0, 1000], help="feed sizes, latency (0,1000)")
    ap.add_argument("--feeds", type=sizes, default=[100, 1000], help="feed sizes, start (100,1000)")
    ap.add_argument("--repeat", type=int, default=3, help="page starts per feed size (3)")
    ap.add_argument("--drain", type=float, default=10.0, help="s to wait for late arrivals (10)")
    ap.add_argument("--wait-quiet", type=float, default=0.0, help="wait up to S s for an idle box")
    ap.add_argument("--json", action="store_true", help="print machine-readable JSON only")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, data)")
    args = ap.parse_args(argv)
    if not 1 <= args.repeat <= 20:
        ap.error("--repeat must be 1..20 (each run makes 2 subscriptions; 50 per user)")
    if args.notifications < 1 or args.rate <= 0:
        ap.error("-n and --rate must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not os.access(CHROMIUM, os.X_OK):
        sys.exit(f"inbox: Chromium is required at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    procs = ingest.Processes()
    args.work = Path(tempfile.mkdtemp(prefix="herald-inbox-"))
    args.opened = []
    lats: list[Latency] = []
    starts: list[Start] = []
    try:
        with ingest.signals_stop(procs), sync_playwright() as pw:
            try:
                herald = Herald(procs, args.work)
                lats = [latency(args, herald, pw, shown) for shown in args.shown]
                for k in args.feeds:
                    log(f"page start: feed of {k}")
                    starts.append(page_start(args, herald, pw, k))
            finally:
                for context in args.opened:
                    with contextlib.suppress(Exception):
                        context.close()
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        procs.stop_all()
        if args.keep:
            log(f"kept {args.work}")
        else:
            shutil.rmtree(args.work, ignore_errors=True)
    if args.json:
        config = {k: v for k, v in vars(args).items() if k not in ("opened", "work")}
        doc = {"config": config, "latency": [asdict(x) for x in lats], "files": weight()}
        print(json.dumps({**doc, "start": [asdict(s) for s in starts]}, indent=2))
    else:
        print_report(args, lats, starts)
    bad = any(x.refused or x.missing_page or x.missing_baseline for x in lats)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
