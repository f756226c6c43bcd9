-- Cancel a pending or scheduled task. Returns 'cancelled', 'sending' (a worker holds it:
-- too late), the final status it already has, or 'missing'.
-- ARGV[5..]: task id, ttl s
local id = ARGV[5]
local task = TASK .. id
local status = redis.call('HGET', task, 'status')
if not status then return 'missing' end
if status ~= 'pending' then return status end
if redis.call('HEXISTS', task, 'lease') == 1 then return 'sending' end
local now = now_ms()
redis.call('LREM', LANE .. redis.call('HGET', task, 'lane'), 0, id)
append_log(task, {at = now, attempt = tonumber(redis.call('HGET', task, 'attempts')),
                  outcome = 'cancelled'})
finish_task(id, 'failed', now, tonumber(ARGV[6]), 'cancelled', {type = 'cancelled'})
return 'cancelled'
