-- wrk script: moderate, paced load for the soak. Arguments:
--   get_path push_path delay_ms push_every push_bytes close_every
-- Each connection waits delay_ms before each request; every push_every-th
-- request is a POST of push_bytes, every close_every-th asks for
-- "Connection: close" (so client connections are also opened and closed
-- all along). Counts every answer that is not 2xx; prints "BENCH {json}".
local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

local get_req, push_req, close_req
local pause, push_every, close_every
local n = 0

function init(args)
   non2xx = 0
   local get_path, push_path = args[1], args[2]
   pause = tonumber(args[3])
   push_every = tonumber(args[4])
   local size = tonumber(args[5])
   close_every = tonumber(args[6])
   local body = string.rep("0123456789abcdef", math.floor(size / 16))
   get_req = wrk.format("GET", get_path)
   push_req = wrk.format("POST", push_path, {["Content-Type"] = "application/x-protobuf"}, body)
   close_req = wrk.format("GET", get_path, {["Connection"] = "close"})
end

function request()
   n = n + 1
   if close_every > 0 and n % close_every == 0 then
      return close_req
   end
   if push_every > 0 and n % push_every == 0 then
      return push_req
   end
   return get_req
end

function delay()
   return pause
end

function response(status, headers, body)
   if status < 200 or status > 299 then
      non2xx = non2xx + 1
   end
end

function done(summary, latency, requests)
   local bad = 0
   for _, t in ipairs(threads) do
      bad = bad + (t:get("non2xx") or 0)
   end
   local e = summary.errors
   io.write(string.format(
      'BENCH {"requests":%d,"duration_us":%d,"bytes":%d,"non2xx":%d,' ..
      '"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d,' ..
      '"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d,"mean_us":%.1f,"max_us":%d}\n',
      summary.requests, summary.duration, summary.bytes, bad,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency:percentile(99.9), latency.mean, latency.max))
end
