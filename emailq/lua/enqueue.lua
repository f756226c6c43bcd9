-- Store a task and make it ready (or schedule it) in one atomic step: 202 means stored.
-- ARGV[5..]: task id, lane, to, job json, request id, send_at ms (0: now), expires_at ms (0: never)
local id, lane, send_at, expires_at = ARGV[5], ARGV[6], tonumber(ARGV[10]), tonumber(ARGV[11])
-- ARGV[12..14]: idempotency record key ('' for none), request fingerprint, record TTL (s).
-- A key seen before stores nothing and answers {its task id, 1 if the fingerprint matches}.
local idem, fingerprint = ARGV[12], ARGV[13]
if idem ~= '' then
  local seen = redis.call('HMGET', idem, 'task_id', 'fingerprint')
  if seen[1] then return {seen[1], seen[2] == fingerprint and 1 or 0} end
end
local task = TASK .. id
local now = now_ms()
if idem ~= '' then
  redis.call('HSET', idem, 'task_id', id, 'fingerprint', fingerprint, 'created', now)
  redis.call('EXPIRE', idem, tonumber(ARGV[14]))
end
redis.call('HSET', task,
  'status', 'pending', 'to', ARGV[7], 'attempts', 0, 'lane', lane,
  'job', ARGV[8], 'request_id', ARGV[9], 'created_at', now, 'updated_at', now)
-- ARGV[15]: id of the API key that created the task ('' when keys are not configured).
if ARGV[15] ~= '' then redis.call('HSET', task, 'key_id', ARGV[15]) end
if expires_at > 0 then redis.call('HSET', task, 'expires_at', expires_at) end
if send_at > now then
  redis.call('HSET', task, 'scheduled_at', send_at)
  redis.call('ZADD', K_SCHEDULED, send_at, id)
  nudge()
else
  make_ready(lane, id, false)
end
return now
