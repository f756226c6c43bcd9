-- Move due scheduled work into its lane, put back work whose lease lapsed, then claim up
-- to COUNT ready tasks under a lease. Returns {claimed, ms until the next deadline or -1}.
-- KEYS: scheduled zset, leases zset, wake list, lanes (highest priority first)
-- ARGV: task key prefix, lane key prefix, count, lease ms, worker id, max attempts, ttl
local task_prefix, lane_prefix = ARGV[1], ARGV[2]
local count, lease_ms, worker = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local max_attempts, ttl = tonumber(ARGV[6]), tonumber(ARGV[7])
local scheduled, leases, wake = KEYS[1], KEYS[2], KEYS[3]
local now = now_ms()

-- Due retries (and later scheduled sends) join the back of their lane.
for _, id in ipairs(redis.call('ZRANGEBYSCORE', scheduled, '-inf', now, 'LIMIT', 0, 100)) do
  redis.call('ZREM', scheduled, id)
  local task = task_prefix .. id
  local lane = redis.call('HGET', task, 'lane')
  if lane and redis.call('HGET', task, 'status') == 'pending' then
    redis.call('HDEL', task, 'next_attempt_at')
    redis.call('RPUSH', lane_prefix .. lane, id)
    redis.call('LPUSH', wake, '1')
  end
end

-- A lapsed lease means its worker died or lost Redis. The interrupted attempt counts.
for _, id in ipairs(redis.call('ZRANGEBYSCORE', leases, '-inf', now, 'LIMIT', 0, 100)) do
  redis.call('ZREM', leases, id)
  local task = task_prefix .. id
  local lane = redis.call('HGET', task, 'lane')
  if lane and redis.call('HGET', task, 'status') == 'pending' then
    local attempts = tonumber(redis.call('HGET', task, 'attempts') or '0')
    redis.call('HDEL', task, 'lease')
    append_log(task, {at = now, attempt = attempts, outcome = 'lease_expired',
                      reply = 'worker stopped renewing its lease'})
    if attempts >= max_attempts then
      finish_task(task, 'failed', now, ttl,
        'lease expired on attempt ' .. attempts .. ' of ' .. max_attempts .. ' (worker lost)')
    else
      -- Front of the lane: it has waited longest.
      redis.call('LPUSH', lane_prefix .. lane, id)
      redis.call('LPUSH', wake, '1')
    end
  end
end

local claimed = {}
for i = 4, #KEYS do
  while #claimed < count do
    local id = redis.call('LPOP', KEYS[i])
    if not id then break end
    local task = task_prefix .. id
    -- Anything not pending (done, or gone) is a stale entry: never send it again.
    if redis.call('HGET', task, 'status') == 'pending' then
      local attempt = redis.call('HINCRBY', task, 'attempts', 1)
      local token = worker .. ':' .. attempt
      redis.call('HSET', task, 'lease', token, 'updated_at', now)
      redis.call('ZADD', leases, now + lease_ms, id)
      local f = redis.call('HMGET', task, 'job', 'request_id')
      claimed[#claimed + 1] = {id, token, attempt, f[1], f[2] or ''}
    end
  end
end
-- One wake token stands for one ready task; drop the ones this claim used up.
if #claimed > 0 then redis.call('LPOP', wake, #claimed) end

local next_at = -1
for _, key in ipairs({scheduled, leases}) do
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if first[2] then
    local at = tonumber(first[2])
    if next_at < 0 or at < next_at then next_at = at end
  end
end
if next_at >= 0 then next_at = math.max(0, next_at - now) end
return {claimed, next_at}
