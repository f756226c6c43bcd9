-- Create the deliveries of a batch of events and acknowledge those events, in one step: a
-- dispatcher that dies before this leaves the events pending in the consumer group (another
-- reclaims them), one that dies after leaves nothing to redo. Delivery ids are derived from
-- (event, endpoint), so an event processed twice creates its deliveries once.
-- KEYS: events stream, due zset. ARGV: group, delivery prefix, index prefix, ttl (s),
-- deliveries (JSON array of {id, endpoint, type, task_id, payload, event_id}), event ids
-- to acknowledge (JSON array). Returns the number of deliveries created.
local K_EVENTS, K_DUE = KEYS[1], KEYS[2]
local GROUP, DELIVERY, INDEX, TTL = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local items, acks = cjson.decode(ARGV[5]), cjson.decode(ARGV[6])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local created = 0
for _, d in ipairs(items) do
  local key = DELIVERY .. d.id
  if redis.call('EXISTS', key) == 0 then
    redis.call('HSET', key, 'endpoint', d.endpoint, 'type', d.type, 'task_id', d.task_id,
      'payload', d.payload, 'event_id', d.event_id, 'status', 'pending', 'attempts', 0,
      'token', 0, 'created_at', now, 'updated_at', now, 'next_attempt_at', now)
    redis.call('ZADD', K_DUE, now, d.id)
    local index = INDEX .. d.endpoint
    redis.call('ZADD', index, now, d.id)
    redis.call('ZREMRANGEBYSCORE', index, '-inf', now - TTL * 1000)
    created = created + 1
  end
end
for i = 1, #acks, 500 do
  redis.call('XACK', K_EVENTS, GROUP, unpack(acks, i, math.min(i + 499, #acks)))
end
return created
