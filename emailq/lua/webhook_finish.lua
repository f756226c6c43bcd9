-- Record one attempt's outcome, if the attempt still holds the delivery (its token): a
-- dispatcher whose lease lapsed while it waited must not overwrite a later attempt.
-- outcome: 'succeeded' | 'retry' (due again in retry_ms) | 'failed'. A non-empty disable
-- reason disables the endpoint (it answered 410 Gone), unless the endpoint's url is no
-- longer the one attempted: a PATCH moved it away from the url that is gone.
-- KEYS: due zset, endpoints hash. ARGV: delivery prefix, failed prefix, id, token,
-- outcome, attempt entry (JSON), retry ms, ttl (s), reason, disable reason, url attempted.
-- Returns the outcome applied, or 'stale'.
local K_DUE, K_ENDPOINTS = KEYS[1], KEYS[2]
local DELIVERY, FAILED, ID, TOKEN, OUTCOME = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local ENTRY, RETRY_MS, TTL = ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8])
local REASON, DISABLE, URL = ARGV[9], ARGV[10], ARGV[11]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local key = DELIVERY .. ID
local f = redis.call('HMGET', key, 'token', 'status', 'endpoint', 'log')
if f[1] ~= TOKEN or f[2] ~= 'pending' then return 'stale' end

local log = {}
if f[4] then log = cjson.decode(f[4]) end
local entry = cjson.decode(ENTRY)
entry.at = now
log[#log + 1] = entry
while #log > 50 do table.remove(log, 1) end
redis.call('HSET', key, 'log', cjson.encode(log), 'updated_at', now)

if OUTCOME == 'succeeded' then
  redis.call('HSET', key, 'status', 'succeeded')
  redis.call('HDEL', key, 'next_attempt_at', 'reason')
  redis.call('ZREM', K_DUE, ID)
  redis.call('EXPIRE', key, TTL)
elseif OUTCOME == 'retry' then
  redis.call('HSET', key, 'next_attempt_at', now + RETRY_MS, 'reason', REASON)
  redis.call('ZADD', K_DUE, now + RETRY_MS, ID)
else
  redis.call('HSET', key, 'status', 'failed', 'reason', REASON)
  redis.call('HDEL', key, 'next_attempt_at')
  redis.call('ZREM', K_DUE, ID)
  local failed = FAILED .. f[3]
  redis.call('ZADD', failed, now, ID)
  redis.call('ZREMRANGEBYSCORE', failed, '-inf', now - TTL * 1000)
  redis.call('EXPIRE', key, TTL)
end

if DISABLE ~= '' then
  local raw = redis.call('HGET', K_ENDPOINTS, f[3])
  if raw then
    local endpoint = cjson.decode(raw)
    if endpoint.url == URL then
      endpoint.disabled_at = now
      endpoint.disabled_reason = DISABLE
      redis.call('HSET', K_ENDPOINTS, f[3], cjson.encode(endpoint))
    end
  end
end
return OUTCOME
