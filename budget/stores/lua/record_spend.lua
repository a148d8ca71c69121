-- Record spend without a reservation (a fail-open journal replay), once per idempotency key.
-- KEYS: i:<idempotency key>, ledger, counters, then c:<counter> for each hold.
-- ARGV: prefix, idempotency key, now_ms, kind, idempotency record ttl ms, number of holds,
--       number of lines, expected identity id ('' checks nothing), expected generation, the key's
--       answer (kept for replay; may be empty), then per
--       hold the 9 counter arguments (see _lib) followed by the spend to add, then per line the 10
--       line arguments (see _lib).
-- Returns 1, 0 (changing nothing) when the key was already committed, or {'lost', problem}.
local ikey, ledger_key, index_key = KEYS[1], KEYS[2], KEYS[3]
local ik, now, kind, ittl = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local n, lines = tonumber(ARGV[6]), tonumber(ARGV[7])
local HOLD_ARGS = COUNTER_ARGS + 1
local FIRST = 11

local lost = identity_problem(ARGV[1], ARGV[8], ARGV[9])
if lost then return {'lost', lost} end
local record = redis.call('HMGET', ikey, 'state', 'rid')
if record[1] == 'committed' then return 0 end
-- The key's own reservation, if still open, is settled by this spend: its hold goes back.
local reserved_at, rid = now, ''
if record[1] == 'open' then
  local r = refund(ARGV[1], record[2], ARGV[1] .. 'exp')
  if r then reserved_at, rid = r[2], record[2] end
end
for i = 0, n - 1 do
  local key, m = KEYS[4 + i], FIRST + i * HOLD_ARGS
  ensure_counter(key, index_key, m)
  redis.call('HINCRBY', key, 'spent', ARGV[m + COUNTER_ARGS])
  redis.call('HINCRBY', key, 'count', '1')
end
local line0 = FIRST + n * HOLD_ARGS
for j = 0, lines - 1 do
  append_ledger(ledger_key, line0 + j * LINE_ARGS, ik, rid, reserved_at, now, kind)
end
redis.call('DEL', ikey)
redis.call('HSET', ikey, 'state', 'committed', 'rid', rid, 'result', ARGV[10])
redis.call('PEXPIRE', ikey, ittl)
return 1
