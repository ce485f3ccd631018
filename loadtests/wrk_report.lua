-- wrk script for the benchmark (loadtests/measure.py).
-- With WRK_TOKENS=<file> set, every request carries the next token of that file (one per line) in
-- its Authorization header, so a run spreads over thousands of distinct tokens; without it the
-- request is wrk's static one (headers from -H). Either way done() prints one machine-readable
-- line, WRK_JSON {...}, with the counts and latency percentiles in microseconds.

local token_file = os.getenv("WRK_TOKENS")
local thread_index = 0

function setup(thread)
  thread:set("thread_index", thread_index)
  thread_index = thread_index + 1
end

if token_file then
  local requests, count, position = {}, 0, 0

  function init(args)
    for line in io.lines(token_file) do
      if #line > 0 then
        count = count + 1
        requests[count] = wrk.format("GET", "/", { ["Authorization"] = "Bearer " .. line })
      end
    end
    -- Threads start at different offsets so they do not walk the pool in lockstep.
    position = (thread_index * 7919) % count
  end

  function request()
    position = position % count + 1
    return requests[position]
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"non2xx":%d,"connect_errors":%d,"read_errors":%d,' ..
    '"write_errors":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean))
end
