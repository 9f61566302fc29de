"""Rate limits shared by every Herald process through Redis (the Redis broker's server).

The same token buckets as `herald.limits.RateLimits` (per app, then per (app, user); a request
takes one token of each), kept in Redis hashes and taken by a Lua script, so the configured
rate holds for the cluster rather than for each process. The script reads Redis's clock
(`TIME`), so machines whose clocks disagree share one notion of refill. The checks of requests
arriving together are sent as one script call (one round trip, and redis-py's per-command cost
paid once): a check alone costs about 100 us of Herald's CPU, a batch of 16 about 10 us each.

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

from herald.limits import RateLimits, throttle

log = logging.getLogger("herald.limits")

TIMEOUT_SECONDS = 0.25  # a Redis answer slower than this: check locally
PAUSE_SECONDS = 1.0  # after a failure, how long requests are checked locally before retrying
PREFIX = "herald:rl:"
MAX_BATCH = 500  # checks per script call

# KEYS: per check, its app's bucket then (if it has one) its (app, user) pair's; ARGV: the app
# rate and burst, the user rate and burst, then per check how many keys it has (1 or 2). A
# bucket is a hash {tokens, stamp} that expires once it would be full again. Returns per check
# 0 (allowed) or 1 (app) or 2 (user), then the seconds until a token as text.
_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function take(key, rate, burst)
  local b = redis.call('HMGET', key, 'tokens', 'stamp')
  local tokens = tonumber(b[1]) or burst
  local stamp = tonumber(b[2]) or now
  tokens = math.min(burst, tokens + math.max(0, now - stamp) * rate)
  local wait = 0
  if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
  redis.call('HSET', key, 'tokens', tostring(tokens), 'stamp', tostring(now))
  redis.call('PEXPIRE', key, math.ceil((burst - tokens) / rate * 1000) + 1000)
  return wait
end
local app_rate, app_burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local user_rate, user_burst = tonumber(ARGV[3]), tonumber(ARGV[4])
local out, k = {}, 1
for i = 5, #ARGV do
  local n = tonumber(ARGV[i])
  local which, wait = 0, take(KEYS[k], app_rate, app_burst)
  if wait > 0 then
    which = 1
  elseif n > 1 then
    wait = take(KEYS[k + 1], user_rate, user_burst)
    if wait > 0 then which = 2 end
  end
  out[#out + 1] = which
  out[#out + 1] = tostring(wait)
  k = k + n
end
return out
"""

Check = tuple[str, str | None, "asyncio.Future[tuple[int, float] | None]"]


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
        self.pending: list[Check] = []
        self.flusher: asyncio.Task[None] | None = None
        self.out_until = 0.0  # monotonic time before which Redis is not asked
        self.out = False

    async def check(self, client_id: str, user_id: str | None) -> None:
        if self.out and time.monotonic() < self.out_until:
            self.local.take(client_id, user_id)
            return
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[tuple[int, float] | None] = loop.create_future()
        self.pending.append((client_id, user_id, answer))
        if self.flusher is None:
            self.flusher = loop.create_task(self.flush())
        verdict = await answer
        if verdict is None:  # Redis did not answer
            self.local.take(client_id, user_id)
        elif verdict[0]:
            throttle("app" if verdict[0] == 1 else "user", verdict[1])

    async def flush(self) -> None:
        """Send what is pending, a batch at a time, until nothing is (checks arriving while a
        batch is out go in the next)."""
        try:
            while self.pending:
                batch = self.pending[:MAX_BATCH]
                del self.pending[:MAX_BATCH]
                verdicts = await self.ask(batch)
                for (_, _, answer), verdict in zip(batch, verdicts, strict=True):
                    if not answer.done():  # (its request may have been cancelled)
                        answer.set_result(verdict)
        finally:
            self.flusher = None

    async def ask(self, batch: list[Check]) -> list[tuple[int, float] | None]:
        keys: list[str] = []
        counts: list[int] = []
        for client_id, user_id, _ in batch:
            keys.append(f"{PREFIX}a:{client_id}")
            if user_id is not None:
                keys.append(f"{PREFIX}u:{client_id}:{user_id}")
            counts.append(1 if user_id is None else 2)
        try:
            async with asyncio.timeout(self.timeout):
                out = await self.script(keys=keys, args=[*self.rates, *counts])
        except (RedisError, OSError, TimeoutError) as exc:
            self.went_out(exc)
            return [None] * len(batch)
        if self.out:
            self.out = False
            log.info("Redis answers again: rate limits are cluster-wide again")
        return [(int(out[i]), float(out[i + 1])) for i in range(0, len(out), 2)]

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
