-- Tasks finished per clock minute, for the dashboard's chart, in one round trip.
-- ARGV[5]: how many minutes back (the counters are kept two hours; see count_finished).
-- Returns now ms, then {sent, failed} per minute, newest (the current, partial one) first.
local minutes = tonumber(ARGV[5])
local now = now_ms()
local minute = math.floor(now / 60000)
local sent, failed = {}, {}
for m = 0, minutes - 1 do
  sent[#sent + 1] = tonumber(redis.call('GET', STATS .. 'success:' .. (minute - m)) or '0')
  failed[#failed + 1] = tonumber(redis.call('GET', STATS .. 'failed:' .. (minute - m)) or '0')
end
return {now, sent, failed}
