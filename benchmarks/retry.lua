-- wrk script: POST a retry for a different task on each request.
--
--   wrk -s retry.lua URL -- PATH_TEMPLATE FIRST COUNT TOKEN [IDS_FILE]
--
-- PATH_TEMPLATE holds "%s" for the task id. The ids are "t0000000" .. (the
-- library's benchmark servers) or, with IDS_FILE, that file's lines. The ids
-- FIRST .. FIRST+COUNT-1 (0-based) are used once each and the wrk thread
-- stops when they run out, so every request retries a task that is still
-- blocked. done() prints one JSON line with the figures the benchmark reads.

local template, first, count, token
local ids = nil
local n = 0

function init(args)
  template = args[1]
  first = tonumber(args[2])
  count = tonumber(args[3])
  token = args[4]
  if args[5] then
    ids = {}
    for line in io.lines(args[5]) do
      ids[#ids + 1] = line
    end
  end
  wrk.method = "POST"
  wrk.headers["Authorization"] = "Bearer " .. token
  wrk.headers["Content-Type"] = "application/json"
  wrk.body = ""
end

function request()
  if n >= count then
    wrk.thread:stop()
  end
  local i = first + (n % count)
  n = n + 1
  local id = ids and ids[i + 1] or string.format("t%07d", i)
  return wrk.format(nil, string.format(template, id))
end

function done(summary, latency, requests)
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "non2xx": %d, "errors": %d, ' ..
    '"p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean))
end
