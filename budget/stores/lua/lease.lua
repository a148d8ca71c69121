-- Refresh one broker's leases (Store.lease): report its spends, then give back and re-lease each
-- asked counter, all in one step.
-- KEYS: limits:v, counters, ledger, lb:<broker>, lc:<broker>, then per ask: c:<counter>,
--       lh:<counter>, then per spend: i:<idempotency key>.
-- ARGV: prefix, broker, seq, now_ms, the broker's expires (now_ms + ttl), broker record ttl ms,
--       reclaim until (now_ms + RECLAIM_MS), limits version, expected identity id ('' checks
--       nothing), expected generation, idempotency record ttl ms, number of asks, number of spends,
--       then per ask the 9 counter arguments (see _lib) followed by want, limit and floor, then per
--       spend: idempotency key, result, number of lines, then per line its hold (ask) index
--       followed by the 10 line arguments (see _lib).
-- Returns {'lost', problem}, {'stale', version}, or {'ok' or 'replay', the broker's seq now, number
--       of duplicate keys, the duplicate keys, then per ask: granted, spent, reserved, credit,
--       count, leased, holders, reclaim ('1'/'0')}. 'replay': seq was not above the broker's last
--       one, nothing was changed.
local prefix, broker, seq, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local expires, broker_ttl, reclaim_until = ARGV[5], ARGV[6], ARGV[7]
local want_version, want_id, want_gen, ittl = ARGV[8], ARGV[9], ARGV[10], ARGV[11]
local asks, spends = tonumber(ARGV[12]), tonumber(ARGV[13])
local index_key, ledger_key, broker_key, broker_counters = KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local ASK_ARGS = COUNTER_ARGS + 3
local FIRST_ARG, FIRST_KEY = 14, 6
local SPEND_KEY = FIRST_KEY + 2 * asks

local function ask_arg(i) return FIRST_ARG + i * ASK_ARGS end
local function counter_key(i) return KEYS[FIRST_KEY + 2 * i] end
local function holders_key(i) return KEYS[FIRST_KEY + 2 * i + 1] end

-- Per ask: the broker's lease there, the counter and how many brokers hold a lease on it.
local function grants(out)
  for i = 0, asks - 1 do
    local v = redis.call('HMGET', counter_key(i), 'spent', 'reserved', 'credit', 'count', 'leased',
      'reclaim_until')
    out[#out + 1] = redis.call('HGET', holders_key(i), broker) or '0'
    for f = 1, 5 do out[#out + 1] = v[f] or '0' end
    out[#out + 1] = tostring(redis.call('HLEN', holders_key(i)))
    out[#out + 1] = (v[6] and tonumber(v[6]) > tonumber(now)) and '1' or '0'
  end
  return out
end

local lost = identity_problem(prefix, want_id, want_gen)
if lost then return {'lost', lost} end
local version = redis.call('GET', KEYS[1]) or '0'
if version ~= want_version then return {'stale', version} end
for i = 0, asks - 1 do
  lost = floor_problem(counter_key(i), ARGV[ask_arg(i) + COUNTER_ARGS + 2])
  if lost then return {'lost', lost} end
end
local last = redis.call('HGET', broker_key, 'seq')
if last then
  local sh, sl = split(seq)
  local lh, ll = split(last)
  if sign(sh - lh, sl - ll) <= 0 then
    -- A refresh that landed unseen (or an older one): nothing changes, the current grants.
    return grants({'replay', last, '0'})
  end
end

for i = 0, asks - 1 do
  ensure_counter(counter_key(i), index_key, ask_arg(i))
end

-- Spends, each once per idempotency key: spent and ledger per line, count once per counter touched.
local duplicates = {}
local a = FIRST_ARG + asks * ASK_ARGS
for s = 0, spends - 1 do
  local ikey = KEYS[SPEND_KEY + s]
  local ik, result, lines = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  a = a + 3
  if redis.call('HGET', ikey, 'state') == 'committed' then
    duplicates[#duplicates + 1] = ik
    a = a + lines * (LINE_ARGS + 1)
  else
    local touched = {}
    for _ = 1, lines do
      local i = tonumber(ARGV[a])
      redis.call('HINCRBY', counter_key(i), 'spent', ARGV[a + 5])
      append_ledger(ledger_key, a + 1, ik, '', now, now, 'lease')
      touched[i] = true
      a = a + LINE_ARGS + 1
    end
    for i, _ in pairs(touched) do
      redis.call('HINCRBY', counter_key(i), 'count', '1')
    end
    redis.call('DEL', ikey)
    redis.call('HSET', ikey, 'state', 'committed', 'rid', '', 'result', result)
    redis.call('PEXPIRE', ikey, ittl)
  end
end

-- Per ask, in order: the old lease goes back, then min(want, remaining) is leased again.
for i = 0, asks - 1 do
  local ckey, hkey, m = counter_key(i), holders_key(i), ask_arg(i)
  local ck, ttl, want, limit = ARGV[m], ARGV[m + 1], ARGV[m + COUNTER_ARGS], ARGV[m + COUNTER_ARGS + 1]
  local old = redis.call('HGET', hkey, broker) or '0'
  if old ~= '0' then
    redis.call('HINCRBY', ckey, 'reserved', negate(old))
    redis.call('HINCRBY', ckey, 'leased', negate(old))
  end
  local v = redis.call('HMGET', ckey, 'spent', 'reserved', 'credit', 'leased', 'reclaim_until')
  local sh, sl = split(v[1])
  local rh, rl = split(v[2])
  local ch, cl = split(v[3])
  local lh, ll = split(limit)
  local wh, wl = split(want)
  local mh, ml = lh + ch - sh - rh, ll + cl - sl - rl -- room: limit + credit - spent - reserved
  local grant = want
  if sign(mh, ml) <= 0 then
    grant = '0'
  elseif sign(wh - mh, wl - ml) > 0 then
    grant = join(mh, ml)
  end
  local others = sign(split(v[4])) > 0 -- leases of other brokers on this counter
  if grant ~= '0' then
    redis.call('HINCRBY', ckey, 'reserved', grant)
    redis.call('HINCRBY', ckey, 'leased', grant)
    redis.call('HSET', hkey, broker, grant)
    expire_at_least(hkey, ttl)
    redis.call('SADD', broker_counters, ck)
  else
    redis.call('HDEL', hkey, broker)
    redis.call('SREM', broker_counters, ck)
  end
  if grant ~= want and others then
    -- Not granted in full while other brokers hold leases here: ask them to give back.
    if tonumber(v[5] or '0') < tonumber(reclaim_until) then
      redis.call('HSET', ckey, 'reclaim_until', reclaim_until)
    end
  end
  if grant == '0' and not others then
    redis.call('HSET', ckey, 'reclaim_until', '0') -- no lease left to reclaim from
  end
end

redis.call('HSET', broker_key, 'seq', seq, 'expires', expires)
expire_at_least(broker_key, broker_ttl)
if redis.call('EXISTS', broker_counters) == 1 then expire_at_least(broker_counters, broker_ttl) end
local out = {'ok', seq, tostring(#duplicates)}
for _, ik in ipairs(duplicates) do out[#out + 1] = ik end
return grants(out)
