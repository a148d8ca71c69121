-- Every broker's lease of the account (Store.leases; a read, one consistent snapshot).
-- KEYS: counters.  ARGV: prefix.
-- Returns, flattened, per lease: broker, granted, seq, expires, then its counter's scope, period,
-- window, currency, start_ms, end_ms (10 values). A broker whose record is gone shows seq and
-- expires 0.
local prefix = ARGV[1]
local out = {}
for _, ck in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local c = redis.call('HMGET', prefix .. 'c:' .. ck, 'scope', 'period', 'window', 'currency', 'start_ms',
    'end_ms')
  if c[1] then
    local held = redis.call('HGETALL', prefix .. 'lh:' .. ck)
    for j = 1, #held, 2 do
      local b = redis.call('HMGET', prefix .. 'lb:' .. held[j], 'seq', 'expires')
      out[#out + 1] = held[j]
      out[#out + 1] = held[j + 1]
      out[#out + 1] = b[1] or '0'
      out[#out + 1] = b[2] or '0'
      for f = 1, 6 do out[#out + 1] = c[f] end
    end
  end
end
return out
