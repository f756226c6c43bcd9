-- Store one worker's breaker state for the stats: KEYS[1] its key, ARGV[1] the state's JSON,
-- ARGV[2] its TTL in ms (it lapses with the worker).
-- DEL first: Redis refuses a script at maxmemory only at its first write that can grow
-- memory (see finish.lua). A plain SET was refused there, and a full Redis, when operators
-- look at the relay most, read "no worker reports". What this may add at maxmemory is one
-- small key per live worker (a new worker's first), each expiring with its TTL.
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
