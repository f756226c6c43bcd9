-- Endpoint changes that read and write one JSON record (KEYS[1], the endpoints hash).
-- ARGV[1] = 'sync': ARGV[2] is the WEBHOOKS_FILE endpoints (JSON array): each is written
--   over its earlier self, keeping its creation time and disabled state; file endpoints no
--   longer in the file are removed. An API endpoint with a file endpoint's id stays, and
--   its id is returned in the list of conflicts.
-- ARGV[1] = 'enable': ARGV[2] is the id; returns 1 if it exists.
-- ARGV[1] = 'change': ARGV[2] is the id of an API endpoint, ARGV[3] a JSON object of the
--   fields to replace (url, events, secrets, description: no others are taken).
-- ARGV[1] = 'rotate': ARGV[2] is the id of an API endpoint, ARGV[3] a new secret: it signs
--   first, with the newest of the old ones; older ones are dropped.
-- 'change' and 'rotate' return the endpoint's JSON as written, or 'missing', or 'file' (a
-- WEBHOOKS_FILE endpoint, which the file owns: left as it is).
local K_ENDPOINTS, OP = KEYS[1], ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local CHANGEABLE = {'url', 'events', 'secrets', 'description'}

if OP == 'enable' then
  local raw = redis.call('HGET', K_ENDPOINTS, ARGV[2])
  if not raw then return 0 end
  local endpoint = cjson.decode(raw)
  endpoint.disabled_at = nil
  endpoint.disabled_reason = nil
  redis.call('HSET', K_ENDPOINTS, ARGV[2], cjson.encode(endpoint))
  return 1
end

if OP == 'change' or OP == 'rotate' then
  local raw = redis.call('HGET', K_ENDPOINTS, ARGV[2])
  if not raw then return 'missing' end
  local endpoint = cjson.decode(raw)
  if endpoint.source == 'file' then return 'file' end
  endpoint.updated_at = now
  if OP == 'rotate' then
    endpoint.secrets = {ARGV[3], endpoint.secrets[1]}
  else
    local given = cjson.decode(ARGV[3])
    for _, name in ipairs(CHANGEABLE) do
      if given[name] ~= nil then endpoint[name] = given[name] end
    end
  end
  local written = cjson.encode(endpoint)
  redis.call('HSET', K_ENDPOINTS, ARGV[2], written)
  return written
end

local wanted, conflicts = {}, {}
for _, endpoint in ipairs(cjson.decode(ARGV[2])) do
  wanted[endpoint.id] = true
  local raw = redis.call('HGET', K_ENDPOINTS, endpoint.id)
  local old = raw and cjson.decode(raw)
  if old and old.source ~= 'file' then
    conflicts[#conflicts + 1] = endpoint.id
  else
    endpoint.created_at = old and old.created_at or now
    if old and old.disabled_at ~= cjson.null then
      endpoint.disabled_at = old.disabled_at
      endpoint.disabled_reason = old.disabled_reason
    end
    redis.call('HSET', K_ENDPOINTS, endpoint.id, cjson.encode(endpoint))
  end
end
local all = redis.call('HGETALL', K_ENDPOINTS)
for i = 1, #all, 2 do
  if not wanted[all[i]] and cjson.decode(all[i + 1]).source == 'file' then
    redis.call('HDEL', K_ENDPOINTS, all[i])
  end
end
return conflicts
