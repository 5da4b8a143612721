-- wrk script of every workload. Arguments (all optional):
--   push_bytes push_every close_every delay_ms push_path
-- With push_every 0 the requests are GETs of the URL; with 1, POSTs of
-- push_bytes to it (both built once by wrk, as without a script). Otherwise
-- (the soak) every push_every-th request is a POST to push_path, every
-- close_every-th asks for "Connection: close", each connection waits delay_ms
-- before each request. Counts non-2xx answers; prints one "BENCH {json}" line.
local threads, n = {}, 0
local get_req, push_req, close_req, push_every, close_every, pause

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   non2xx = 0
   local size = tonumber(args[1] or "0")
   push_every, close_every = tonumber(args[2] or "0"), tonumber(args[3] or "0")
   pause = tonumber(args[4] or "0")
   local body = string.rep("0123456789abcdef", math.floor(size / 16)) .. string.rep("x", size % 16)
   local push_headers = {["Content-Type"] = "application/x-protobuf", ["Content-Encoding"] = "snappy"}
   if push_every == 1 then
      wrk.method, wrk.body = "POST", body
      for k, v in pairs(push_headers) do wrk.headers[k] = v end
   end
   if push_every <= 1 and close_every == 0 and pause == 0 then
      request, delay = nil, nil  -- static: wrk builds the request once
      return
   end
   get_req = wrk.format("GET", wrk.path)
   push_req = wrk.format("POST", args[5], push_headers, body)
   close_req = wrk.format("GET", wrk.path, {["Connection"] = "close"})
end

function request()
   n = n + 1
   if close_every > 0 and n % close_every == 0 then return close_req end
   if push_every > 0 and n % push_every == 0 then return push_req end
   return get_req
end

function delay()
   return pause
end

function response(status, headers, body)
   if status < 200 or status > 299 then non2xx = non2xx + 1 end
end

function done(summary, latency, requests)
   local bad, e = 0, summary.errors
   for _, t in ipairs(threads) do bad = bad + (t:get("non2xx") or 0) end
   io.write(string.format('BENCH {"requests":%d,"duration_us":%d,"non2xx":%d,"socket_errors":%d,' ..
      '"p50_us":%d,"p90_us":%d,"p99_us":%d}\n', summary.requests, summary.duration, bad,
      e.connect + e.read + e.write + e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
