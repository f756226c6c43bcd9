-- Record the outcome of attempts, each a success, retry (scheduled after a delay) or failed.
-- ARGV[5], ARGV[6]: ttl s of a failed task, of a successful one; ARGV[7]: how many attempts,
-- N; from ARGV[8], six arguments for each: task id, lease token, outcome, attempt-log entry
-- json, reason, retry delay ms. Returns a list of N: the outcome applied, 'stale',
-- 'ignored' or 'missing' (no such task: it expired, or Redis lost it), for each in order
-- (a call run again after its reply was lost answers as its first run did, and changes
-- nothing). The worker sends the finishes of the sends that ended
-- while its previous call was in flight as one call (emailq.coalesce.FinishCoalescer): per
-- mail, the Redis client's cost is what counts, not Redis's.
-- With claim parameters after those (as claim.lua's), it then claims for the worker whose
-- sends just ended, so a busy worker needs no round trip of its own to refill its slots,
-- and returns {applied list, claimed rows, ms until the next deadline or -1}.
local now = now_ms()
local ttl_failed, ttl_success, n = ARGV[5], ARGV[6], tonumber(ARGV[7])

-- What record() reads of a task, in one HMGET: what it checks, the attempt log it extends,
-- the event's fields (see emit) and what was charged for it (see refund).
local RECORD_FIELDS = {'status', 'lease', 'log', 'lane', 'attempts', 'request_id', 'bytes',
                       'quota'}

-- An attempt this call would not record: its own earlier run's record (see own_record) is
-- answered as that run was, with the outcome it applied; anything else is `refused`.
local function refused_unless_replayed(f, at, refused)
  local last = own_record(f.log, ARGV[at + 3])
  if last and last.outcome == cjson.decode(ARGV[at + 3]).outcome then return ARGV[at + 2] end
  return refused
end

-- One attempt, its arguments from ARGV[at]: the same steps, whichever place it has.
local function record(at)
  local id, token, outcome = ARGV[at], ARGV[at + 1], ARGV[at + 2]
  local task = TASK .. id
  local f = fields(task, RECORD_FIELDS)
  if not f.status then
    redis.call('ZREM', K_LEASES, id)  -- a lease of nothing: the recovery sweep need not meet it
    return 'missing'
  end
  if f.status ~= 'pending' then return refused_unless_replayed(f, at, 'ignored') end
  -- A worker whose lease lapsed may not decide a retry or a failure any more: the task is
  -- someone else's now. A late *success* still counts: recording it keeps the task from
  -- being sent again by whoever claims it next.
  if f.lease ~= token and outcome ~= 'success' then
    return refused_unless_replayed(f, at, 'stale')
  end
  -- The script's first write (the first attempt recorded, whichever place it has) is one
  -- that cannot grow memory: Redis refuses a script at maxmemory only at its first write
  -- that can (a script cannot stop halfway), so outcomes are recorded even in a full Redis,
  -- where refusing them would mean sending the mail again. Every outcome drops the lease
  -- entry anyway.
  redis.call('ZREM', K_LEASES, id)
  local entry = cjson.decode(ARGV[at + 3])
  entry['at'] = now
  -- The log is written with the outcome's other fields, in the same HSET.
  f.new_log = log_with(f.log, entry)
  local event = {attempt = entry['attempt'], code = entry['code'], worker = token_worker(token),
                 lane = f.lane, attempts = f.attempts, request_id = f.request_id}
  if outcome == 'retry' then
    local due = now + tonumber(ARGV[at + 5])
    -- The relay answered about this mail: a later outage starts a new outage clock.
    redis.call('HDEL', task, 'lease', 'outage_since')
    redis.call('HSET', task, 'log', f.new_log, 'updated_at', num(now), 'next_attempt_at', num(due))
    redis.call('ZADD', K_SCHEDULED, num(due), id)
    nudge()
    event.reason = entry['reply']
    emit('retry', id, now, event)
    return 'retry'
  end
  local ttl = tonumber(outcome == 'success' and ttl_success or ttl_failed)
  finish_task(id, outcome, now, ttl, ARGV[at + 4], event, f)
  return outcome
end

local applied = {}
for i = 1, n do applied[i] = record(8 + (i - 1) * 6) end
local after = 8 + n * 6
if #ARGV < after then return applied end
local claim = claim_ready(claim_args(after), now)
return {applied, claim[1], claim[2], claim[3]}
