-- Prepended to every script by emailq.queue: helpers shared by all of them.
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

-- Final states keep the hash for RESULT_TTL_SECONDS; pending tasks never expire.
local function finish_task(task, status, now, ttl, reason)
  if status == 'success' then
    redis.call('HSET', task, 'status', 'success', 'sent_at', now, 'updated_at', now)
    -- Content is not kept once delivered: it is no longer needed, and it is private.
    redis.call('HDEL', task, 'job', 'reason', 'lease', 'next_attempt_at')
  else
    redis.call('HSET', task, 'status', 'failed', 'reason', reason, 'updated_at', now)
    redis.call('HDEL', task, 'lease', 'next_attempt_at')
  end
  redis.call('EXPIRE', task, ttl)
end
