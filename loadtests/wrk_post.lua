-- wrk script: POST a rotating set of files as raw request bodies, print a JSON summary at the end.
--   WRK_PATH=/classify?model=alexnet WRK_CONTENT_TYPE=image/jpeg \
--     wrk -t1 -c16 -d15s --timeout 30s -s loadtests/wrk_post.lua http://127.0.0.1:3000 -- a.jpg b.jpg ...
-- Every thread loads all files and starts at a different one, so connections don't send in lockstep.
local path = os.getenv("WRK_PATH") or "/"
local content_type = os.getenv("WRK_CONTENT_TYPE") or "application/octet-stream"
-- WRK_MULTIPART=1: each file as the multipart/form-data field "image" (what browsers and `curl -F` send)
local multipart = os.getenv("WRK_MULTIPART") == "1"
local boundary = "convnet-wrk-7f3a9c"
local requests_ = {}
local n = 0
local thread_counter = 0

function setup(thread)
  thread:set("offset", thread_counter)
  thread_counter = thread_counter + 1
end

function init(args)
  for _, name in ipairs(args) do
    local f = assert(io.open(name, "rb"))
    local body = f:read("*a")
    f:close()
    if multipart then
      body = "--" .. boundary .. "\r\nContent-Disposition: form-data; name=\"image\"; filename=\"upload\"\r\n" ..
             "Content-Type: " .. content_type .. "\r\n\r\n" .. body .. "\r\n--" .. boundary .. "--\r\n"
      requests_[#requests_ + 1] = wrk.format("POST", path,
        {["Content-Type"] = "multipart/form-data; boundary=" .. boundary}, body)
    else
      requests_[#requests_ + 1] = wrk.format("POST", path, {["Content-Type"] = content_type}, body)
    end
  end
  if #requests_ == 0 then
    requests_[1] = wrk.format("POST", path, {["Content-Type"] = content_type}, "")
  end
  n = (offset or 0) * 7
end

function request()
  n = n + 1
  return requests_[(n % #requests_) + 1]
end

-- wrk 4 corrects its latency histogram for coordinated omission before done() sees it (stats_correct: every
-- latency above twice the mean interval of a connection adds the samples that a client keeping that pace would have
-- waited for). The histogram goes out whole, so loadtests/bench.py can undo that and report both. LuaJIT's FFI reads
-- it directly (wrk's `stats`: count, limit, min, max, then a count per microsecond); `latency(i)` gives the same
-- but costs a scan per value (seconds for a wide histogram), so it is only the fallback if the layout ever differs.
local function histogram(latency)
  local values, total = {}, 0
  local ok, ffi = pcall(require, "ffi")
  if ok then
    local s = ffi.cast("uint64_t **", ffi.cast("void *", latency))[0]
    local count, min, max = tonumber(s[0]), tonumber(s[2]), tonumber(s[3])
    if min == latency.min and max == latency.max then
      for v = min, max do
        local c = tonumber(s[4 + v])
        if c > 0 then
          values[#values + 1] = v .. "," .. c
          total = total + c
        end
      end
      if total == count then
        return table.concat(values, ",")
      end
    end
  end
  values = {}
  for i = 1, #latency do
    local v, c = latency(i)
    values[#values + 1] = string.format("%d,%d", v, c)
  end
  return table.concat(values, ",")
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "bytes": %d, "errors": {"connect": %d, "read": %d, "write": %d, ' ..
    '"status": %d, "timeout": %d}, "latency_us": {"p50": %d, "p90": %d, "p99": %d, "max": %d, "mean": %.1f}, ' ..
    '"histogram": [%s]}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean,
    histogram(latency)))
end
