-- Claim due deliveries for one attempt each: the due time becomes a lease deadline (a
-- dispatcher that dies mid-attempt leaves it due again then, same webhook-id), the attempt
-- is counted, and a fencing token is handed out that its finish must show.
-- A delivery whose endpoint was deleted or disabled fails here, without an attempt.
-- KEYS: due zset, endpoints hash. ARGV: delivery prefix, failed prefix, lease ms, count,
-- ttl (s). Returns {id, token, attempt, endpoint JSON, payload, task id} per claimed
-- delivery.
local K_DUE, K_ENDPOINTS = KEYS[1], KEYS[2]
local DELIVERY, FAILED = ARGV[1], ARGV[2]
local LEASE, COUNT, TTL = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function fail(id, key, endpoint, reason)
  redis.call('HSET', key, 'status', 'failed', 'reason', reason, 'updated_at', now)
  redis.call('HDEL', key, 'next_attempt_at')
  redis.call('ZREM', K_DUE, id)
  redis.call('ZADD', FAILED .. endpoint, now, id)
  redis.call('EXPIRE', key, TTL)
end

local rows = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', K_DUE, '-inf', now, 'LIMIT', 0, COUNT)) do
  local key = DELIVERY .. id
  local f = redis.call('HMGET', key, 'endpoint', 'status', 'payload', 'task_id')
  if not f[1] or f[2] ~= 'pending' then
    redis.call('ZREM', K_DUE, id)  -- gone (expired) or already final: a stale entry
  else
    local raw = redis.call('HGET', K_ENDPOINTS, f[1])
    local disabled = raw and cjson.decode(raw).disabled_at
    if not raw then
      fail(id, key, f[1], 'endpoint deleted')
    elseif disabled and disabled ~= cjson.null then
      fail(id, key, f[1], 'endpoint disabled')
    else
      redis.call('ZADD', K_DUE, now + LEASE, id)
      local token = redis.call('HINCRBY', key, 'token', 1)
      local attempt = redis.call('HINCRBY', key, 'attempts', 1)
      redis.call('HSET', key, 'updated_at', now)
      rows[#rows + 1] = {id, token, attempt, raw, f[3], f[4] or ''}
    end
  end
end
return rows
