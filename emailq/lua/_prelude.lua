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

-- A number as a Redis argument: its text when it is whole. Given a Lua number, redis.call
-- formats it with '%.17g' (and '..' with '%.14g'), which for a double costs libc a few
-- thousand instructions: the twenty or so per mail were a tenth of Redis's own CPU. '%d'
-- costs a small part of that, and each value (the time, an attempt count) is formatted once
-- a call and then looked up. Anything else is returned as it is.
local number_texts, format = {}, string.format
local function num(v)
  local text = number_texts[v]
  if text then return text end
  if type(v) ~= 'number' or v % 1 ~= 0 or v >= 2 ^ 53 or v <= -2 ^ 53 then return v end
  text = format('%d', v)
  number_texts[v] = text
  return text
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- A task's fields by name (false where missing), read in one HMGET: in the hot paths a
-- redis.call's own cost (its arguments and reply converted between Lua and RESP, and a
-- write's propagation) is several times a hash field read's, so each step reads its task
-- once and writes each key as few times as it can.
local function fields(task, names)
  local values = redis.call('HMGET', task, unpack(names))
  local f = {}
  for i, name in ipairs(names) do f[name] = values[i] end
  return f
end

-- The attempt log is a JSON array inside the task hash; keep the newest 50 entries.
-- Returns the JSON of the log `raw` (the field as read; false or nil: none yet) with `entry`
-- appended.
local function log_with(raw, entry)
  local log = {}
  if raw then log = cjson.decode(raw) end
  log[#log + 1] = entry
  while #log > 50 do table.remove(log, 1) end
  return cjson.encode(log)
end

local function append_log(task, entry)
  redis.call('HSET', task, 'log', log_with(redis.call('HGET', task, 'log'), entry))
end

-- A call run twice: a worker whose finish or defer call timed out, or lost its connection,
-- after Redis had run it sends it again, and the first run has already recorded the attempt
-- and dropped the lease. Returns the log's last entry (`raw`, as read) if it is the one
-- `entry_json` (as the worker sent it) records: the same attempt, code, reply and duration,
-- measured by that worker (to 0.01 ms, worker/loop.py, which cjson's 14 digits keep
-- exactly). Anything recorded since (a lapsed lease, the next attempt) would be last
-- instead. Two workers holding the same attempt (a failover lost the first one's claim)
-- whose entries also tie in code, reply and duration would be taken for one: that second
-- copy then goes unwarned (its Message-ID still tells). finish.lua reads the log for this
-- only on the paths that refuse a call, never on the busy one.
local function own_record(raw, entry_json)
  if not raw then return nil end
  local log, ours = cjson.decode(raw), cjson.decode(entry_json)
  local last = log[#log]
  if last and last.attempt == ours.attempt and last.code == ours.code
      and last.reply == ours.reply and last.duration_ms == ours.duration_ms then
    return last
  end
  return nil
end

-- The durable event stream: every state change that matters is appended here by the script
-- that makes it, in the same atomic step, so a consumer (metrics, the dashboard, webhooks)
-- that reads it from where it left off misses nothing, unlike the 'done' pub/sub, which
-- only live waiters hear. Capped near EVENT_STREAM_MAXLEN entries ('~': whole nodes are
-- trimmed, which is cheap). Every entry has the same fields, so Redis stores their names
-- once per node. Called after the step's first write: in a Redis at maxmemory a script is
-- refused only at its first write that can grow memory (see finish.lua), so the append
-- never stops an outcome from being recorded.
-- E (optional): attempt (default: the task's count), code (SMTP), reason, worker; and the
-- task's lane, attempts (its count) and request_id where the caller has read them already
-- (lane false: the task has none), which spares a read here.
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
  local lane, attempts, request_id = E.lane, E.attempts, E.request_id
  if lane == nil then
    local f = redis.call('HMGET', TASK .. id, 'lane', 'attempts', 'request_id')
    lane, attempts, request_id = f[1], f[2], f[3]
  end
  local reason = clip(E.reason or '', REASON_MAX)
  redis.call('XADD', K_EVENTS, 'MAXLEN', '~', EVENTS_MAXLEN, '*',
    'type', kind, 'task_id', id, 'time', num(now), 'lane', lane or '',
    'attempt', num(E.attempt or attempts or 0), 'code', num(E.code or ''), 'reason', reason,
    'request_id', request_id or '', 'worker', E.worker or '')
end

-- The worker a lease token names (tokens are '<worker id>:<attempt>:<claim>', see
-- claim_ready).
local function token_worker(token)
  return string.match(token or '', '^(.*):%d+:%d+$') or ''
end

-- Per-minute counters of finished tasks, for the stats endpoint (kept two hours). The TTL is
-- set when the minute's first finish creates the counter; INCR keeps it.
local function count_finished(status, now)
  local key = STATS .. status .. ':' .. num(math.floor(now / 60000))
  if redis.call('INCR', key) == 1 then redis.call('EXPIRE', key, 7200) end
end

-- Stored bytes: while a task waits to be sent (pending, scheduled, retrying, in flight) its
-- job's size is charged to the total and to its quota owner (an API key, a client address,
-- a form) in K_STORED, and kept on the task as 'bytes', so the refund is exact and happens
-- once: whichever path ends the task refunds what is recorded there, and nothing else.
local STORED_TOTAL = 'total'  -- owners are 'key:...', 'address:...', 'form:...'

-- The totals' side of a charge; the task's 'bytes' is written by the caller (enqueue.lua
-- writes it with the rest of the new task, in one HSET).
local function count_stored(owner, bytes)
  redis.call('HINCRBY', K_STORED, STORED_TOTAL, num(bytes))
  if owner and owner ~= '' then redis.call('HINCRBY', K_STORED, owner, num(bytes)) end
end

local function charge(task, owner, bytes)
  redis.call('HSET', task, 'bytes', bytes)
  count_stored(owner, bytes)
end

local function refund_field(field, bytes)
  if redis.call('HINCRBY', K_STORED, field, num(-bytes)) <= 0 then
    redis.call('HDEL', K_STORED, field)  -- an owner with nothing stored leaves no trace
  end
end

-- Takes back what the task's 'bytes' and 'quota' (as read) say was charged. The caller
-- deletes 'bytes' in the same step (finish_task's HDEL), so the refund happens once.
local function refund(bytes, quota)
  if not bytes then return end
  refund_field(STORED_TOTAL, tonumber(bytes))
  if quota and quota ~= '' then refund_field(quota, tonumber(bytes)) end
end

-- `list` with the arguments after it appended: one HSET's field list built in steps.
local function extend(list, ...)
  for i = 1, select('#', ...) do list[#list + 1] = select(i, ...) end
  return list
end

-- Final states keep the hash for RESULT_TTL_SECONDS; pending tasks never expire.
-- Failed tasks are indexed by time (the dead-letter list); waiters hear of every end.
-- E: the event's fields (see emit); E.type names a failure that is not a plain 'failed'
-- ('cancelled', 'expired'). A success is 'sent'.
-- T (optional): the task's fields as finish.lua's record() read them (RECORD_FIELDS), and
-- T.new_log, its attempt log to write with the final status; given only by a caller that
-- has already dropped the task's lease entry.
local function finish_task(id, status, now, ttl, reason, E, T)
  local task = TASK .. id
  local set = {}  -- the fields written with the final status
  if T then
    set = {'log', T.new_log}
  else
    redis.call('ZREM', K_LEASES, id)
    T = fields(task, {'bytes', 'quota'})
  end
  redis.call('ZREM', K_SCHEDULED, id)
  -- A failed task keeps its job (for requeue) until it expires, but no longer counts: it
  -- cannot grow, and a key must not stay locked out by its dead letters for a week.
  refund(T.bytes, T.quota)
  if status == 'success' then
    redis.call('HSET', task, unpack(extend(set, 'status', 'success', 'sent_at', num(now),
                                           'updated_at', num(now))))
    -- Content is not kept once delivered: it is no longer needed, and it is private.
    redis.call('HDEL', task, 'job', 'reason', 'lease', 'next_attempt_at', 'bytes')
  else
    redis.call('HSET', task, unpack(extend(set, 'status', 'failed', 'reason', reason,
                                           'updated_at', num(now))))
    redis.call('HDEL', task, 'lease', 'next_attempt_at', 'bytes')
    redis.call('ZADD', K_FAILED, num(now), id)
    redis.call('ZREMRANGEBYSCORE', K_FAILED, '-inf', num(now - ttl * 1000))
  end
  redis.call('EXPIRE', task, num(ttl))
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

-- What claim_ready's take() reads of a task, in one HMGET.
local TAKE_FIELDS = {'status', 'expires_at', 'attempts', 'job', 'request_id', 'lane'}

-- The earliest score in a sorted set (a deadline), or nil when it is empty.
local function first_score(key)
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  return first[2] and tonumber(first[2]) or nil
end

-- Move due scheduled work into its lane, put back work whose lease lapsed, then claim up
-- to COUNT ready tasks for WORKER under a lease. Used by claim.lua, and by finish.lua to
-- refill the slot a finished send leaves (one round trip per mail instead of two).
-- C: {count, lease_ms, worker, max_attempts, ttl, fair_every, lanes (high first)}.
-- Returns {claimed rows, ms until the next scheduled or lease deadline, or -1, the worker
-- of each lapsed lease put back or failed (so the claiming worker can say who died)}.
local function claim_ready(C, now)
  local count, lease_ms, worker, lanes = C.count, C.lease_ms, C.worker, C.lanes
  local max_attempts, ttl, fair_every = C.max_attempts, C.ttl, C.fair_every
  -- Each set's earliest deadline, read once: a set is scanned only when something in it is
  -- due, and these are the deadlines returned unless `moved` (below) says otherwise.
  local scheduled_at, lease_at = first_score(K_SCHEDULED), first_score(K_LEASES)
  -- Whether either set changed in a way not followed here (anything but a new lease of
  -- this claim's): then both deadlines are read again at the end.
  local moved = false
  -- What makes each claim's tokens its own: Redis's clock in microseconds (script calls run
  -- one at a time, each for longer than one). Worker and attempt alone are not: a deferral
  -- gives the attempt back, and the same worker may claim the task again, so a retried
  -- defer or finish of the first claim (its reply lost) would pass for the second's.
  local clock = redis.call('TIME')
  local claim_id = clock[1] .. string.format('%06d', tonumber(clock[2]))

  -- Due retries and scheduled sends join the back of their lane.
  if scheduled_at and scheduled_at <= now then
    moved = true
    for _, id in ipairs(redis.call('ZRANGEBYSCORE', K_SCHEDULED, '-inf', now, 'LIMIT', 0, 100)) do
      redis.call('ZREM', K_SCHEDULED, id)
      local task = TASK .. id
      local f = fields(task, {'lane', 'status'})
      if f.lane and f.status == 'pending' then
        redis.call('HDEL', task, 'next_attempt_at')
        make_ready(f.lane, id, false)
      end
    end
  end

  -- A lapsed lease means its worker died or lost Redis. The interrupted attempt counts.
  local lapsed, lapsed_from = {}, {}
  if lease_at and lease_at <= now then
    moved = true
    lapsed = redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', now, 'LIMIT', 0, 100)
  end
  for _, id in ipairs(lapsed) do
    redis.call('ZREM', K_LEASES, id)
    local task = TASK .. id
    local f = fields(task, {'lane', 'status', 'attempts', 'lease'})
    local lane = f.lane
    if lane and f.status == 'pending' then
      local dead = token_worker(f.lease)
      lapsed_from[#lapsed_from + 1] = dead
      local attempts = tonumber(f.attempts or '0')
      local why = 'worker ' .. (dead ~= '' and dead .. ' ' or '') .. 'stopped renewing its lease'
      redis.call('HDEL', task, 'lease')
      append_log(task, {at = now, attempt = attempts, outcome = 'lease_expired', reply = why})
      emit('lease_expired', id, now, {reason = why, worker = dead})
      if attempts >= max_attempts then
        finish_task(id, 'failed', now, ttl,
          'lease expired on attempt ' .. attempts .. ' of ' .. max_attempts .. ' (worker lost)')
      else
        make_ready(lane, id, true)  -- front of the lane: it has waited longest
      end
    end
  end
  -- Their workers leave the live list once their heartbeat is a lease old as well: a worker
  -- renews all its leases with each heartbeat, so that one died or lost Redis (one that
  -- comes back is listed again at its next renewal). The lease is this claimer's: workers
  -- share JOB_LEASE_SECONDS (README). Not from expire_waiting (lease 0).
  if lease_ms > 0 then
    for _, dead in ipairs(lapsed_from) do
      local beat = redis.call('ZSCORE', K_WORKERS, dead)
      if beat and tonumber(beat) < now - lease_ms then redis.call('ZREM', K_WORKERS, dead) end
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
    local f = fields(task, TAKE_FIELDS)
    if f.status ~= 'pending' then return nil end
    local expires_at = tonumber(f.expires_at or '0')
    local attempts = tonumber(f.attempts or '0')
    if expires_at > 0 and now >= expires_at then
      moved = true
      append_log(task, {at = now, attempt = attempts, outcome = 'expired'})
      finish_task(id, 'failed', now, ttl, 'expired', {type = 'expired'})
      return nil
    end
    -- Written with the lease rather than by HINCRBY: the count was just read.
    local attempt = attempts + 1
    local token = worker .. ':' .. num(attempt) .. ':' .. claim_id
    redis.call('HSET', task, 'attempts', num(attempt), 'lease', token, 'updated_at', num(now))
    local due = now + lease_ms
    if redis.call('ZADD', K_LEASES, num(due), id) == 0 then
      moved = true  -- it had a lease entry already, which may have been the earliest
    elseif not lease_at or due < lease_at then
      lease_at = due
    end
    emit('claimed', id, now, {worker = worker, lane = f.lane, attempts = attempt,
                              request_id = f.request_id})
    -- The ms left before expires_at (-1: none): a worker that holds the job ahead of a free
    -- send slot (WORKER_PREFETCH) must not send it once that has passed.
    local expires_in = expires_at > 0 and num(expires_at - now) or -1
    return {id, token, attempt, f.job, f.request_id or '', f.lane or '', expires_in}
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
  if popped > 0 then redis.call('LPOP', K_WAKE, num(popped)) end

  if moved then scheduled_at, lease_at = first_score(K_SCHEDULED), first_score(K_LEASES) end
  local next_at = scheduled_at
  if lease_at and (not next_at or lease_at < next_at) then next_at = lease_at end
  return {claimed, next_at and math.max(0, next_at - now) or -1, lapsed_from}
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
