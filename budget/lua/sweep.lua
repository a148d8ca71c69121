-- Refund up to `batch` reservations that expired at or before now_ms.
-- KEYS: exp.  ARGV: prefix, now_ms, batch.  Returns how many were refunded.
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2], 'LIMIT', '0', ARGV[3])
local refunded = 0
for _, rid in ipairs(ids) do
  if refund(ARGV[1], rid, KEYS[1]) then refunded = refunded + 1 end
end
return refunded
