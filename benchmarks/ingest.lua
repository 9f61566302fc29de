-- wrk script for benchmarks/ingest.py: POST /beta/me/notifications with a valid notification,
-- a unique appNotificationId per request, rotating among pre-minted bearer tokens.
--
-- wrk -s ingest.lua URL -- TOKENS_FILE HOST_NAME PHASE EXPIRATION [keys]
--   TOKENS_FILE  one bearer token per line (one user each)
--   HOST_NAME    the app's registered host name (targetHostName)
--   PHASE        a tag that keeps ids unique across runs on the same store (e.g. "w", "m")
--   EXPIRATION   expirationDateTime to send (ISO 8601 UTC)
--   keys         if given, every request carries a unique Idempotency-Key
--
-- done() prints one line "WRKJSON {...}" with throughput, latency percentiles and per-status
-- counts gathered from every thread.

local threads = {}
local next_thread = 0

function setup(thread)
  next_thread = next_thread + 1
  thread:set("tid", next_thread)
  table.insert(threads, thread)
end

-- Per-thread state (each wrk thread has its own Lua state). Globals are read back by done().
sent = 0      -- requests generated (= written; one in flight per connection)
received = 0  -- responses seen
created = 0   -- 201s
other = 0     -- anything else
first_bad = ""

local prefixes = {}
local ntokens = 0
local body_head, body_tail
local key_head = nil

function init(args)
  local path, host_name, phase, expiration = args[1], args[2], args[3], args[4]
  if args[5] == "keys" then
    key_head = "Idempotency-Key: bench-" .. phase .. "-" .. tid .. "-"
  end
  local host = wrk.host .. ":" .. wrk.port
  for token in io.lines(path) do
    if token ~= "" then
      ntokens = ntokens + 1
      prefixes[ntokens] = "POST /beta/me/notifications HTTP/1.1\r\nHost: " .. host ..
        "\r\nAuthorization: Bearer " .. token ..
        "\r\nContent-Type: application/json\r\n"
    end
  end
  assert(ntokens > 0, "no tokens in " .. path)
  body_head = '{"targetHostName":"' .. host_name .. '","appNotificationId":"bench-' ..
    phase .. "-" .. tid .. "-"
  body_tail = '","groupName":"builds","payload":{"visualContent":{"title":"Build 4711 passed",' ..
    '"body":"All 1,024 tests passed on main in 3m 12s."}},' ..
    '"targetPolicy":{"platformTypes":["windows","iOS","android","webPush"]},' ..
    '"priority":"High","displayTimeToLive":"60","expirationDateTime":"' .. expiration .. '"}'
end

function request()
  sent = sent + 1
  local body = body_head .. sent .. body_tail
  local key = key_head and (key_head .. sent .. "\r\n") or ""
  -- threads start at different tokens so users are spread evenly
  return prefixes[(sent + tid * 7919) % ntokens + 1] .. key .. "Content-Length: " .. #body ..
    "\r\n\r\n" .. body
end

function response(status, headers, body)
  received = received + 1
  if status == 201 then
    created = created + 1
  else
    other = other + 1
    if first_bad == "" then
      first_bad = status .. " " .. string.sub(body or "", 1, 300)
    end
  end
end

local function quote(s)
  return '"' .. string.gsub(s, '[%c"\\]', function(c)
    return string.format("\\u%04x", string.byte(c))
  end) .. '"'
end

function done(summary, latency, requests)
  local t = {sent = 0, received = 0, created = 0, other = 0}
  local bad = ""
  for _, thread in ipairs(threads) do
    for k, _ in pairs(t) do
      t[k] = t[k] + (thread:get(k) or 0)
    end
    local b = thread:get("first_bad")
    if bad == "" and b ~= nil then bad = b end
  end
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {\"duration_us\":%d,\"requests\":%d,\"bytes\":%d," ..
    "\"errors\":{\"connect\":%d,\"read\":%d,\"write\":%d,\"status\":%d,\"timeout\":%d}," ..
    "\"latency_us\":{\"mean\":%.1f,\"stdev\":%.1f,\"max\":%d,\"p50\":%d,\"p90\":%d," ..
    "\"p99\":%d,\"p999\":%d}," ..
    "\"sent\":%d,\"received\":%d,\"created\":%d,\"other\":%d,\"first_bad\":%s}\n",
    summary.duration, summary.requests, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.stdev, latency.max, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9),
    t.sent, t.received, t.created, t.other, quote(bad)))
end
