-- Send failed tasks again, keeping their attempt log; each gets MAX_ATTEMPTS afresh.
-- Returns the ids requeued (a task that is not failed, or whose content is gone, is not).
-- ARGV[5..]: task ids
local now = now_ms()
local done = {}
for i = 5, #ARGV do
  local id = ARGV[i]
  local task = TASK .. id
  if redis.call('HGET', task, 'status') == 'failed' and redis.call('HEXISTS', task, 'job') == 1 then
    append_log(task, {at = now, attempt = 0, outcome = 'requeued'})
    redis.call('HSET', task, 'status', 'pending', 'attempts', 0, 'updated_at', now)
    redis.call('HDEL', task, 'reason', 'scheduled_at', 'outage_since')  -- expires_at stays: a stale code stays stale
    redis.call('PERSIST', task)
    redis.call('ZREM', K_FAILED, id)
    -- Counted again, never refused: the job never left Redis, so this adds no memory.
    charge(task, redis.call('HGET', task, 'quota'), redis.call('HSTRLEN', task, 'job'))
    make_ready(redis.call('HGET', task, 'lane'), id, false)
    emit('requeued', id, now)
    done[#done + 1] = id
  end
end
return done
