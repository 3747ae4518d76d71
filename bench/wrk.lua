-- wrk script: replays a requests file, one HTTP request per line, rotating
-- through the lines (i.e. across tenants) request by request. Line format
-- (tab-separated): header-name <TAB> header-value [<TAB> name <TAB> value ...]
-- <TAB> JSON body: any number of header pairs, the body last.
--   BENCH_REQUESTS_FILE=requests.tsv BENCH_PATH=/graphql wrk -s wrk.lua URL
-- A body containing {{unique}} gets a value of its own in every request
-- (BENCH_NONCE, the thread and a counter), e.g. a write that must change
-- something each time. A response counts as bad unless it is HTTP 200 without
-- a top-level "errors". done() prints one machine-readable RESULT line.
--
-- Copied from the PostGraphile peer's bench/wrk.lua. Changes: a line may carry
-- several headers (the peer's lines have exactly one and read the same here),
-- and {{unique}}.

local path = os.getenv("BENCH_PATH") or "/graphql"
local nonce = os.getenv("BENCH_NONCE") or tostring(os.time())
local UNIQUE = "{{unique}}"
local file = os.getenv("BENCH_REQUESTS_FILE")
assert(file, "BENCH_REQUESTS_FILE not set")
local lines = {}
for line in io.lines(file) do
  local fields = {}
  for field in (line .. "\t"):gmatch("([^\t]*)\t") do fields[#fields + 1] = field end
  if #fields >= 3 and #fields % 2 == 1 then
    local headers = {}
    for i = 1, #fields - 1, 2 do
      if fields[i] ~= "" then headers[#headers + 1] = { fields[i], fields[i + 1] } end
    end
    lines[#lines + 1] = { headers, fields[#fields] }
  end
end
assert(#lines > 0, "no requests in BENCH_REQUESTS_FILE")

local threads = {}
local next_id = 0

function setup(thread)
  thread:set("thread_id", next_id)
  next_id = next_id + 1
  threads[#threads + 1] = thread
end

local requests = {}
local cursor = 0
local counter = 0
bad = 0
bad_sample = ""

function init(args)
  for i, l in ipairs(lines) do
    local headers = { ["Content-Type"] = "application/json", ["Accept"] = "application/json" }
    for _, h in ipairs(l[1]) do headers[h[1]] = h[2] end
    if l[2]:find(UNIQUE, 1, true) then
      requests[i] = { headers, l[2] }  -- formatted per request, in request()
    else
      requests[i] = wrk.format("POST", path, headers, l[2])
    end
  end
  -- start threads at different points of the rotation
  cursor = (thread_id * 7919) % #requests
end

function request()
  cursor = cursor % #requests + 1
  local r = requests[cursor]
  if type(r) == "string" then return r end
  counter = counter + 1
  local body = r[2]:gsub(UNIQUE, nonce .. "-" .. thread_id .. "-" .. counter)
  return wrk.format("POST", path, r[1], body)
end

function response(status, headers, body)
  if status ~= 200 or body:find('"errors"', 1, true) then
    bad = bad + 1
    if bad_sample == "" then bad_sample = status .. " " .. body:sub(1, 200) end
  end
end

function done(summary, latency, requests_)
  local total_bad, sample = 0, ""
  for _, t in ipairs(threads) do
    total_bad = total_bad + t:get("bad")
    if sample == "" then sample = t:get("bad_sample") end
  end
  local e = summary.errors
  io.write(string.format(
    "RESULT rps=%.1f p50_ms=%.2f p90_ms=%.2f p99_ms=%.2f max_ms=%.2f mean_ms=%.2f requests=%d bad=%d socket_errors=%d duration_s=%.2f\n",
    summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000,
    latency.max / 1000, latency.mean / 1000,
    summary.requests, total_bad, e.connect + e.read + e.write + e.timeout, summary.duration / 1e6))
  if sample ~= "" then io.write("BAD_SAMPLE " .. sample:gsub("\n", " ") .. "\n") end
end
