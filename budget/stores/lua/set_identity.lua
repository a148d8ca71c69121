-- Initialise the account's identity if it has none (or, with replace, overwrite it).
-- KEYS: id.  ARGV: id, generation, replace ('1'/'0').  Returns the identity now: {id, generation}.
if ARGV[3] == '1' or redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'id', ARGV[1], 'gen', ARGV[2])
end
return redis.call('HMGET', KEYS[1], 'id', 'gen')
