-- Issue 13's registration load for wrk: POST /api/v1/endpoints with a unique endpoint ID
-- per request and the five-key metadata mix of epr-bench (crates/epr-bench/src/keymix.rs):
-- city c0..c39, level 0..49, kind (7 values), on (boolean), fw 1.0.0..1.12.0. Same keys and
-- cardinalities; the values are drawn with math.random (LuaJIT has no 64-bit integers for
-- the bench's splitmix64), so a wrk run and an epr-bench run do not register the same
-- endpoints.
--   wrk -t2 -c64 -d10s --latency -s scripts/wrk/register.lua http://127.0.0.1:8080 -- mix-v1
-- The argument is the application version (default mix-v1). IDs are
-- w-<WRK_RUN or the start time>-<thread>-<n>: unique per thread, and a thread's
-- connections share its counter.
local kinds = { "sensor", "gateway", "meter", "camera", "lock", "thermostat", "tracker" }
local threads = 0

function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

function init(args)
  version = args[1] or "mix-v1"
  run = os.getenv("WRK_RUN") or tostring(os.time())
  n = 0
  math.randomseed(os.time() + tid * 7919)
  wrk.method = "POST"
  wrk.path = "/api/v1/endpoints"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  n = n + 1
  local body = string.format(
    '{"endpointId":"w-%s-%d-%d","appVersion":{"name":"%s"},'
      .. '"metadata":{"city":"c%d","level":%d,"kind":"%s","on":%s,"fw":"1.%d.0"}}',
    run, tid, n, version,
    math.random(0, 39), math.random(0, 49), kinds[math.random(1, 7)],
    math.random(0, 1) == 1 and "true" or "false", math.random(0, 12))
  return wrk.format(nil, nil, nil, body)
end
