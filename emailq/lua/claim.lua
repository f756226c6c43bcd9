-- Claim up to COUNT ready tasks (see claim_ready in _prelude.lua).
-- ARGV[5..]: count, lease ms, worker id, max attempts, ttl s, fair every, lanes (high first)
return claim_ready(claim_args(5), now_ms())
