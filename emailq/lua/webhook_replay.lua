-- Send a finished delivery again: the same webhook-id and body, a fresh retry schedule.
-- KEYS: due zset, endpoints hash. ARGV: delivery prefix, failed prefix, id, endpoint id.
-- Returns 'replayed', 'missing', 'pending' (not finished yet) or 'disabled'.
local K_DUE, K_ENDPOINTS = KEYS[1], KEYS[2]
local DELIVERY, FAILED, ID, ENDPOINT = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local key = DELIVERY .. ID
local f = redis.call('HMGET', key, 'endpoint', 'status', 'attempts', 'log')
if f[1] ~= ENDPOINT then return 'missing' end
if f[2] == 'pending' then return 'pending' end
local raw = redis.call('HGET', K_ENDPOINTS, ENDPOINT)
if not raw then return 'missing' end
local disabled = cjson.decode(raw).disabled_at
if disabled and disabled ~= cjson.null then return 'disabled' end

local log = {}
if f[4] then log = cjson.decode(f[4]) end
log[#log + 1] = {at = now, attempt = tonumber(f[3]), outcome = 'replay'}
while #log > 50 do table.remove(log, 1) end
redis.call('HSET', key, 'status', 'pending', 'attempts', 0, 'next_attempt_at', now,
  'updated_at', now, 'log', cjson.encode(log))
redis.call('HDEL', key, 'reason')
redis.call('PERSIST', key)
redis.call('ZREM', FAILED .. ENDPOINT, ID)
redis.call('ZADD', K_DUE, now, ID)
return 'replayed'
