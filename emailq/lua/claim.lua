-- Move due scheduled work into its lane, put back work whose lease lapsed, then claim up
-- to COUNT ready tasks under a lease. Returns {claimed, ms until the next deadline or -1}.
-- ARGV[5..]: count, lease ms, worker id, max attempts, ttl s, fair every, lanes (high first)
local count, lease_ms, worker = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7]
local max_attempts, ttl, fair_every = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local lanes = {}
for i = 11, #ARGV do lanes[#lanes + 1] = ARGV[i] end
local now = now_ms()

-- Due retries and scheduled sends join the back of their lane.
for _, id in ipairs(redis.call('ZRANGEBYSCORE', K_SCHEDULED, '-inf', now, 'LIMIT', 0, 100)) do
  redis.call('ZREM', K_SCHEDULED, id)
  local task = TASK .. id
  local lane = redis.call('HGET', task, 'lane')
  if lane and redis.call('HGET', task, 'status') == 'pending' then
    redis.call('HDEL', task, 'next_attempt_at')
    make_ready(lane, id, false)
  end
end

-- A lapsed lease means its worker died or lost Redis. The interrupted attempt counts.
for _, id in ipairs(redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', now, 'LIMIT', 0, 100)) do
  redis.call('ZREM', K_LEASES, id)
  local task = TASK .. id
  local lane = redis.call('HGET', task, 'lane')
  if lane and redis.call('HGET', task, 'status') == 'pending' then
    local attempts = tonumber(redis.call('HGET', task, 'attempts') or '0')
    redis.call('HDEL', task, 'lease')
    append_log(task, {at = now, attempt = attempts, outcome = 'lease_expired',
                      reply = 'worker stopped renewing its lease'})
    if attempts >= max_attempts then
      finish_task(id, 'failed', now, ttl,
        'lease expired on attempt ' .. attempts .. ' of ' .. max_attempts .. ' (worker lost)')
    else
      make_ready(lane, id, true)  -- front of the lane: it has waited longest
    end
  end
end

-- Lanes are read highest first, except that every FAIR_EVERY-th pop is a fair turn that
-- starts at a lower lane, the next lower lane each turn (then the rest, lowest first):
-- under a backlog of high mail, default and low both get a share and never starve.
local function lane_order()
  local n = redis.call('INCR', K_FAIRNESS)
  if n % fair_every ~= 0 or #lanes < 2 then return lanes end
  local first = #lanes - (n / fair_every) % (#lanes - 1)
  local order = {lanes[first]}
  for i = #lanes, 1, -1 do
    if i ~= first then order[#order + 1] = lanes[i] end
  end
  return order
end

local function pop_ready()
  for _, lane in ipairs(lane_order()) do
    local id = redis.call('LPOP', LANE .. lane)
    if id then return id end
  end
  return nil
end

-- Anything not pending (done, cancelled, or gone) is a stale entry: never send it again.
-- A task past its expires_at is failed as 'expired' instead of sent.
local function take(id)
  local task = TASK .. id
  if redis.call('HGET', task, 'status') ~= 'pending' then return nil end
  local expires_at = tonumber(redis.call('HGET', task, 'expires_at') or '0')
  if expires_at > 0 and now >= expires_at then
    local attempts = tonumber(redis.call('HGET', task, 'attempts') or '0')
    append_log(task, {at = now, attempt = attempts, outcome = 'expired'})
    finish_task(id, 'failed', now, ttl, 'expired')
    return nil
  end
  local attempt = redis.call('HINCRBY', task, 'attempts', 1)
  local token = worker .. ':' .. attempt
  redis.call('HSET', task, 'lease', token, 'updated_at', now)
  redis.call('ZADD', K_LEASES, now + lease_ms, id)
  local f = redis.call('HMGET', task, 'job', 'request_id')
  return {id, token, attempt, f[1], f[2] or ''}
end

local claimed, popped = {}, 0
while #claimed < count do
  local id = pop_ready()
  if not id then break end
  popped = popped + 1
  local row = take(id)
  if row then claimed[#claimed + 1] = row end
end
-- One wake token stands for one ready task; drop the ones this claim used up.
if popped > 0 then redis.call('LPOP', K_WAKE, popped) end

local next_at = -1
for _, key in ipairs({K_SCHEDULED, K_LEASES}) do
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if first[2] then
    local at = tonumber(first[2])
    if next_at < 0 or at < next_at then next_at = at end
  end
end
if next_at >= 0 then next_at = math.max(0, next_at - now) end
return {claimed, next_at}
