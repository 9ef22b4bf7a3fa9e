-- wrk script of the benchmark (loadtest/bench.py runs it):
--   wrk -t1 -c8 -d3s -s loadtest/rank.lua http://127.0.0.1:8000/rank -- BODIES OFFSET THREADS
-- POSTs the JSON bodies of the file BODIES (one per line) round-robin, starting at line
-- OFFSET; with THREADS wrk threads (the -t value) each takes every THREADS-th body. Requests are formatted
-- once in init(), so wrk spends no Lua time per request. done() prints one JSON line
-- with the latency percentiles (microseconds), request count and error counts.

local thread_count = 0

function setup(thread)
  thread:set("tid", thread_count)
  thread_count = thread_count + 1
end

function init(args)
  local path = args[1]
  local offset = tonumber(args[2] or "0")
  local file = assert(io.open(path, "r"))
  requests = {}
  local headers = { ["Content-Type"] = "application/json" }
  for line in file:lines() do
    if #line > 0 then
      requests[#requests + 1] = wrk.format("POST", nil, headers, line)
    end
  end
  file:close()
  assert(#requests > 0, "no request bodies in " .. path)
  stride = tonumber(args[3] or "1")
  position = offset + (tid or 0)
end

function request()
  local r = requests[(position % #requests) + 1]
  position = position + stride
  return r
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,'
      .. '"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d,'
      .. '"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), latency.max, latency.mean))
end
