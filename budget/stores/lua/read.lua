-- Counters of one account, one consistent snapshot (Store.read on a Cluster, where MULTI/EXEC is not
-- used: a script is atomic and routed by its keys like every other call).
-- KEYS: c:<counter> ...  ARGV: none.
-- Returns per key {spent, reserved, credit, count, leased}, false for a missing field.
local out = {}
for i, key in ipairs(KEYS) do
  out[i] = redis.call('HMGET', key, 'spent', 'reserved', 'credit', 'count', 'leased')
end
return out
