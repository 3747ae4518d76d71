-- wrk script: the flood of bench.overload (--flood-driver wrk), the same behaviour as its Python
-- flood clients at a fraction of their CPU: every connection sends the same POST in a closed loop;
-- after a 503 the next request waits Retry-After times 1 to 2 at random (FLOOD_RETRY=after, what a
-- well-behaved client does) or goes at once (immediate). done() prints one RESULT line.
--   FLOOD_TOKEN=... FLOOD_BODY='{"query": ...}' FLOOD_RETRY=after wrk -c 200 -t 2 -d 15 -s overload_flood.lua URL
--
-- wrk keeps one Lua state per thread, not per connection: the pauses owed after 503s are kept in a
-- queue and taken by the next connections of the thread to send, so the number and length of the
-- pauses are the Python client's, though not always on the connection that got the 503.

local retry = os.getenv("FLOOD_RETRY") or "after"
wrk.method = "POST"
wrk.body = assert(os.getenv("FLOOD_BODY"), "FLOOD_BODY not set")
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. assert(os.getenv("FLOOD_TOKEN"), "FLOOD_TOKEN not set")

local threads = {}

function setup(thread)
  thread:set("seed", #threads + 1)
  threads[#threads + 1] = thread
end

counts = {}
local owed = {}

function init(args)
  math.randomseed(os.time() * 1000 + seed)
end

function response(status, headers, body)
  counts[status] = (counts[status] or 0) + 1
  if status == 503 and retry == "after" then
    local after = tonumber(headers["retry-after"] or headers["Retry-After"] or "1") or 1
    owed[#owed + 1] = after * 1000 * (1 + math.random())
  end
end

function delay()
  if #owed > 0 then return table.remove(owed, 1) end
  return 0
end

function done(summary, latency, requests)
  local total = {}
  for _, t in ipairs(threads) do
    for status, n in pairs(t:get("counts")) do total[status] = (total[status] or 0) + n end
  end
  local parts = {}
  for status, n in pairs(total) do parts[#parts + 1] = status .. ":" .. n end
  table.sort(parts)
  local e = summary.errors
  io.write(string.format("RESULT requests=%d p50_ms=%.2f p99_ms=%.2f socket_errors=%d statuses=%s\n",
    summary.requests, latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    e.connect + e.read + e.write + e.timeout, table.concat(parts, ",")))
end
