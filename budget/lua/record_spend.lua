-- Record spend without a reservation (a fail-open journal replay), once per idempotency key.
-- KEYS: i:<idempotency key>, ledger, counters, then c:<counter> for each hold.
-- ARGV: prefix, idempotency key, now_ms, kind, idempotency record ttl ms, number of holds,
--       number of lines, then per hold the 9 counter arguments (see _lib) followed by the spend
--       to add, then per line the 10 line arguments (see _lib).
-- Returns 1, or 0 (changing nothing) when the key was already committed.
local ikey, ledger_key, index_key = KEYS[1], KEYS[2], KEYS[3]
local ik, now, kind, ittl = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local n, lines = tonumber(ARGV[6]), tonumber(ARGV[7])
local HOLD_ARGS = COUNTER_ARGS + 1

if redis.call('HGET', ikey, 'state') == 'committed' then return 0 end
for i = 0, n - 1 do
  local key, m = KEYS[4 + i], 8 + i * HOLD_ARGS
  ensure_counter(key, index_key, m)
  redis.call('HINCRBY', key, 'spent', ARGV[m + COUNTER_ARGS])
  redis.call('HINCRBY', key, 'count', '1')
end
local line0 = 8 + n * HOLD_ARGS
for j = 0, lines - 1 do
  append_ledger(ledger_key, line0 + j * LINE_ARGS, ik, '', now, now, kind)
end
-- An open reservation of this key (if any) keeps its hold until released or swept; its record
-- is replaced by this marker so the key reads as settled from now on.
redis.call('DEL', ikey)
redis.call('HSET', ikey, 'state', 'committed', 'rid', '', 'result', '')
redis.call('PEXPIRE', ikey, ittl)
return 1
