-- The relay's send rate, shared by every worker. GCRA, a token bucket that holds one
-- token: sends are spaced 1/rate apart and never burst, since providers punish bursts.
-- Throttling replies halve the rate (at most once a second, however many arrive at once,
-- down to a sixteenth of the maximum); it grows back by a tenth of the maximum per second
-- (AIMD). A take reserves the next free slot, so a worker needs one call per mail and no
-- polling; a slot reserved and not used only slows the others down a little.
-- KEYS[1]: the bucket hash. ARGV: op ('take' | 'throttle'), maximum per second.
-- Returns {ms to wait before sending (0 for throttle), the rate in thousandths per second}.
local key, op, max = KEYS[1], ARGV[1], tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local b = redis.call('HMGET', key, 'rate', 'next', 'at', 'cut')
local rate = math.min(max, tonumber(b[1]) or max)
local next_at = tonumber(b[2]) or now
local at = tonumber(b[3]) or now
local cut = tonumber(b[4]) or 0
rate = math.min(max, rate + max / 10 * math.max(0, now - at) / 1000)
local wait = 0
if op == 'throttle' then
  if now - cut >= 1000 then
    rate = math.max(max / 16, rate / 2)
    cut = now
  end
else
  local slot = math.max(next_at, now)
  wait = slot - now
  next_at = slot + 1000 / rate
end
redis.call('HSET', key, 'rate', rate, 'next', next_at, 'at', now, 'cut', cut)
redis.call('PEXPIRE', key, 3600 * 1000)
return {math.ceil(wait), math.floor(rate * 1000)}
