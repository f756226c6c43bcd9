-- Give back a claimed task whose send failed for a relay-level reason (unreachable,
-- throttling): nothing was said about the mail, so the attempt is not counted. The task's
-- outage clock starts at its first relay-level failure ('outage_since', cleared when the
-- relay next answers about the mail); once it reaches the ceiling the task fails with the
-- reason the worker gave.
-- ARGV[5..11]: task id, lease token, attempt-log entry json, reason if it fails now,
-- ceiling ms, delay ms (0: front of its lane), ttl s.
-- Returns 'deferred', 'failed', 'stale' or 'ignored' (a call run again after its reply was
-- lost answers as its first run did, and changes nothing: see own_record).
local id, token = ARGV[5], ARGV[6]
local ceiling, delay, ttl = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
local task = TASK .. id
local now = now_ms()
local status, lease, raw_log = unpack(redis.call('HMGET', task, 'status', 'lease', 'log'))
if status ~= 'pending' or lease ~= token then
  local last = own_record(raw_log, ARGV[7])
  if last then return last.outcome end  -- 'deferred', or 'failed' at the ceiling
  return status ~= 'pending' and 'ignored' or 'stale'
end
redis.call('HINCRBY', task, 'attempts', -1)
local since = tonumber(redis.call('HGET', task, 'outage_since') or '')
if not since then
  since = now
  redis.call('HSET', task, 'outage_since', now)
end
local entry = cjson.decode(ARGV[7])
entry['at'] = now
redis.call('ZREM', K_LEASES, id)
redis.call('HDEL', task, 'lease')
local event = {attempt = entry['attempt'], code = entry['code'], reason = entry['reply'],
               worker = token_worker(token)}
if now - since >= ceiling then
  entry['outcome'] = 'failed'
  append_log(task, entry)
  finish_task(id, 'failed', now, ttl, ARGV[8], event)
  return 'failed'
end
append_log(task, entry)
emit('deferred', id, now, event)
redis.call('HSET', task, 'updated_at', now)
if delay > 0 then
  redis.call('HSET', task, 'next_attempt_at', now + delay)
  redis.call('ZADD', K_SCHEDULED, now + delay, id)
  nudge()
else
  make_ready(redis.call('HGET', task, 'lane'), id, true)  -- it has waited longest
end
return 'deferred'
