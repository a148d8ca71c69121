-- Shared helpers: RedisStore prepends this file to every other script before SCRIPT LOAD.
--
-- Keys. Every key of an account starts with the account prefix `<prefix>:{<account>}:` (ARGV[1]
-- of each script), whose hash tag puts them all in one Cluster slot. Scripts declare in KEYS what
-- the caller knows up front; keys named only inside Redis (the counters of a reservation being
-- refunded, the idempotency record a reservation points back to) are derived from that prefix,
-- so they are always in the same slot as the declared ones.
--
-- Numbers. Money stays a decimal string end to end: HINCRBY does the 64-bit arithmetic, and
-- comparisons split values into hi * 1e9 + lo so doubles (exact only below 2^53) never round.
-- Numbers are never passed back to redis.call as Lua numbers (they would be formatted with
-- %.14g); times and TTLs come from ARGV as strings too.

local BASE = 1000000000

-- A decimal integer string (or false/nil for a missing field) as hi, lo: value = hi * BASE + lo.
local function split(s)
  if not s then return 0, 0 end
  local negative = string.sub(s, 1, 1) == '-'
  if negative then s = string.sub(s, 2) end
  local n = string.len(s)
  local hi, lo = 0, 0
  if n > 9 then
    hi = tonumber(string.sub(s, 1, n - 9))
    lo = tonumber(string.sub(s, n - 8))
  else
    lo = tonumber(s)
  end
  if negative then return -hi, -lo end
  return hi, lo
end

-- Sign (-1, 0, 1) of hi * BASE + lo, for sums of a few split values (all exact small doubles).
local function sign(hi, lo)
  local carry = math.floor(lo / BASE)
  hi = hi + carry
  lo = lo - carry * BASE -- now 0 <= lo < BASE, so hi decides unless it is 0
  if hi > 0 then return 1 elseif hi < 0 then return -1 end
  if lo > 0 then return 1 end
  return 0
end

-- hi * BASE + lo (>= 0, a sum of a few split values) as a decimal string.
local function join(hi, lo)
  local carry = math.floor(lo / BASE)
  hi = hi + carry
  lo = lo - carry * BASE
  if hi == 0 then return string.format('%d', lo) end
  return string.format('%d', hi) .. string.format('%09d', lo)
end

-- The negation of a decimal string (HINCRBY rejects "-0").
local function negate(s)
  if s == '0' then return '0' end
  if string.sub(s, 1, 1) == '-' then return string.sub(s, 2) end
  return '-' .. s
end

-- Never shorten a TTL: it is computed from the caller's clock, which may lag another broker's.
local function expire_at_least(key, ttl)
  local current = redis.call('PTTL', key)
  if current == -1 or (current >= 0 and current < tonumber(ttl)) then
    redis.call('PEXPIRE', key, ttl)
  end
end

-- Counter arguments, at ARGV[m]: key suffix, ttl ms, index score, scope, period, window,
-- currency, start_ms, end_ms (9 values). Creates the hash with its metadata and indexes it.
local COUNTER_ARGS = 9
local function ensure_counter(key, index_key, m)
  if redis.call('EXISTS', key) == 0 then
    redis.call('HSET', key, 'scope', ARGV[m + 3], 'period', ARGV[m + 4], 'window', ARGV[m + 5],
      'currency', ARGV[m + 6], 'start_ms', ARGV[m + 7], 'end_ms', ARGV[m + 8],
      'spent', '0', 'reserved', '0', 'credit', '0', 'count', '0')
    redis.call('ZADD', index_key, ARGV[m + 2], ARGV[m])
  end
  expire_at_least(key, ARGV[m + 1])
end

-- Delete an idempotency record only if it is still the open one of this reservation.
local function forget_open(prefix, ik, rid)
  if not ik then return end
  local key = prefix .. 'i:' .. ik
  local v = redis.call('HMGET', key, 'state', 'rid')
  if v[1] == 'open' and v[2] == rid then redis.call('DEL', key) end
end

-- Why the account's data is not what the caller has seen of it (nil if it is). The identity hash
-- `<prefix>id` (id, gen) is written once, when the account's data is first initialised; an empty
-- want_id means the caller has seen none yet and checks nothing.
local function identity_problem(prefix, want_id, want_gen)
  if want_id == '' then return nil end
  local v = redis.call('HMGET', prefix .. 'id', 'id', 'gen')
  if not v[1] then return 'the store has no identity for this account (emptied, or a new store)' end
  if v[1] ~= want_id then return "the store's identity is " .. v[1] .. ', not ' .. want_id .. ' (another store)' end
  if tonumber(v[2]) < tonumber(want_gen) then
    return 'the store is at generation ' .. v[2] .. ', older than generation ' .. want_gen ..
      ' seen before (restored from an older copy)'
  end
  return nil
end

-- A counter whose spent is below the floor the caller has seen (nil if none is).
local function floor_problem(key, floor)
  local spent = redis.call('HGET', key, 'spent') or '0'
  local sh, sl = split(spent)
  local fh, fl = split(floor)
  if sign(sh - fh, sl - fl) < 0 then
    return 'counter ' .. key .. ' shows ' .. spent .. ' spent, below the ' .. floor .. ' seen before'
  end
  return nil
end

-- A reservation with an intent, as handed over to roll it forward:
-- {rid, ik, intent, created, expires, owner, attempts, number of done parts, then part, answer...}
local function unsettled_reply(prefix, rid)
  local r = redis.call('HMGET', prefix .. 'r:' .. rid, 'ik', 'intent', 'created', 'expires', 'owner',
    'attempts', 'done')
  local out = {rid, r[1], r[2], r[3], r[4], r[5] or '', r[6] or '0'}
  local parts = {}
  for part in string.gmatch(r[7] or '', '%S+') do parts[#parts + 1] = part end
  out[#out + 1] = tostring(#parts)
  for _, part in ipairs(parts) do
    out[#out + 1] = part
    out[#out + 1] = redis.call('HGET', prefix .. 'r:' .. rid, 'd:' .. part) or ''
  end
  return out
end

-- Give an expired reservation with an intent to the caller: a lease until `expires`. The taker
-- owns it from now on (a restart of the broker that made it must not reclaim it any more).
local function hand_over(prefix, rid, exp_key, expires, taker)
  local rkey = prefix .. 'r:' .. rid
  redis.call('HSET', rkey, 'expires', expires)
  if taker and taker ~= '' then redis.call('HSET', rkey, 'owner', taker) end
  redis.call('HINCRBY', rkey, 'attempts', '1')
  redis.call('ZADD', exp_key, expires, rid)
  return unsettled_reply(prefix, rid)
end

-- Give back everything a reservation holds and forget it (and its open idempotency record).
-- Returns the reservation's fields {ik, created, holds} or nil if it was already gone.
local function refund(prefix, rid, exp_key)
  redis.call('ZREM', exp_key, rid)
  local rkey = prefix .. 'r:' .. rid
  local r = redis.call('HMGET', rkey, 'ik', 'created', 'holds')
  if not r[3] then return nil end
  for ck, amount in string.gmatch(r[3], '(%S+) (%S+)') do
    local key = prefix .. 'c:' .. ck
    -- A counter that already expired stays gone: HINCRBY would recreate it without metadata.
    if redis.call('EXISTS', key) == 1 then
      redis.call('HINCRBY', key, 'reserved', negate(amount))
    end
  end
  redis.call('DEL', rkey)
  forget_open(prefix, r[1], rid)
  return r
end

-- A ledger line at ARGV[m]: scope, period, window, currency, amount, original_amount,
-- original_currency, exchange, offer_id, uri (10 values).
local LINE_ARGS = 10
local function append_ledger(ledger_key, m, ik, rid, reserved_at, now, kind)
  redis.call('XADD', ledger_key, '*',
    'scope', ARGV[m], 'period', ARGV[m + 1], 'window', ARGV[m + 2], 'currency', ARGV[m + 3],
    'amount', ARGV[m + 4], 'original_amount', ARGV[m + 5], 'original_currency', ARGV[m + 6],
    'exchange', ARGV[m + 7], 'offer_id', ARGV[m + 8], 'uri', ARGV[m + 9],
    'idempotency_key', ik, 'reservation_id', rid, 'reserved_at_ms', reserved_at,
    'committed_at_ms', now, 'kind', kind)
end
