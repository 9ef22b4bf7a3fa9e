-- wrk script of the load tools (loadtest.processes.run_wrk runs it):
--   wrk -t1 -c8 -d3s -s loadtest/rank.lua http://127.0.0.1:8000/rank -- BODIES OFFSET
-- POSTs the JSON bodies of the file BODIES (one per line) round-robin, starting at line
-- OFFSET. Requests are formatted once in init(), so wrk spends no Lua time per request.
-- done() prints one JSON line with the latency percentiles (microseconds), the request
-- count and the error counts.

function init(args)
  local path = args[1]
  local file = assert(io.open(path, "r"))
  requests = {}
  -- What a browser page sends besides the body: an Origin and gzip accepted. They change
  -- nothing unless CORS or gzip is on (the "cors" and "gzip_min_bytes" option cells).
  local headers = {
    ["Content-Type"] = "application/json",
    ["Accept-Encoding"] = "gzip",
    ["Origin"] = "https://app.example.com",
  }
  for line in file:lines() do
    if #line > 0 then
      requests[#requests + 1] = wrk.format("POST", nil, headers, line)
    end
  end
  file:close()
  assert(#requests > 0, "no request bodies in " .. path)
  position = tonumber(args[2] or "0")
end

function request()
  local r = requests[(position % #requests) + 1]
  position = position + 1
  return r
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,'
      .. '"timeout":%d,"p50_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
