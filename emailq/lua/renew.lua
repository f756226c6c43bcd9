-- Extend the leases a worker still holds. Returns the ids whose lease it has lost.
-- KEYS: leases zset
-- ARGV: task key prefix, lease ms, then (task id, token) pairs
local now = now_ms()
local lost = {}
for i = 3, #ARGV, 2 do
  local id, token = ARGV[i], ARGV[i + 1]
  -- ZADD even when the entry is gone: after a Redis outage longer than the lease the
  -- owner renews before any claim runs, and keeps the task it is still sending.
  if redis.call('HGET', ARGV[1] .. id, 'lease') == token then
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), id)
  else
    lost[#lost + 1] = id
  end
end
return lost
