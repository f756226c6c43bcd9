-- Queue statistics in one round trip.
-- ARGV[5..]: live-worker window ms, relay state key prefix, lanes
-- Returns {{lane, depth, oldest created_at or -1}...}, scheduled, in flight, live workers,
-- failed (indexed), now ms, {sent, failed} per clock minute for the last 61 (newest first),
-- the relay state JSON each live worker published.
local window, relay_prefix = tonumber(ARGV[5]), ARGV[6]
local now = now_ms()
local lanes = lane_depths(7)
local minute = math.floor(now / 60000)
local sent, failed = {}, {}
for m = 0, 60 do
  sent[#sent + 1] = tonumber(redis.call('GET', STATS .. 'success:' .. (minute - m)) or '0')
  failed[#failed + 1] = tonumber(redis.call('GET', STATS .. 'failed:' .. (minute - m)) or '0')
end
local relay = {}
for _, worker in ipairs(redis.call('ZRANGEBYSCORE', K_WORKERS, now - window, '+inf')) do
  local state = redis.call('GET', relay_prefix .. worker)
  if state then relay[#relay + 1] = state end
end
return {lanes, redis.call('ZCARD', K_SCHEDULED), redis.call('ZCARD', K_LEASES),
        redis.call('ZCOUNT', K_WORKERS, now - window, '+inf'), redis.call('ZCARD', K_FAILED),
        now, sent, failed, relay}
