-- Forget dispatchers that are gone: each process joins the consumer group under a new name
-- (host:pid:random), so without this the group lists every dispatcher that ever ran.
-- KEYS: the event stream. ARGV: the group, the idle time (ms) after which a consumer with
-- nothing pending counts as gone. A consumer with pending entries is never deleted (that
-- would drop them from the group's pending list); XAUTOCLAIM moves them first. Atomic, so
-- no consumer can take an entry between the check and the delete. Returns the names deleted.
local STREAM, GROUP, IDLE = KEYS[1], ARGV[1], tonumber(ARGV[2])
local gone = {}
for _, row in ipairs(redis.call('XINFO', 'CONSUMERS', STREAM, GROUP)) do
  local info = {}
  for i = 1, #row, 2 do info[row[i]] = row[i + 1] end
  if tonumber(info['pending']) == 0 and tonumber(info['idle']) >= IDLE then
    redis.call('XGROUP', 'DELCONSUMER', STREAM, GROUP, info['name'])
    gone[#gone + 1] = info['name']
  end
end
return gone
