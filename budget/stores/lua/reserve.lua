-- Reserve, for one or more requests of one account, each all or none, in order.
-- KEYS: limits:v, exp, counters, then per request: i:<idempotency key>, r:<reservation id>,
--       c:<counter> for each hold.
-- ARGV: prefix, number of requests, then per request: reservation id, idempotency key,
--       limits version, now_ms, expires_ms, reservation ttl ms, number of holds, intent, owner,
--       expected identity id ('' checks nothing), expected generation, reclaim until (now_ms +
--       RECLAIM_MS), then per hold the 9 counter arguments (see _lib) followed by amount, limit and
--       floor.
-- Returns per request one of: {'ok', rid, expires}, {'stale', version}, {'settled', result},
--       {'inflight', rid, expires}, {'denied', index, spent, reserved, credit, count, leased},
--       {'unsettled', <unsettled_reply>}, {'lost', problem}.
local prefix = ARGV[1]
local version = redis.call('GET', KEYS[1]) or '0'
local exp_key, index_key = KEYS[2], KEYS[3]
local HOLD_ARGS = COUNTER_ARGS + 3
local REQUEST_ARGS = 12

local function reserve_one(k, a)
  local ikey, rkey = KEYS[k], KEYS[k + 1]
  local rid, ik, want, now, expires, rttl = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4],
    ARGV[a + 5]
  local n = tonumber(ARGV[a + 6])
  local intent, owner, want_id, want_gen = ARGV[a + 7], ARGV[a + 8], ARGV[a + 9], ARGV[a + 10]
  local reclaim_until = ARGV[a + 11]
  local first_key, first_arg = k + 2, a + REQUEST_ARGS

  local lost = identity_problem(prefix, want_id, want_gen)
  if lost then return {'lost', lost} end
  if version ~= want then return {'stale', version} end

  local record = redis.call('HMGET', ikey, 'state', 'rid', 'result')
  if record[1] == 'committed' then return {'settled', record[3] or ''} end
  if record[1] == 'open' then
    local old = redis.call('HMGET', prefix .. 'r:' .. record[2], 'expires', 'intent')
    if old[1] and tonumber(old[1]) > tonumber(now) then
      return {'inflight', record[2], old[1]}
    end
    if old[1] and old[2] and old[2] ~= '' then
      -- It may have reached an Exchange: never refunded, never re-planned. Roll it forward.
      local reply = hand_over(prefix, record[2], exp_key, expires, owner)
      table.insert(reply, 1, 'unsettled')
      return reply
    end
    -- Expired (or its reservation vanished): refund it now; the key may reserve again.
    refund(prefix, record[2], exp_key)
    redis.call('DEL', ikey)
  end

  for i = 0, n - 1 do
    local m = first_arg + i * HOLD_ARGS
    lost = floor_problem(KEYS[first_key + i], ARGV[m + COUNTER_ARGS + 2])
    if lost then return {'lost', lost} end
  end

  -- Check every hold before touching anything. Holds on the same counter add up.
  local pending = {}
  for i = 0, n - 1 do
    local key, m = KEYS[first_key + i], first_arg + i * HOLD_ARGS
    local s = redis.call('HMGET', key, 'spent', 'reserved', 'credit', 'count', 'leased', 'reclaim_until')
    local p = pending[key] or {0, 0}
    local sh, sl = split(s[1])
    local rh, rl = split(s[2])
    local ch, cl = split(s[3])
    local ah, al = split(ARGV[m + COUNTER_ARGS])
    local lh, ll = split(ARGV[m + COUNTER_ARGS + 1])
    if sign(sh + rh + p[1] + ah - lh - ch, sl + rl + p[2] + al - ll - cl) > 0 then
      local gh, gl = split(s[5])
      if sign(gh, gl) > 0 and tonumber(s[6] or '0') < tonumber(reclaim_until) then
        -- Budget sits in brokers' leases while a purchase is denied: ask them back for a while.
        redis.call('HSET', key, 'reclaim_until', reclaim_until)
      end
      return {'denied', tostring(i), s[1] or '0', s[2] or '0', s[3] or '0', s[4] or '0', s[5] or '0'}
    end
    pending[key] = {p[1] + ah, p[2] + al}
  end

  local held = {}
  for i = 0, n - 1 do
    local key, m = KEYS[first_key + i], first_arg + i * HOLD_ARGS
    ensure_counter(key, index_key, m)
    redis.call('HINCRBY', key, 'reserved', ARGV[m + COUNTER_ARGS])
    held[#held + 1] = ARGV[m]
    held[#held + 1] = ARGV[m + COUNTER_ARGS]
  end
  redis.call('HSET', rkey, 'ik', ik, 'created', now, 'expires', expires, 'holds', table.concat(held, ' '),
    'intent', intent, 'owner', owner, 'attempts', '0', 'done', '')
  redis.call('PEXPIRE', rkey, rttl)
  redis.call('ZADD', exp_key, expires, rid)
  redis.call('HSET', ikey, 'state', 'open', 'rid', rid)
  redis.call('PEXPIRE', ikey, rttl)
  return {'ok', rid, expires}
end

local out = {}
local k, a = 4, 3
for q = 1, tonumber(ARGV[2]) do
  local n = tonumber(ARGV[a + 6])
  out[q] = reserve_one(k, a)
  k = k + 2 + n
  a = a + REQUEST_ARGS + n * HOLD_ARGS
end
return out
