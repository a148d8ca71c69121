-- Set a counter's spent and count (reconcile --repair).
-- KEYS: c:<counter>, counters.  ARGV: prefix, the 9 counter arguments (see _lib), spent, count.
ensure_counter(KEYS[1], KEYS[2], 2)
redis.call('HSET', KEYS[1], 'spent', ARGV[2 + COUNTER_ARGS], 'count', ARGV[3 + COUNTER_ARGS])
return 1
