-- An operator ends a broker's leases (Store.release_leases): each given back to its counter, or
-- with as_spent counted as spent (one ledger line per counter, kind "lease-expired"); then the
-- broker's records are forgotten.
-- KEYS: lb:<broker>, lc:<broker>, ledger.  ARGV: prefix, broker, as_spent ('1'/'0'), now_ms.
-- Returns how much was released, summed over counters, as a decimal string.
local prefix, broker, as_spent, now = ARGV[1], ARGV[2], ARGV[3] == '1', ARGV[4]

-- Nano-units (a non-negative decimal string) as money text: "1.50", "0.005", "0.00".
local function units_text(s)
  local n = string.len(s)
  local whole, frac = '0', string.rep('0', 9 - n) .. s
  if n > 9 then whole, frac = string.sub(s, 1, n - 9), string.sub(s, n - 8) end
  frac = (string.gsub(frac, '0+$', ''))
  while string.len(frac) < 2 do frac = frac .. '0' end
  return whole .. '.' .. frac
end

local counters = redis.call('SMEMBERS', KEYS[2])
table.sort(counters)
local th, tl = 0, 0
for _, ck in ipairs(counters) do
  local ckey, hkey = prefix .. 'c:' .. ck, prefix .. 'lh:' .. ck
  local granted = redis.call('HGET', hkey, broker)
  redis.call('HDEL', hkey, broker)
  -- A counter that already expired stays gone: HINCRBY would recreate it without metadata.
  if granted and redis.call('EXISTS', ckey) == 1 then
    redis.call('HINCRBY', ckey, 'reserved', negate(granted))
    if redis.call('HINCRBY', ckey, 'leased', negate(granted)) == 0 then
      redis.call('HSET', ckey, 'reclaim_until', '0') -- nobody holds a lease to give back any more
    end
    if as_spent and granted ~= '0' then
      -- One line standing for the whole lease: what the broker may have spent from it.
      redis.call('HINCRBY', ckey, 'spent', granted)
      redis.call('HINCRBY', ckey, 'count', '1')
      local c = redis.call('HMGET', ckey, 'scope', 'period', 'window', 'currency')
      redis.call('XADD', KEYS[3], '*',
        'scope', c[1], 'period', c[2], 'window', c[3], 'currency', c[4], 'amount', granted,
        'original_amount', units_text(granted), 'original_currency', c[4], 'exchange', '',
        'offer_id', '', 'uri', '', 'idempotency_key', 'lease:' .. broker, 'reservation_id', '',
        'reserved_at_ms', now, 'committed_at_ms', now, 'kind', 'lease-expired')
    end
    local gh, gl = split(granted)
    th, tl = th + gh, tl + gl
  end
end
redis.call('DEL', KEYS[1], KEYS[2])
return join(th, tl)
