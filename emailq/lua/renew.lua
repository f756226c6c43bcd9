-- A worker's heartbeat: record it as alive and extend the leases it still holds.
-- Returns the ids whose lease it has lost.
-- ARGV[5..]: worker id, lease ms, then (task id, token) pairs
local now = now_ms()
-- The trim first: a write that cannot grow memory, so the rest runs in a full Redis too
-- (see finish.lua). Renewals must not fail where finishes succeed: a finish's claim would
-- then put our in-flight mail back for another worker to send again.
redis.call('ZREMRANGEBYSCORE', K_WORKERS, '-inf', now - 3600 * 1000)
redis.call('ZADD', K_WORKERS, now, ARGV[5])
local lost = {}
for i = 7, #ARGV, 2 do
  local id, token = ARGV[i], ARGV[i + 1]
  -- ZADD even when the entry is gone: after a Redis outage longer than the lease the
  -- owner renews before any claim runs, and keeps the task it is still sending.
  if redis.call('HGET', TASK .. id, 'lease') == token then
    redis.call('ZADD', K_LEASES, now + tonumber(ARGV[6]), id)
  else
    lost[#lost + 1] = id
  end
end
return lost
