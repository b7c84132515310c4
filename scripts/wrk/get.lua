-- Issue 13's get-by-id load for wrk: GET /api/v1/endpoints/<prefix>-<i>, i random in
-- 0..count-1 (endpoints the caller registered first, e.g. scripts/wrk-issue13.sh through
-- the batch API).
--   wrk -t2 -c64 -d10s --latency -s scripts/wrk/get.lua http://127.0.0.1:8080 -- g 10000
local threads = 0

function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

function init(args)
  prefix = args[1] or "g"
  count = tonumber(args[2] or "10000")
  math.randomseed(os.time() + tid * 7919)
end

function request()
  return wrk.format("GET", "/api/v1/endpoints/" .. prefix .. "-" .. math.random(0, count - 1))
end
