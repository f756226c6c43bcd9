-- Give back claimed tasks that were never started (worker shutting down). The attempt
-- did not happen, so it is not counted. Also takes the worker off the live list.
-- ARGV[5..]: worker id, then (task id, token) pairs
redis.call('ZREM', K_WORKERS, ARGV[5])
local now = nil  -- read once, and only if a task is given back
local released = 0
for i = 6, #ARGV, 2 do
  local id, token = ARGV[i], ARGV[i + 1]
  local task = TASK .. id
  if redis.call('HGET', task, 'lease') == token then
    redis.call('HINCRBY', task, 'attempts', -1)
    redis.call('HDEL', task, 'lease')
    redis.call('ZREM', K_LEASES, id)
    make_ready(redis.call('HGET', task, 'lane'), id, true)
    now = now or now_ms()
    emit('released', id, now, {worker = ARGV[5]})
    released = released + 1
  end
end
return released
