-- The account's limits and their version, one consistent snapshot (Store.limits on a Cluster).
-- KEYS: limits, limits:v.  ARGV: none.
-- Returns {version ('0' if never set), flattened HGETALL of limits}.
return {redis.call('GET', KEYS[2]) or '0', redis.call('HGETALL', KEYS[1])}
