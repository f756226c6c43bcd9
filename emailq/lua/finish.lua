-- Record the outcome of one attempt: success, retry (scheduled after a delay) or failed.
-- KEYS: task hash, leases zset, scheduled zset, wake list
-- ARGV: task id, lease token, outcome, attempt-log entry json, reason, retry delay ms, ttl
local task, id, token, outcome = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
if redis.call('HGET', task, 'status') ~= 'pending' then return 'ignored' end
-- A worker whose lease lapsed may not decide a retry or a failure any more: the task is
-- someone else's now. A late *success* still counts: recording it keeps the task from
-- being sent again by whoever claims it next.
if redis.call('HGET', task, 'lease') ~= token and outcome ~= 'success' then return 'stale' end
local now = now_ms()
local entry = cjson.decode(ARGV[4])
entry['at'] = now
append_log(task, entry)
redis.call('ZREM', KEYS[2], id)
if outcome == 'retry' then
  local due = now + tonumber(ARGV[6])
  redis.call('HDEL', task, 'lease')
  redis.call('HSET', task, 'updated_at', now, 'next_attempt_at', due)
  redis.call('ZADD', KEYS[3], due, id)
  -- A blocked claimer chose its sleep before this retry existed: wake it so it reads the
  -- new due time, or it oversleeps the backoff. An empty list means a claimer may be
  -- blocked; a non-empty one means none is, and one token is enough for the next.
  if redis.call('LLEN', KEYS[4]) == 0 then redis.call('LPUSH', KEYS[4], '1') end
  return 'retry'
end
redis.call('ZREM', KEYS[3], id)
finish_task(task, outcome, now, tonumber(ARGV[7]), ARGV[5])
return outcome
