-- Store a task and make it ready in one atomic step: 202 means stored.
-- KEYS: task hash, lane list, wake list
-- ARGV: task id, lane name, to, job json, request id
local now = now_ms()
redis.call('HSET', KEYS[1],
  'status', 'pending', 'to', ARGV[3], 'attempts', 0, 'lane', ARGV[2],
  'job', ARGV[4], 'request_id', ARGV[5], 'created_at', now, 'updated_at', now)
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('LPUSH', KEYS[3], '1')
return now
