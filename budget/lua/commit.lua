-- Commit, for one or more requests of one account, in order.
-- KEYS: exp, ledger, counters, then per request: i:<idempotency key>, r:<reservation id>,
--       c:<counter> for each hold.
-- ARGV: prefix, number of requests, then per request: reservation id, idempotency key, result,
--       now_ms, idempotency record ttl ms, number of holds, number of lines, then per hold the
--       9 counter arguments (see _lib) followed by the spend to add, then per line the 10 line
--       arguments (see _lib).
-- Returns per request {'dup'} or {'ok', late ('1'/'0'), the reservation's holds ("key amount ..."),
-- then per hold the counter after the commit: spent, reserved, credit, count}.
local prefix = ARGV[1]
local exp_key, ledger_key, index_key = KEYS[1], KEYS[2], KEYS[3]
local HOLD_ARGS = COUNTER_ARGS + 1

local function commit_one(k, a)
  local ikey, rkey = KEYS[k], KEYS[k + 1]
  local rid, ik, result, now, ittl = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  local n, lines = tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6])
  local first_key, first_arg = k + 2, a + 7

  if redis.call('HGET', ikey, 'state') == 'committed' then return {'dup'} end

  -- Settle the reservation if it is still there; a late commit (swept already) just records.
  local r = refund(prefix, rid, exp_key)
  local reserved_at, held = now, ''
  if r then reserved_at, held = r[2], r[3] end

  for i = 0, n - 1 do
    local key, m = KEYS[first_key + i], first_arg + i * HOLD_ARGS
    ensure_counter(key, index_key, m)
    redis.call('HINCRBY', key, 'spent', ARGV[m + COUNTER_ARGS])
    redis.call('HINCRBY', key, 'count', '1')
  end
  local line0 = first_arg + n * HOLD_ARGS
  for j = 0, lines - 1 do
    append_ledger(ledger_key, line0 + j * LINE_ARGS, ik, rid, reserved_at, now, 'commit')
  end
  redis.call('DEL', ikey)
  redis.call('HSET', ikey, 'state', 'committed', 'rid', rid, 'result', result)
  redis.call('PEXPIRE', ikey, ittl)
  local out = {'ok', r and '0' or '1', held}
  for i = 0, n - 1 do
    local v = redis.call('HMGET', KEYS[first_key + i], 'spent', 'reserved', 'credit', 'count')
    for f = 1, 4 do out[#out + 1] = v[f] or '0' end
  end
  return out
end

local out = {}
local k, a = 4, 3
for q = 1, tonumber(ARGV[2]) do
  local n, lines = tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6])
  out[q] = commit_one(k, a)
  k = k + 2 + n
  a = a + 7 + n * HOLD_ARGS + lines * LINE_ARGS
end
return out
