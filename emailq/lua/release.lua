-- Give back claimed tasks that were never started (a worker shutting down, a claim reply
-- that came too late, a mail that expired while it waited for a send slot). The attempt
-- did not happen, so it is not counted.
-- ARGV[5..]: worker id, '1' to take the worker off the live list (it is stopping) or '0',
-- then (task id, token) pairs
if ARGV[6] == '1' then redis.call('ZREM', K_WORKERS, ARGV[5]) end
local now = nil  -- read once, and only if a task is given back
local released = 0
for i = 7, #ARGV, 2 do
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
