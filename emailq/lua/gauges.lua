-- The queue's gauges for /metrics, in one round trip and a few commands per lane and per
-- live worker, whatever the backlog: no per-minute counters (stats.lua reads 122 keys for
-- those), so a scrape every second costs Redis next to nothing.
-- ARGV[5..]: memory (1: read it), live-worker window ms, relay state key prefix, lanes
-- Returns now ms, {{lane, depth, oldest created_at or -1}...}, scheduled, in flight, dead
-- letters, stored bytes, {the breaker state each live worker published, '' if none},
-- and, when ARGV[5] is 1 (REDIS_MEMORY_HEADROOM is on), Redis's used_memory and maxmemory
-- (0: no limit) from INFO memory: what that 507 is judged by, so an alert can come before
-- it; else -1, -1 (INFO may not be granted: the README says to turn the headroom off then).
local window, relay_prefix = tonumber(ARGV[6]), ARGV[7]
local now = now_ms()
local lanes = lane_depths(8)
local states = {}
for _, worker in ipairs(redis.call('ZRANGEBYSCORE', K_WORKERS, now - window, '+inf')) do
  local raw = redis.call('GET', relay_prefix .. worker)
  local state = ''
  if raw then
    -- Published by the worker as JSON (RelayStore.publish); a state this script cannot
    -- read is reported as none rather than failing the whole scrape.
    local ok, decoded = pcall(cjson.decode, raw)
    if ok and type(decoded) == 'table' and type(decoded.state) == 'string' then
      state = decoded.state
    end
  end
  states[#states + 1] = state
end
local used, max = -1, -1
if ARGV[5] == '1' then
  local info = redis.call('INFO', 'memory')
  used = tonumber(string.match(info, '\nused_memory:(%d+)') or '0')
  max = tonumber(string.match(info, '\nmaxmemory:(%d+)') or '0')
end
return {now, lanes, redis.call('ZCARD', K_SCHEDULED), redis.call('ZCARD', K_LEASES),
        redis.call('ZCARD', K_FAILED), tonumber(redis.call('HGET', K_STORED, 'total') or '0'),
        states, used, max}
