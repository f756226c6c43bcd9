-- Give back claimed tasks that were never started (worker shutting down). The attempt
-- did not happen, so it is not counted.
-- KEYS: leases zset, wake list
-- ARGV: task key prefix, lane key prefix, then (task id, token) pairs
local released = 0
for i = 3, #ARGV, 2 do
  local id, token = ARGV[i], ARGV[i + 1]
  local task = ARGV[1] .. id
  if redis.call('HGET', task, 'lease') == token then
    redis.call('HINCRBY', task, 'attempts', -1)
    redis.call('HDEL', task, 'lease')
    redis.call('ZREM', KEYS[1], id)
    redis.call('LPUSH', ARGV[2] .. redis.call('HGET', task, 'lane'), id)
    redis.call('LPUSH', KEYS[2], '1')
    released = released + 1
  end
end
return released
