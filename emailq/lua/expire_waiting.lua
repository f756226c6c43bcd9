-- Fail mail that has waited on a down relay for the ceiling. Only a worker whose relay has
-- been unreachable for at least the ceiling calls this, so a mail that has been waiting
-- that long (since its first relay-level failure, or else since it was last queued or
-- due) has waited through the outage. Due retries and sends join their lanes first; each
-- lane is read from its head (oldest first) and the scan stops at the first mail that has
-- not waited long enough. Entries that are no longer pending are dropped on the way.
-- ARGV[5..]: ceiling ms, reason, ttl s, limit, max attempts, lanes (high first).
-- Returns {tasks failed, entries removed from lanes}.
local ceiling, reason, ttl = tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])
local limit, max_attempts = tonumber(ARGV[8]), tonumber(ARGV[9])
local lanes = {}
for i = 10, #ARGV do lanes[#lanes + 1] = ARGV[i] end
local now = now_ms()
claim_ready({count = 0, lease_ms = 0, worker = '', max_attempts = max_attempts, ttl = ttl,
             fair_every = 1, lanes = lanes}, now)

local function waiting_since(task)
  local f = redis.call('HMGET', task, 'outage_since', 'updated_at', 'scheduled_at')
  if f[1] then return tonumber(f[1]) end
  return math.max(tonumber(f[2] or '0'), tonumber(f[3] or '0'))
end

local failed, popped = 0, 0
for _, lane in ipairs(lanes) do
  while popped < limit do
    local id = redis.call('LINDEX', LANE .. lane, 0)
    if not id then break end
    local task = TASK .. id
    local pending = redis.call('HGET', task, 'status') == 'pending'
    if pending and now - waiting_since(task) < ceiling then break end
    redis.call('LPOP', LANE .. lane)
    popped = popped + 1
    if pending then
      local attempts = tonumber(redis.call('HGET', task, 'attempts') or '0')
      append_log(task, {at = now, attempt = attempts, outcome = 'failed', reply = reason})
      finish_task(id, 'failed', now, ttl, reason)
      failed = failed + 1
    end
  end
end
-- One wake token stands for one ready task (see claim_ready).
if popped > 0 then redis.call('LPOP', K_WAKE, popped) end
return {failed, popped}
