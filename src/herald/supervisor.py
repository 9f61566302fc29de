"""`herald serve --workers N`: N worker processes on one port, kept alive by a supervisor.

Each worker is a whole Herald (its own store pool, broker connection, dispatcher, streams) and
binds its own listening socket on the port with SO_REUSEPORT, so the kernel spreads new
connections over the workers by hash instead of handing them from one shared accept queue to
whichever worker is warm (with one shared socket a few workers take most connections: uvicorn PR
#2472, gunicorn #2938). Each worker also listens on `worker_port + index` (alone, but for its
replacement during a rolling restart), where its own /metrics (and the rest of the API) can be
reached: a scrape on the shared port reaches a random worker.

The supervisor imports no part of the server and holds no socket: it starts the workers (spawned,
so each starts from a clean interpreter), restarts one that exits (at once after a long run, with
a doubling delay after quick exits), and on SIGTERM or SIGINT tells every worker to drain and
exits 0 once all have. SIGTERM to one worker drains that worker only, and the supervisor starts
its replacement: a rolling restart, one worker at a time, loses nothing (docs/deployment.md).

SIGHUP makes the supervisor do that rolling restart itself, with the configuration read again:
for each worker in turn it starts the replacement, waits until it serves (its sockets listen and
its store answers), and only then tells the old one to drain, so the port never lacks a worker.
A SIGHUP during a rolling restart is queued: one more follows it (several are one).
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.context import SpawnContext, SpawnProcess
from multiprocessing.synchronize import Event
from types import FrameType

from herald.errors import HeraldError
from herald.settings import Settings

log = logging.getLogger("herald.supervisor")

BACKLOG = 2048  # uvicorn's default
# A worker that ran this long before exiting is restarted at once; quicker exits in a row wait
# BACKOFF_BASE, twice that, ... up to BACKOFF_MAX seconds (a broken store or port would
# otherwise make the supervisor spin).
STABLE_SECONDS = 10.0
BACKOFF_BASE = 0.5
BACKOFF_MAX = 30.0
# How long the supervisor waits for draining workers before it kills them: their own grace
# (herald.server.GRACE_SECONDS for streams, then as long again for responses) and a margin.
DRAIN_SECONDS = 15.0
STARTUP_FAILURE = 3  # uvicorn's exit code when the app's start-up (lifespan) failed
# How long a rolling restart waits for a replacement to serve before it gives up (and leaves
# the old worker serving).
READY_SECONDS = 60.0
# What a rolling restart cannot change: the processes and their sockets.
FIXED = ("host", "port", "workers", "worker_port")
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def listener(host: str, port: int, shared: bool) -> socket.socket:
    """A listening TCP socket on (host, port); with `shared`, SO_REUSEPORT, so every worker binds
    its own on the same port."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if shared:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def work(settings: Settings, index: int, ready: Event, supervisor: int) -> None:
    """A worker process: Herald on its share of the port and on its own port."""
    follow(supervisor)
    # A hang-up sent to the whole process group is the supervisor's to act on (a rolling
    # restart), not a reason for each worker to die without draining.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from herald.api.app import build_app
    from herald.logs import configure
    from herald.server import Server, config, raise_open_files_limit
    from herald.service import build_services

    configure(
        settings.log_level, settings.log_format, settings.log_repeats, settings.log_repeat_window
    )
    raise_open_files_limit()
    app = build_app(build_services(settings))
    services = app.state.services
    services.metrics.identify(index)
    own = settings.first_worker_port + index
    try:
        # Its own port is shared too, with its replacement only: during a rolling restart both
        # listen on it until this one drains.
        sockets = [
            listener(settings.host, settings.port, shared=True),
            listener(settings.host, own, shared=True),
        ]
    except OSError as exc:
        log.error("worker %d cannot listen on ports %d and %d: %s", index, settings.port, own, exc)
        sys.exit(STARTUP_FAILURE)

    async def readiness() -> None:
        while True:  # as /readyz: the store answers
            try:
                await services.store.ping()
            except HeraldError:
                await asyncio.sleep(0.2)
                continue
            ready.set()
            return

    checks: list[asyncio.Task[None]] = []

    def serving() -> None:
        """Tell the supervisor once this worker serves: it listens, and /readyz would say 200."""
        checks.append(asyncio.get_running_loop().create_task(readiness()))

    options = {"access_log": False, "log_config": None}
    Server(config(app, settings.host, settings.port, **options), started=serving).run(sockets)


@dataclass
class Slot:
    """One worker's place: its current process, and how quickly its last ones exited."""

    index: int
    process: SpawnProcess | None = None
    ready: Event | None = None
    started: float = 0.0
    quick_exits: int = 0
    restart_at: float | None = None
    served: bool = False  # an earlier process in this slot has served

    def has_served(self) -> bool:
        return self.served or (self.ready is not None and self.ready.is_set())


@dataclass
class Roll:
    """A rolling restart under way (SIGHUP): the settings it applies, the slots still to do (the
    first is being done), that slot's replacement until it serves, then the old worker while it
    drains."""

    settings: Settings
    pending: list[int]
    new: SpawnProcess | None = None
    ready: Event | None = None
    since: float = 0.0  # when `new` was started, then when `old` was told to drain
    old: SpawnProcess | None = None
    adopted: bool = False  # a replacement serves: restarts use `settings` from now on
    queued: bool = False  # a SIGHUP came during this one: another follows


@dataclass
class Supervisor:
    settings: Settings
    # Reads the configuration again (the file; flags and environment are the supervisor's own);
    # raises ConfigError. None: SIGHUP restarts the workers with the same settings.
    reload: Callable[[], Settings] | None = None
    slots: list[Slot] = field(default_factory=list)
    stopping: bool = False
    failed: bool = False
    hangups: int = 0  # SIGHUPs not acted on yet
    roll: Roll | None = None

    def run(self) -> int:
        """Run the workers until SIGTERM/SIGINT; the exit status (0 unless no worker could
        start)."""
        context = multiprocessing.get_context("spawn")
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        signal.signal(signal.SIGHUP, self._hang_up)
        self.slots = [Slot(i) for i in range(self.settings.workers)]
        log.info("supervising %d workers (pid %d)", self.settings.workers, os.getpid())
        for slot in self.slots:
            self._start(context, slot)
        while not self.stopping:
            self._wait(0.5)
            now = time.monotonic()
            for slot in self.slots:
                if self.stopping:
                    break
                self._reap(slot, now)
                if slot.restart_at is not None and slot.restart_at <= now:
                    self._start(context, slot)
            if not self.stopping:
                self._roll(context)
        self._drain()
        return 1 if self.failed else 0

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        if not self.stopping:
            log.info("draining the workers", extra={"signal": signal.Signals(signum).name})
        self.stopping = True

    def _hang_up(self, signum: int, frame: FrameType | None) -> None:
        self.hangups += 1  # acted on in the loop (a handler may run in the middle of a step)

    def _wait(self, timeout: float) -> None:
        sentinels = [s.process.sentinel for s in self.slots if s.process is not None]
        due = [s.restart_at for s in self.slots if s.restart_at is not None]
        if self.roll is not None:  # a replacement's readiness is an Event: poll it
            sentinels += [p.sentinel for p in (self.roll.new, self.roll.old) if p is not None]
            due.append(time.monotonic() + 0.05)
        if due:
            timeout = max(0.0, min(timeout, min(due) - time.monotonic()))
        multiprocessing.connection.wait(sentinels, timeout)

    def _spawn(
        self, context: SpawnContext, settings: Settings, index: int
    ) -> tuple[SpawnProcess, Event]:
        ready = context.Event()
        process = context.Process(
            target=work, args=(settings, index, ready, os.getpid()), name=f"herald-worker-{index}"
        )
        process.start()
        return process, ready

    def _start(self, context: SpawnContext, slot: Slot) -> None:
        slot.process, slot.ready = self._spawn(context, self.settings, slot.index)
        slot.started = time.monotonic()
        slot.restart_at = None
        pid = slot.process.pid
        log.info("worker %d started (pid %s)", slot.index, pid, extra={"worker": slot.index})

    def _roll(self, context: SpawnContext) -> None:
        """Begin a rolling restart on a SIGHUP, or take the one under way a step further."""
        if self.roll is None:
            if self.hangups:
                self.hangups = 0
                self.roll = self._begin()
            return
        roll = self.roll
        if self.hangups and not roll.queued:
            log.info("SIGHUP during a rolling restart: queued, another one follows it")
            roll.queued = True
        if roll.old is not None:
            self._retire(roll)
        elif roll.new is not None:
            self._promote(roll)
        elif roll.pending:
            index = roll.pending[0]
            roll.new, roll.ready = self._spawn(context, roll.settings, index)
            roll.since = time.monotonic()
            log.info(
                "rolling restart: worker %d's replacement started (pid %s)",
                index,
                roll.new.pid,
                extra={"worker": index},
            )
        else:
            log.info("rolling restart done: every worker runs the configuration read at SIGHUP")
            self.roll = None

    def _begin(self) -> Roll | None:
        settings = self.settings
        if self.reload is not None:
            try:
                settings = self.reload()
            except HeraldError as exc:
                log.error(
                    "SIGHUP: the configuration cannot be used; workers left as they are: %s",
                    exc.message,
                )
                return None
        changed = [n for n in FIXED if getattr(settings, n) != getattr(self.settings, n)]
        if changed:
            log.warning(
                "SIGHUP: %s cannot change in a rolling restart (restart the supervisor for that);"
                " keeping the running values",
                ", ".join(changed),
            )
            settings = dataclasses.replace(
                settings, **{n: getattr(self.settings, n) for n in FIXED}
            )
        log.info(
            "SIGHUP: configuration read again; restarting %d workers one at a time",
            len(self.slots),
        )
        return Roll(settings, [slot.index for slot in self.slots])

    def _promote(self, roll: Roll) -> None:
        """Once the replacement serves, put it in its slot and tell the old worker to drain."""
        assert roll.new is not None and roll.ready is not None
        index = roll.pending[0]
        if not roll.ready.is_set():
            if roll.new.is_alive() and time.monotonic() - roll.since < READY_SECONDS:
                return
            why = "did not serve in time" if roll.new.is_alive() else "exited"
            roll.new.kill()
            roll.new.join()
            log.error(
                "rolling restart stopped: worker %d's replacement (pid %s) %s (%s); the"
                " workers not yet replaced keep running",
                index,
                roll.new.pid,
                why,
                _describe(roll.new.exitcode),
                extra={"worker": index},
            )
            self.roll = None
            return
        slot = self.slots[index]
        old = slot.process
        slot.process, slot.ready, slot.served = roll.new, roll.ready, True
        slot.started, slot.restart_at = roll.since, None
        if not roll.adopted:
            self.settings, roll.adopted = roll.settings, True
        roll.new = roll.ready = None
        log.info(
            "rolling restart: worker %d (pid %s) serves; draining the old one (pid %s)",
            index,
            slot.process.pid,
            old.pid if old is not None else None,
            extra={"worker": index},
        )
        if old is not None and old.is_alive() and old.pid is not None:
            os.kill(old.pid, signal.SIGTERM)
            roll.old, roll.since = old, time.monotonic()
            return
        if old is not None:  # it exited before its turn came: reap it (it is in no slot now)
            old.join()
        roll.pending.pop(0)

    def _retire(self, roll: Roll) -> None:
        """Wait for the old worker to drain (killing it past DRAIN_SECONDS), then go on."""
        assert roll.old is not None
        if roll.old.is_alive():
            if time.monotonic() - roll.since < DRAIN_SECONDS:
                return
            log.error("worker (pid %s) did not drain in time; killed", roll.old.pid)
            roll.old.kill()
        roll.old.join()
        roll.old = None
        roll.pending.pop(0)

    def _reap(self, slot: Slot, now: float) -> None:
        """If the slot's worker has exited, log how and schedule its replacement."""
        process = slot.process
        if process is None or process.is_alive():
            return
        process.join()
        code = process.exitcode
        slot.served = slot.has_served()
        slot.process = None
        if not any(s.has_served() for s in self.slots):
            # No worker has ever served: the store, a port or the configuration is wrong, and
            # every restart would fail the same way (as one `herald serve` exits at once).
            log.error("worker %d failed to start (%s); stopping", slot.index, _describe(code))
            self.failed = True
            self.stopping = True
            return
        if now - slot.started >= STABLE_SECONDS:
            slot.quick_exits = 0
        else:
            slot.quick_exits += 1
        delay = 0.0
        if slot.quick_exits:
            delay = min(BACKOFF_MAX, BACKOFF_BASE * 2 ** (slot.quick_exits - 1))
        slot.restart_at = now + delay
        log.warning(
            "worker %d (pid %s) exited (%s); restarting it in %.1f s",
            slot.index,
            process.pid,
            _describe(code),
            delay,
            extra={"worker": slot.index},
        )

    def _drain(self) -> None:
        """SIGTERM every worker (each drains: docs/devices.md), wait, kill what is left."""
        running = [s.process for s in self.slots if s.process is not None]
        if self.roll is not None:  # a replacement not serving yet, an old worker draining
            running += [p for p in (self.roll.new, self.roll.old) if p is not None]
        for process in running:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + DRAIN_SECONDS
        for process in running:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.error("worker (pid %s) did not drain in time; killed", process.pid)
                process.kill()
                process.join()
        log.info("all workers have exited")


def follow(supervisor: int) -> None:
    """Drain and exit (SIGTERM) when the supervisor dies, even by SIGKILL: a worker left
    without it would hold its share of the port, unsupervised, until someone found it."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        log.warning("cannot follow the supervisor (prctl failed)")
    if os.getppid() != supervisor:  # it died before prctl
        sys.exit(0)


def _describe(code: int | None) -> str:
    if code is not None and code < 0:
        return signal.Signals(-code).name
    return f"exit code {code}"


def supervise(settings: Settings, reload: Callable[[], Settings] | None = None) -> None:
    sys.exit(Supervisor(settings, reload).run())
