"""Rate limits shared by every Herald process through Redis (the Redis broker's server).

The same token buckets as `herald.limits.RateLimits` (per app, then per (app, user); a request
takes one token of each), kept in Redis hashes and taken by a Lua script, so the configured
rate holds for the cluster rather than for each process. The script reads Redis's clock
(`TIME`), so machines whose clocks disagree share one notion of refill. The checks of requests
arriving together are sent as one script call (one round trip, and redis-py's per-command cost
paid once): a check alone costs about 100 us of Herald's CPU, a batch of 16 about 10 us each.

A node takes tokens *ahead*: a check that finds none held here asks its bucket for a chunk
(`chunk`: 1 % of the burst or of a second's refill, whichever is less, at least 1; while one
request's chunk is being asked, the others ask only their own token) and keeps the rest for
the next requests, for at most `HOLD_SECONDS`. Every accepted request still spent a token of
the Redis bucket, and a node holds at most a chunk less one per bucket, so over any span the
cluster accepts at most what the bucket allows plus one chunk per node (what the nodes held
when the span began), and at least what it allows less one chunk per node (tokens held unused
where no request came). A limit of 20/s (burst 20) takes one token at a time, as before; the
defaults (2,000/s per app, 20/s per user) take the app's 20 at a time, so a loaded node asks
Redis about its users only.

When Redis does not answer (down, unreachable, frozen: a call that takes over `timeout`), the
requests are checked against this process's own buckets instead (each process then allows the
configured rate: the cluster up to N times it), Redis is not asked again for `pause` seconds,
and the switch is logged once each way. Requests are never refused because Redis is down.
(One Redis server or primary: the keys of a batch span apps, so not Redis Cluster.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from herald.limits import Limiter, RateLimits, throttle

log = logging.getLogger("herald.limits")

TIMEOUT_SECONDS = 0.25  # a Redis answer slower than this: check locally
PAUSE_SECONDS = 1.0  # after a failure, how long requests are checked locally before retrying
PREFIX = "herald:rl:"
MAX_BATCH = 500  # checks per script call

# KEYS: per check, the buckets it asks tokens of: its app's (if asked) then its (app, user) pair's
# (if asked). ARGV: the app rate and burst, the user rate and burst, then per check how many
# tokens it wants of each (0: not asked; it has the token here already, or no user). A bucket is
# a hash {tokens, stamp} that expires once it would be full again. Both are written with every
# digit (%.17g): Lua's tostring keeps 14, which rounds a stamp near 1.8e9 s to 0.1 ms, and a
# batch taking from one bucket 500 times refilled it by up to 500 such roundings. A bucket
# with at least one token gives up to the number wanted (what it holds, rounded down); the
# user's is asked only if the app's gave. Returns per check 0 (allowed) or 1 (app) or 2 (user),
# the seconds until a token as text, and the tokens the app's and the user's bucket gave.
_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function take(key, rate, burst, want)
  local b = redis.call('HMGET', key, 'tokens', 'stamp')
  local tokens = tonumber(b[1]) or burst
  local stamp = tonumber(b[2]) or now
  tokens = math.min(burst, tokens + math.max(0, now - stamp) * rate)
  local got, wait = 0, 0
  if tokens >= 1 then
    got = math.min(want, math.floor(tokens))
    tokens = tokens - got
  else
    wait = (1 - tokens) / rate
  end
  local exact = '%.17g'
  redis.call('HSET', key, 'tokens', exact:format(tokens), 'stamp', exact:format(now))
  redis.call('PEXPIRE', key, math.ceil((burst - tokens) / rate * 1000) + 1000)
  return got, wait
end
local app_rate, app_burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local user_rate, user_burst = tonumber(ARGV[3]), tonumber(ARGV[4])
local out, k = {}, 1
for i = 5, #ARGV, 2 do
  local want_app, want_user = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
  local which, wait, got_app, got_user = 0, 0, 0, 0
  if want_app > 0 then
    got_app, wait = take(KEYS[k], app_rate, app_burst, want_app)
    k = k + 1
    if got_app == 0 then which = 1 end
  end
  if want_user > 0 then
    if which == 0 then
      got_user, wait = take(KEYS[k], user_rate, user_burst, want_user)
      if got_user == 0 then which = 2 end
    end
    k = k + 1
  end
  out[#out + 1] = which
  out[#out + 1] = tostring(wait)
  out[#out + 1] = got_app
  out[#out + 1] = got_user
end
return out
"""

# What a node may take of a bucket at once: 1/SHARE of its burst or of what it refills in
# HOLD_SECONDS, whichever is less, and at least one token (a limit of 20/s takes one at a time).
SHARE = 100
# Tokens taken ahead and not used within this are given up: a node holds at most a chunk less
# one per bucket, so this bounds only how long those few are kept from the other nodes.
HOLD_SECONDS = 10.0
MAX_AHEAD = 100_000  # buckets with tokens held here; past this, those run out are dropped

# (app bucket, user bucket or None, tokens wanted of each (0: not asked), the answer: which
# refused (0 none, 1 app, 2 user), seconds until a token, tokens the app's and user's gave)
Answer = tuple[int, float, int, int]
Check = tuple[str, str | None, int, int, "asyncio.Future[Answer | None]"]


class Ahead:
    """Tokens this node took from a Redis bucket and has not used yet, usable until `until`."""

    __slots__ = ("tokens", "until")

    def __init__(self, tokens: int, until: float) -> None:
        self.tokens = tokens
        self.until = until


def chunk(limiter: Limiter) -> int:
    return max(1, int(min(limiter.burst, limiter.rate * HOLD_SECONDS) / SHARE))


class ClusterRateLimits:
    """`RateCheck` with the buckets in Redis; `local` checks requests while Redis is out."""

    def __init__(
        self,
        url: str,
        local: RateLimits,
        *,
        timeout: float = TIMEOUT_SECONDS,
        pause: float = PAUSE_SECONDS,
    ) -> None:
        self.local = local
        self.timeout = timeout
        self.pause = pause
        # Never retried behind our back: a failure is answered locally at once.
        self.redis = Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )
        self.script = self.redis.register_script(_SCRIPT)
        self.rates = (local.app.rate, local.app.burst, local.user.rate, local.user.burst)
        self.chunks = (chunk(local.app), chunk(local.user))
        self.ahead: dict[str, Ahead] = {}
        self.asking: set[str] = set()  # buckets a chunk is being asked of
        self.pending: list[Check] = []
        self.flusher: asyncio.Task[None] | None = None
        self.out_until = 0.0  # monotonic time before which Redis is not asked
        self.out = False

    async def check(self, client_id: str, user_id: str | None) -> None:
        if self.out and time.monotonic() < self.out_until:
            self.local.take(client_id, user_id)
            return
        now = time.monotonic()
        app = f"{PREFIX}a:{client_id}"
        user = None if user_id is None else f"{PREFIX}u:{client_id}:{user_id}"
        had_app = self.spend(app, now)
        had_user = user is not None and self.spend(user, now)
        if had_app and (user is None or had_user):
            return  # both tokens were taken from Redis ahead
        want_app = 0 if had_app else self.want(app, self.chunks[0])
        want_user = 0 if user is None or had_user else self.want(user, self.chunks[1])
        try:
            verdict = await self.ask_later(app, user, want_app, want_user)
        finally:
            if want_app > 1:
                self.asking.discard(app)
            if user is not None and want_user > 1:
                self.asking.discard(user)
        if verdict is None:  # Redis did not answer
            self.local.take(client_id, user_id)
            return
        which, wait, got_app, got_user = verdict
        now = time.monotonic()
        # This request took one token of each bucket that gave (an app's token is spent even
        # if its user's is refused, as in `RateLimits`); the rest is kept for the next ones.
        if want_app:
            self.keep(app, got_app - 1, now)
        if user is not None and want_user:
            self.keep(user, got_user - 1, now)
        elif user is not None and which == 1:
            self.keep(user, 1, now)  # refused for the app: its user's token was not spent
        if which:
            throttle("app" if which == 1 else "user", wait)

    def want(self, key: str, chunk: int) -> int:
        """How many tokens to ask of `key`'s bucket: a chunk, or only this request's one while
        another request's chunk is being asked (a burst of requests must not each take one)."""
        if chunk == 1 or key in self.asking:
            return 1
        self.asking.add(key)
        return chunk

    async def ask_later(
        self, app: str, user: str | None, want_app: int, want_user: int
    ) -> Answer | None:
        """Queue a check for the next script call; its answer (None: Redis did not answer)."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Answer | None] = loop.create_future()
        self.pending.append((app, user, want_app, want_user, answer))
        if self.flusher is None:
            self.flusher = loop.create_task(self.flush())
        return await answer

    def spend(self, key: str, now: float) -> bool:
        """Take a token held here for `key`, if there is one."""
        ahead = self.ahead.get(key)
        if ahead is None or ahead.tokens < 1 or ahead.until <= now:
            return False
        ahead.tokens -= 1
        return True

    def keep(self, key: str, tokens: int, now: float) -> None:
        """Hold `tokens` taken from Redis for `key` for HOLD_SECONDS. Added to tokens held
        already, they share those tokens' (earlier) deadline: a token is never held longer."""
        if tokens <= 0:
            return
        ahead = self.ahead.get(key)
        if ahead is not None and ahead.until > now:
            ahead.tokens += tokens
            return
        if len(self.ahead) >= MAX_AHEAD:
            self.ahead = {k: a for k, a in self.ahead.items() if a.until > now}
        self.ahead[key] = Ahead(tokens, now + HOLD_SECONDS)

    async def flush(self) -> None:
        """Send what is pending, a batch at a time, until nothing is (checks arriving while a
        batch is out go in the next)."""
        try:
            while self.pending:
                batch = self.pending[:MAX_BATCH]
                del self.pending[:MAX_BATCH]
                verdicts = await self.ask(batch)
                for (*_, answer), verdict in zip(batch, verdicts, strict=True):
                    if not answer.done():  # (its request may have been cancelled)
                        answer.set_result(verdict)
        finally:
            self.flusher = None

    async def ask(self, batch: list[Check]) -> list[Answer | None]:
        keys: list[str] = []
        wants: list[int] = []
        for app, user, want_app, want_user, _ in batch:
            if want_app:
                keys.append(app)
            if want_user:
                assert user is not None
                keys.append(user)
            wants += (want_app, want_user)
        try:
            async with asyncio.timeout(self.timeout):
                out = await self.script(keys=keys, args=[*self.rates, *wants])
        except (RedisError, OSError, TimeoutError) as exc:
            self.went_out(exc)
            return [None] * len(batch)
        if self.out:
            self.out = False
            log.info("Redis answers again: rate limits are cluster-wide again")
        return [
            (int(out[i]), float(out[i + 1]), int(out[i + 2]), int(out[i + 3]))
            for i in range(0, len(out), 4)
        ]

    def went_out(self, exc: BaseException) -> None:
        self.out_until = time.monotonic() + self.pause
        if not self.out:
            self.out = True
            log.warning(
                "Redis does not answer: rate limits are per process until it does",
                extra={"error": repr(exc)},
            )

    async def close(self) -> None:
        if self.flusher is not None:
            self.flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.flusher
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(self.timeout):
                await self.redis.aclose()
