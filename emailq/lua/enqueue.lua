-- Store tasks and make each ready (or schedule it), all in one atomic step: 202 means stored.
-- The API coalesces concurrent sends, and a batch sends its messages, as one call here.
-- ARGV[5..]: one JSON array per task (one argument, not eleven: the client packs each
-- argument separately, and that dominated the API's cost of a coalesced call):
--   [task id, lane, to, job json, request id, send_at ms (0: now), expires_at ms (0: never),
--    idempotency record key ('' for none), request fingerprint, record TTL (s), API key id]
-- Returns one reply per task: its creation time when stored, or, for an idempotency key
-- seen before, {the earlier task id, 1 if the fingerprint matches} and nothing stored.
local now = now_ms()

local function enqueue(raw)
  local t = cjson.decode(raw)
  local id, lane, to, job, request_id = t[1], t[2], t[3], t[4], t[5]
  local send_at, expires_at, idem, fingerprint, ttl, key_id = t[6], t[7], t[8], t[9], t[10], t[11]
  -- The same call run twice (a client's retry after a lost reply) stores its tasks once:
  -- a second copy in the lane would be claimed and sent twice.
  local stored = redis.call('HGET', TASK .. id, 'created_at')
  if stored then return tonumber(stored) end
  if idem ~= '' then
    -- Earlier tasks of this same call are visible here, so duplicates within it fold too.
    local seen = redis.call('HMGET', idem, 'task_id', 'fingerprint')
    if seen[1] then return {seen[1], seen[2] == fingerprint and 1 or 0} end
    redis.call('HSET', idem, 'task_id', id, 'fingerprint', fingerprint, 'created', now)
    redis.call('EXPIRE', idem, ttl)
  end
  local task = TASK .. id
  redis.call('HSET', task,
    'status', 'pending', 'to', to, 'attempts', 0, 'lane', lane,
    'job', job, 'request_id', request_id, 'created_at', now, 'updated_at', now)
  if key_id ~= '' then redis.call('HSET', task, 'key_id', key_id) end
  if expires_at > 0 then redis.call('HSET', task, 'expires_at', expires_at) end
  if send_at > now then
    redis.call('HSET', task, 'scheduled_at', send_at)
    redis.call('ZADD', K_SCHEDULED, send_at, id)
    nudge()
  else
    make_ready(lane, id, false)
  end
  return now
end

local replies = {}
for i = 5, #ARGV do
  replies[#replies + 1] = enqueue(ARGV[i])
end
return replies
