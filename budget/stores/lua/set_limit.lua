-- Record an operator's limit ("CUR units", or "-" for removed) and bump the version.
-- KEYS: limits, limits:v.  ARGV: prefix, "<scope>|<period>", value.  Returns the new version.
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
return redis.call('INCR', KEYS[2])
