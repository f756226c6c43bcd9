-- Live workers, each with its last heartbeat and the relay state it published.
-- ARGV[5..]: live-worker window ms, relay state key prefix.
-- Returns now ms, then {worker id, last heartbeat ms, relay state JSON or ''} for every
-- worker heard from within the window, most recently heard first.
local window, relay_prefix = tonumber(ARGV[5]), ARGV[6]
local now = now_ms()
local rows = {}
local found = redis.call('ZREVRANGEBYSCORE', K_WORKERS, '+inf', now - window, 'WITHSCORES')
for i = 1, #found, 2 do
  local state = redis.call('GET', relay_prefix .. found[i]) or ''
  rows[#rows + 1] = {found[i], tonumber(found[i + 1]), state}
end
return {now, rows}
