-- Prepended to every script by emailq.queue. Every script is called with the same shared
-- keys and prefixes first (Keys.shared_keys / Keys.shared_args in queue.py, the one place
-- key names are made); its own arguments follow from ARGV[5].
local K_SCHEDULED, K_LEASES, K_WAKE, K_FAILED, K_WORKERS, K_FAIRNESS =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local TASK, LANE, STATS, DONE = ARGV[1], ARGV[2], ARGV[3], ARGV[4]

-- Time comes from the Redis server, so leases and schedules do not depend on the
-- clocks of the API and worker machines agreeing.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The attempt log is a JSON array inside the task hash; keep the newest 50 entries.
local function append_log(task, entry)
  local raw = redis.call('HGET', task, 'log')
  local log = {}
  if raw then log = cjson.decode(raw) end
  log[#log + 1] = entry
  while #log > 50 do table.remove(log, 1) end
  redis.call('HSET', task, 'log', cjson.encode(log))
end

-- Per-minute counters of finished tasks, for the stats endpoint (kept two hours).
local function count_finished(status, now)
  local key = STATS .. status .. ':' .. math.floor(now / 60000)
  redis.call('INCR', key)
  redis.call('EXPIRE', key, 7200)
end

-- Final states keep the hash for RESULT_TTL_SECONDS; pending tasks never expire.
-- Failed tasks are indexed by time (the dead-letter list); waiters hear of every end.
local function finish_task(id, status, now, ttl, reason)
  local task = TASK .. id
  redis.call('ZREM', K_LEASES, id)
  redis.call('ZREM', K_SCHEDULED, id)
  if status == 'success' then
    redis.call('HSET', task, 'status', 'success', 'sent_at', now, 'updated_at', now)
    -- Content is not kept once delivered: it is no longer needed, and it is private.
    redis.call('HDEL', task, 'job', 'reason', 'lease', 'next_attempt_at')
  else
    redis.call('HSET', task, 'status', 'failed', 'reason', reason, 'updated_at', now)
    redis.call('HDEL', task, 'lease', 'next_attempt_at')
    redis.call('ZADD', K_FAILED, now, id)
    redis.call('ZREMRANGEBYSCORE', K_FAILED, '-inf', now - ttl * 1000)
  end
  redis.call('EXPIRE', task, ttl)
  count_finished(status, now)
  redis.call('PUBLISH', DONE, id)
end

-- One wake token per ready task; a blocked worker needs one to notice new work.
local function make_ready(lane, id, front)
  redis.call(front and 'LPUSH' or 'RPUSH', LANE .. lane, id)
  redis.call('LPUSH', K_WAKE, '1')
end

-- A blocked worker chose its sleep before this deadline existed: wake one so it reads the
-- new earliest deadline. An empty wake list means a worker may be blocked; a non-empty
-- one means none is, and the next claim reads the deadline anyway.
local function nudge()
  if redis.call('LLEN', K_WAKE) == 0 then redis.call('LPUSH', K_WAKE, '1') end
end
