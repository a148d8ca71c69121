-- Raise one window's limit.
-- KEYS: c:<counter>, counters.  ARGV: prefix, the 9 counter arguments (see _lib), amount.
ensure_counter(KEYS[1], KEYS[2], 2)
redis.call('HINCRBY', KEYS[1], 'credit', ARGV[2 + COUNTER_ARGS])
return 1
