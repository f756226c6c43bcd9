-- Store tasks and make each ready (or schedule it), all in one atomic step: 202 means stored.
-- The API coalesces concurrent sends, and a batch sends its messages, as one call here.
-- ARGV[5..9]: MAX_STORED_BYTES (0: none), MAX_STORED_BYTES_PER_KEY (0: none),
--   REDIS_MEMORY_HEADROOM (fraction of maxmemory; 0: no check), estimated Redis bytes per
--   task besides its job, and 'each' (every task is its own request: the coalescer) or
--   'all' (the tasks are one request, stored all or none: a batch).
-- ARGV[10..]: one JSON array per task (one argument, not twelve: the client packs each
-- argument separately, and that dominated the API's cost of a coalesced call):
--   [task id, lane, to, job json, request id, send_at ms (0: now), expires_at ms (0: never),
--    idempotency record key ('' for none), request fingerprint, record TTL (s), API key id,
--    quota owner ('' for none: the CLI), labels (metadata and tags as JSON; '' for none)]
-- Returns one reply per task: its creation time when stored; for an idempotency key seen
-- before, {the earlier task id, 1 if the fingerprint matches} and nothing stored; or, when
-- its request does not fit, {'refused', what ('memory', 'total' or 'quota'), bytes needed,
-- bytes held, limit} and nothing of that request stored.
local now = now_ms()
local max_total, max_owner = tonumber(ARGV[5]), tonumber(ARGV[6])
local headroom, overhead, grouping = tonumber(ARGV[7]), tonumber(ARGV[8]), ARGV[9]
local FIRST = 10

-- Redis memory left before the headroom that claims, renewals and finishes need, read once
-- per call (INFO costs tens of microseconds; one call stores up to hundreds of tasks).
local memory_left, memory_used, memory_max = nil, 0, 0
if headroom > 0 then
  local info = redis.call('INFO', 'memory')
  memory_max = tonumber(string.match(info, '\nmaxmemory:(%d+)') or '0')
  if memory_max > 0 then
    memory_used = tonumber(string.match(info, '\nused_memory:(%d+)') or '0')
    memory_left = math.floor(memory_max * (1 - headroom)) - memory_used
  end
end

-- Nil if `need` more job bytes (in `count` tasks) fit every limit, else the refusal.
local function refusal(owner, need, count)
  if count == 0 then return nil end
  if memory_left then
    local estimate = need + overhead * count
    if estimate > memory_left then
      return {'refused', 'memory', estimate, memory_used, memory_max}
    end
  end
  -- Both counters in one read (the owner's is not looked at unless it has a limit).
  local stored = redis.call('HMGET', K_STORED, STORED_TOTAL, owner ~= '' and owner or STORED_TOTAL)
  local total = tonumber(stored[1] or '0')
  if max_total > 0 and total + need > max_total then
    return {'refused', 'total', need, total, max_total}
  end
  if max_owner > 0 and owner ~= '' then
    local held = tonumber(stored[2] or '0')
    if held + need > max_owner then return {'refused', 'quota', need, held, max_owner} end
  end
  return nil
end

-- The same call run twice (a client's retry after a lost reply) stores its tasks once: a
-- second copy in the lane would be claimed and sent twice. Such a task answers as stored
-- and costs nothing against the limits.
local function stored_before(t)
  local created = redis.call('HGET', TASK .. t[1], 'created_at')
  return created and tonumber(created) or nil
end

local function replay_of(t)
  local created = stored_before(t)
  if created then return created end
  if t[8] == '' then return nil end
  -- Earlier tasks of this same call are visible here, so duplicates within it fold too.
  local seen = redis.call('HMGET', t[8], 'task_id', 'fingerprint')
  if seen[1] then return {seen[1], seen[2] == t[9] and 1 or 0} end
  return nil
end

local function store(t)
  local id, lane, to, job, request_id = t[1], t[2], t[3], t[4], t[5]
  local send_at, expires_at, idem, fingerprint, ttl, key_id = t[6], t[7], t[8], t[9], t[10], t[11]
  local owner, labels = t[12], t[13]
  if idem ~= '' then
    redis.call('HSET', idem, 'task_id', id, 'fingerprint', fingerprint, 'created', num(now))
    redis.call('EXPIRE', idem, num(ttl))
  end
  local task = TASK .. id
  -- The whole new task in one HSET (see fields in _prelude.lua).
  local set = {'status', 'pending', 'to', to, 'attempts', '0', 'lane', lane,
               'job', job, 'request_id', request_id, 'created_at', num(now), 'updated_at', num(now)}
  if key_id ~= '' then extend(set, 'key_id', key_id) end
  if owner ~= '' then extend(set, 'quota', owner) end
  -- Kept after the job is gone (a success drops it): results and reports still show them.
  if labels and labels ~= '' then extend(set, 'labels', labels) end
  extend(set, 'bytes', num(#job))  -- its charge (see charge in _prelude.lua)
  if expires_at > 0 then extend(set, 'expires_at', num(expires_at)) end
  local scheduled = send_at > now
  if scheduled then extend(set, 'scheduled_at', num(send_at)) end
  redis.call('HSET', task, unpack(set))
  count_stored(owner, #job)
  if scheduled then
    redis.call('ZADD', K_SCHEDULED, num(send_at), id)
    nudge()
  else
    make_ready(lane, id, false)
  end
  emit('accepted', id, now, {lane = lane, attempts = 0, request_id = request_id})
  if memory_left then memory_left = memory_left - #job - overhead end
  return now
end

-- One request: tasks[first..last], all from one quota owner. Replays cost nothing; the
-- rest are stored only if all of them fit.
local function request(tasks, first, last, replies)
  local need, count = 0, 0
  for i = first, last do
    local replay = replay_of(tasks[i])
    replies[i] = replay
    if not replay then
      need, count = need + #tasks[i][4], count + 1
    end
  end
  local refused = refusal(tasks[first][12], need, count)
  for i = first, last do
    if not replies[i] then
      -- Re-checked: two tasks of one request may carry the same idempotency key. Not the
      -- first: nothing has been stored since it was checked above.
      replies[i] = refused or (i > first and replay_of(tasks[i])) or store(tasks[i])
    end
  end
end

local tasks, replies = {}, {}
for i = FIRST, #ARGV do tasks[#tasks + 1] = cjson.decode(ARGV[i]) end
if grouping == 'all' then
  if #tasks > 0 then request(tasks, 1, #tasks, replies) end
else
  for i = 1, #tasks do request(tasks, i, i, replies) end
end
return replies
