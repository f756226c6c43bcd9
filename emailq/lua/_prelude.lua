-- Prepended to every script by emailq.queue. Every script is called with the same shared
-- keys and prefixes first (Keys.shared_keys / Keys.shared_args in queue.py, the one place
-- key names are made); its own arguments follow from ARGV[5].
local K_SCHEDULED, K_LEASES, K_WAKE, K_FAILED, K_WORKERS, K_FAIRNESS, K_STORED, K_EVENTS =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local TASK, LANE, STATS, DONE = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
-- The event stream's cap and the command that publishes on DONE (PUBLISH, or SPUBLISH on
-- a Redis Cluster: sharded pub/sub, Redis 7.0) are the last shared arguments; taken off
-- ARGV here, so that every script's own arguments start at ARGV[5] and its '#ARGV' counts
-- only them.
local EVENTS_MAXLEN = table.remove(ARGV, 5)
local PUBLISH = table.remove(ARGV, 5)

-- Time comes from the Redis server, so leases and schedules do not depend on the
-- clocks of the API and worker machines agreeing.
-- {lane, depth, oldest created_at or -1} for each lane named in ARGV[first..]: what stats
-- and the metrics' gauges both report.
local function lane_depths(first)
  local lanes = {}
  for i = first, #ARGV do
    local key = LANE .. ARGV[i]
    local head = redis.call('LINDEX', key, 0)
    local oldest = -1
    if head then oldest = tonumber(redis.call('HGET', TASK .. head, 'created_at') or '-1') end
    lanes[#lanes + 1] = {ARGV[i], redis.call('LLEN', key), oldest}
  end
  return lanes
end

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

-- The durable event stream: every state change that matters is appended here by the script
-- that makes it, in the same atomic step, so a consumer (metrics, the dashboard, webhooks)
-- that reads it from where it left off misses nothing, unlike the 'done' pub/sub, which
-- only live waiters hear. Capped near EVENT_STREAM_MAXLEN entries ('~': whole nodes are
-- trimmed, which is cheap). Every entry has the same fields, so Redis stores their names
-- once per node. Called after the step's first write: in a Redis at maxmemory a script is
-- refused only at its first write that can grow memory (see finish.lua), so the append
-- never stops an outcome from being recorded.
-- E (optional): attempt (default: the task's count), code (SMTP), reason, worker.
local REASON_MAX = 200  -- bytes: a reason is a summary here; the task's hash has it whole

-- The first `max` bytes of `text`, cut at a character boundary: half a UTF-8 character
-- would make the entry unreadable to a client that decodes replies.
local function clip(text, max)
  if #text <= max then return text end
  local cut = max
  -- While the first byte dropped continues a character (10xxxxxx), drop that one too.
  while cut > 0 and string.byte(text, cut + 1) >= 128 and string.byte(text, cut + 1) < 192 do
    cut = cut - 1
  end
  return string.sub(text, 1, cut)
end

local function emit(kind, id, now, E)
  E = E or {}
  local f = redis.call('HMGET', TASK .. id, 'lane', 'attempts', 'request_id')
  local reason = clip(E.reason or '', REASON_MAX)
  redis.call('XADD', K_EVENTS, 'MAXLEN', '~', EVENTS_MAXLEN, '*',
    'type', kind, 'task_id', id, 'time', now, 'lane', f[1] or '',
    'attempt', E.attempt or f[2] or 0, 'code', E.code or '', 'reason', reason,
    'request_id', f[3] or '', 'worker', E.worker or '')
end

-- The worker a lease token names (tokens are '<worker id>:<attempt>', see claim_ready).
local function token_worker(token)
  return string.match(token or '', '^(.*):%d+$') or ''
end

-- Per-minute counters of finished tasks, for the stats endpoint (kept two hours).
local function count_finished(status, now)
  local key = STATS .. status .. ':' .. math.floor(now / 60000)
  redis.call('INCR', key)
  redis.call('EXPIRE', key, 7200)
end

-- Stored bytes: while a task waits to be sent (pending, scheduled, retrying, in flight) its
-- job's size is charged to the total and to its quota owner (an API key, a client address,
-- a form) in K_STORED, and kept on the task as 'bytes', so the refund is exact and happens
-- once: whichever path ends the task refunds what is recorded there, and nothing else.
local STORED_TOTAL = 'total'  -- owners are 'key:...', 'address:...', 'form:...'

local function charge(task, owner, bytes)
  redis.call('HSET', task, 'bytes', bytes)
  redis.call('HINCRBY', K_STORED, STORED_TOTAL, bytes)
  if owner and owner ~= '' then redis.call('HINCRBY', K_STORED, owner, bytes) end
end

local function refund_field(field, bytes)
  if redis.call('HINCRBY', K_STORED, field, -bytes) <= 0 then
    redis.call('HDEL', K_STORED, field)  -- an owner with nothing stored leaves no trace
  end
end

local function refund(task)
  local f = redis.call('HMGET', task, 'bytes', 'quota')
  if not f[1] then return end
  redis.call('HDEL', task, 'bytes')
  refund_field(STORED_TOTAL, tonumber(f[1]))
  if f[2] and f[2] ~= '' then refund_field(f[2], tonumber(f[1])) end
end

-- Final states keep the hash for RESULT_TTL_SECONDS; pending tasks never expire.
-- Failed tasks are indexed by time (the dead-letter list); waiters hear of every end.
-- E: the event's fields (see emit); E.type names a failure that is not a plain 'failed'
-- ('cancelled', 'expired'). A success is 'sent'.
local function finish_task(id, status, now, ttl, reason, E)
  local task = TASK .. id
  redis.call('ZREM', K_LEASES, id)
  redis.call('ZREM', K_SCHEDULED, id)
  -- A failed task keeps its job (for requeue) until it expires, but no longer counts: it
  -- cannot grow, and a key must not stay locked out by its dead letters for a week.
  refund(task)
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
  E = E or {}
  if status ~= 'success' then E.reason = reason end
  emit(status == 'success' and 'sent' or E.type or 'failed', id, now, E)
  redis.call(PUBLISH, DONE, id)
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

-- Move due scheduled work into its lane, put back work whose lease lapsed, then claim up
-- to COUNT ready tasks for WORKER under a lease. Used by claim.lua, and by finish.lua to
-- refill the slot a finished send leaves (one round trip per mail instead of two).
-- C: {count, lease_ms, worker, max_attempts, ttl, fair_every, lanes (high first)}.
-- Returns {claimed rows, ms until the next scheduled or lease deadline, or -1}.
local function claim_ready(C, now)
  local count, lease_ms, worker, lanes = C.count, C.lease_ms, C.worker, C.lanes
  local max_attempts, ttl, fair_every = C.max_attempts, C.ttl, C.fair_every
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
      emit('lease_expired', id, now, {reason = 'worker stopped renewing its lease'})
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
      finish_task(id, 'failed', now, ttl, 'expired', {type = 'expired'})
      return nil
    end
    local attempt = redis.call('HINCRBY', task, 'attempts', 1)
    local token = worker .. ':' .. attempt
    redis.call('HSET', task, 'lease', token, 'updated_at', now)
    redis.call('ZADD', K_LEASES, now + lease_ms, id)
    emit('claimed', id, now, {worker = worker})
    local f = redis.call('HMGET', task, 'job', 'request_id', 'lane')
    return {id, token, attempt, f[1], f[2] or '', f[3] or ''}
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
end

-- The claim parameters as the scripts receive them, from ARGV[first]: count, lease ms,
-- worker id, max attempts, ttl s, fair every, then the lanes (high first).
local function claim_args(first)
  local lanes = {}
  for i = first + 6, #ARGV do lanes[#lanes + 1] = ARGV[i] end
  return {count = tonumber(ARGV[first]), lease_ms = tonumber(ARGV[first + 1]),
          worker = ARGV[first + 2], max_attempts = tonumber(ARGV[first + 3]),
          ttl = tonumber(ARGV[first + 4]), fair_every = tonumber(ARGV[first + 5]),
          lanes = lanes}
end
