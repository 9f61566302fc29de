-- wrk script for benchmarks/audience.py: the one-by-one baseline. POST
-- /beta/users/{recipient}/notifications with an app-only token, each recipient once, the
-- recipients split among the threads. wrk runs for its duration regardless: audience.py stops it
-- (SIGINT) once every post has committed.
--
-- wrk -s audience.lua URL -- TOKEN HOST_NAME PREFIX COUNT THREADS EXPIRATION
--   recipients are PREFIX .. n for n in 0 .. COUNT - 1 (thread t takes n = t - 1 mod THREADS)
--
-- done() prints one line "WRKJSON {...}" with the status counts gathered from every thread.

local threads = {}
local next_thread = 0

function setup(thread)
  next_thread = next_thread + 1
  thread:set("tid", next_thread)
  table.insert(threads, thread)
end

created = 0
other = 0
first_bad = ""

local auth, body, prefix, share, issued, nthreads

function init(args)
  local token, host_name, count, expiration = args[1], args[2], tonumber(args[4]), args[6]
  prefix = args[3]
  nthreads = tonumber(args[5])
  share = math.floor((count - tid) / nthreads) + 1
  issued = 0
  auth = "Bearer " .. token
  body = '{"targetHostName":"' .. host_name .. '","groupName":"sale",' ..
    '"payload":{"visualContent":{"title":"Spring sale","body":"20% off until Sunday."}},' ..
    '"expirationDateTime":"' .. expiration .. '"}'
end

function request()
  if issued >= share then  -- this thread's share is out: a cheap request until it stops
    return wrk.format("GET", "/healthz")
  end
  local n = (tid - 1) + issued * nthreads
  issued = issued + 1
  local headers = {["Authorization"] = auth, ["Content-Type"] = "application/json"}
  return wrk.format("POST", "/beta/users/" .. prefix .. n .. "/notifications", headers, body)
end

function response(status, headers, body)
  if status == 201 then
    created = created + 1
  elseif status ~= 200 then
    other = other + 1
    if first_bad == "" then first_bad = status .. " " .. string.sub(body, 1, 200) end
  end
end

function done(summary, latency, requests)
  local c, o, bad = 0, 0, ""
  for _, t in ipairs(threads) do
    c = c + t:get("created")
    o = o + t:get("other")
    if bad == "" then bad = t:get("first_bad") end
  end
  io.write(string.format('WRKJSON {"created":%d,"other":%d,"first_bad":%q}\n', c, o, bad))
end
