-- Drop index entries whose counter hash has expired (checked here, atomically, so a counter
-- recreated since the caller looked keeps its entry).
-- KEYS: counters.  ARGV: prefix, counter key suffixes.  Returns how many were dropped.
local dropped = 0
for i = 2, #ARGV do
  if redis.call('EXISTS', ARGV[1] .. 'c:' .. ARGV[i]) == 0 then
    dropped = dropped + redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return dropped
