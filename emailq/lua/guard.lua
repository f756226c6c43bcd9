-- Claim an Idempotency-Key for a whole batch: remember the batch's fingerprint if the key is
-- new. Returns false when it was new, else the fingerprint stored the first time.
-- ARGV[5..]: record key, fingerprint, ttl s
local stored = redis.call('HGET', ARGV[5], 'fingerprint')
if stored then return stored end
redis.call('HSET', ARGV[5], 'fingerprint', ARGV[6], 'created', now_ms())
redis.call('EXPIRE', ARGV[5], tonumber(ARGV[7]))
return false
