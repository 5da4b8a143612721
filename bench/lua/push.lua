-- wrk script: POSTs of a remote-write-sized body (size in bytes = first
-- script argument) to the URL's path, counting every answer that is not 2xx.
-- Prints one "BENCH {json}" line at the end.
local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   non2xx = 0
   local size = tonumber(args[1] or "1048576")
   wrk.method = "POST"
   -- Not compressible-looking data matters nothing to a proxy; size does.
   wrk.body = string.rep("0123456789abcdef", math.floor(size / 16)) .. string.rep("x", size % 16)
   wrk.headers["Content-Type"] = "application/x-protobuf"
   wrk.headers["Content-Encoding"] = "snappy"
   wrk.headers["X-Prometheus-Remote-Write-Version"] = "0.1.0"
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
