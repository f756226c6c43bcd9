-- Store a task and make it ready (or schedule it) in one atomic step: 202 means stored.
-- ARGV[5..]: task id, lane, to, job json, request id, send_at ms (0: now), expires_at ms (0: never)
local id, lane, send_at, expires_at = ARGV[5], ARGV[6], tonumber(ARGV[10]), tonumber(ARGV[11])
local task = TASK .. id
local now = now_ms()
redis.call('HSET', task,
  'status', 'pending', 'to', ARGV[7], 'attempts', 0, 'lane', lane,
  'job', ARGV[8], 'request_id', ARGV[9], 'created_at', now, 'updated_at', now)
if expires_at > 0 then redis.call('HSET', task, 'expires_at', expires_at) end
if send_at > now then
  redis.call('HSET', task, 'scheduled_at', send_at)
  redis.call('ZADD', K_SCHEDULED, send_at, id)
  nudge()
else
  make_ready(lane, id, false)
end
return now
