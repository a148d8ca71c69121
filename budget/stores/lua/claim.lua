-- Claim a once-only marker: held until its expire_at (the caller's clock), then claimable again.
-- KEYS: k:<name>.  ARGV: prefix, now_ms, expire_at_ms, key ttl ms.
-- Returns 1 for the claimer, 0 while an earlier claim holds.
-- The key's TTL only cleans up (relative, with slack, never shortened): whether a claim still
-- holds is decided by the stored expire_at against now_ms, never by Redis's own clock.
local held = redis.call('HGET', KEYS[1], 'expire_at')
if held and tonumber(held) > tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 'expire_at', ARGV[3])
expire_at_least(KEYS[1], ARGV[4])
return 1
