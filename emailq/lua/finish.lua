-- Record the outcome of one attempt: success, retry (scheduled after a delay) or failed.
-- ARGV[5..12]: task id, lease token, outcome, attempt-log entry json, reason, retry delay
-- ms, ttl s of a failed task, ttl s of a successful one. Returns the outcome applied,
-- 'stale' or 'ignored'.
-- With claim parameters from ARGV[13] (as claim.lua's), it then claims for the worker
-- whose send just ended, so a busy worker needs one round trip per mail, and returns
-- {applied, claimed rows, ms until the next deadline or -1}.
local id, token, outcome = ARGV[5], ARGV[6], ARGV[7]
local task = TASK .. id
local now = now_ms()

local function record()
  if redis.call('HGET', task, 'status') ~= 'pending' then return 'ignored' end
  -- A worker whose lease lapsed may not decide a retry or a failure any more: the task is
  -- someone else's now. A late *success* still counts: recording it keeps the task from
  -- being sent again by whoever claims it next.
  if redis.call('HGET', task, 'lease') ~= token and outcome ~= 'success' then return 'stale' end
  -- First write of the script, and one that cannot grow memory: Redis refuses a script at
  -- maxmemory only at its first write that can (a script cannot stop halfway), so an
  -- outcome is recorded even in a full Redis, where refusing it would mean sending the
  -- mail again. Every outcome drops the lease entry anyway.
  redis.call('ZREM', K_LEASES, id)
  local entry = cjson.decode(ARGV[8])
  entry['at'] = now
  append_log(task, entry)
  local event = {attempt = entry['attempt'], code = entry['code'], worker = token_worker(token)}
  if outcome == 'retry' then
    local due = now + tonumber(ARGV[10])
    -- The relay answered about this mail: a later outage starts a new outage clock.
    redis.call('HDEL', task, 'lease', 'outage_since')
    redis.call('HSET', task, 'updated_at', now, 'next_attempt_at', due)
    redis.call('ZADD', K_SCHEDULED, due, id)
    nudge()
    event.reason = entry['reply']
    emit('retry', id, now, event)
    return 'retry'
  end
  local ttl = tonumber(outcome == 'success' and ARGV[12] or ARGV[11])
  finish_task(id, outcome, now, ttl, ARGV[9], event)
  return outcome
end

local applied = record()
if #ARGV < 13 then return applied end
local claim = claim_ready(claim_args(13), now)
return {applied, claim[1], claim[2]}
