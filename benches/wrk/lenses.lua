-- wrk script: lens reads over the pairs `stemedb bench query` loads
-- (tag "q", 100,000 pairs), a random pair and lens per request. It is the
-- cross-check of `bench query` with a client written in C:
--   wrk -t1 -c64 -d12s --latency -s benches/wrk/lenses.lua http://127.0.0.1:18180
local lenses = {"recency", "confidence", "authority", "consensus", "skeptic", "layered"}
math.randomseed(os.time())
request = function()
  local i = math.random(0, 99999)
  local lens = lenses[math.random(1, #lenses)]
  return wrk.format("GET", "/v1/lenses/" .. lens .. "?subject=bench:q:entity-" .. i .. "&predicate=max_daily_dose_mg")
end
