-- Commit one part of a reservation, for one or more requests of one account, in order.
-- KEYS: exp, ledger, counters, then per request: i:<idempotency key>, r:<reservation id>,
--       c:<counter> for each hold.
-- ARGV: prefix, number of requests, then per request: reservation id, idempotency key, result,
--       now_ms, idempotency record ttl ms, number of holds, number of lines, part, final ('1'/'0'),
--       release given ('1'/'0'), expected identity id ('' checks nothing), expected generation,
--       the reservation's number of parts, the parts that charged nothing (space-separated),
--       then per hold the 9 counter arguments (see _lib) followed by the spend to add, the amount
--       to release and the floor, then per line the 10 line arguments (see _lib).
-- Returns per request {'dup'}, {'lost', problem}, {'open', the other parts not settled (a final
-- commit that changed nothing)}, or {'ok', late ('1'/'0'), what this commit
-- released per hold ("key amount ..."), part done before ('1'/'0'), then per hold the counter after
-- the commit: spent, reserved, credit, count, leased}.
local prefix = ARGV[1]
local exp_key, ledger_key, index_key = KEYS[1], KEYS[2], KEYS[3]
local HOLD_ARGS = COUNTER_ARGS + 3
local REQUEST_ARGS = 14

local function commit_one(k, a)
  local ikey, rkey = KEYS[k], KEYS[k + 1]
  local rid, ik, result, now, ittl = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  local n, lines = tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6])
  local part, final, partial_release = ARGV[a + 7], ARGV[a + 8] == '1', ARGV[a + 9] == '1'
  local first_key, first_arg = k + 2, a + REQUEST_ARGS

  local lost = identity_problem(prefix, ARGV[a + 10], ARGV[a + 11])
  if lost then return {'lost', lost} end
  if redis.call('HGET', ikey, 'state') == 'committed' then
    -- Counted already (by another broker rolling it forward): what is still held goes back.
    refund(prefix, rid, exp_key)
    return {'dup'}
  end
  for i = 0, n - 1 do
    lost = floor_problem(KEYS[first_key + i], ARGV[first_arg + i * HOLD_ARGS + COUNTER_ARGS + 2])
    if lost then return {'lost', lost} end
  end

  local r = redis.call('HMGET', rkey, 'created', 'holds', 'done')
  local exists = r[2] ~= false and r[2] ~= nil
  local done_before = false
  if exists then
    for p in string.gmatch(r[3] or '', '%S+') do
      if p == part then done_before = true end
    end
  end
  local reserved_at = exists and r[1] or now

  if final and exists then
    -- A final commit settles only the parts it is told about: every other part must be committed
    -- (its spend recorded) or have charged nothing. Else its hold would be released unrecorded.
    local settled = {[part] = true}
    for p in string.gmatch(r[3] or '', '%S+') do settled[p] = true end
    for p in string.gmatch(ARGV[a + 13], '%S+') do settled[p] = true end
    local open = {}
    for p = 0, tonumber(ARGV[a + 12]) - 1 do
      if not settled[tostring(p)] then open[#open + 1] = tostring(p) end
    end
    if #open > 0 then return {'open', table.concat(open, ' ')} end
  end

  -- What the reservation still holds, per hold index, and what this commit gives back of it.
  local released = {}
  if exists then
    local words = {}
    for w in string.gmatch(r[2], '%S+') do words[#words + 1] = w end
    local remaining = {}
    for i = 0, n - 1 do
      local ck, has = words[2 * i + 1], words[2 * i + 2] or '0'
      local m = first_arg + i * HOLD_ARGS
      local give = has
      if not final and partial_release then
        local hh, hl = split(has)
        local wh, wl = split(ARGV[m + COUNTER_ARGS + 1])
        if sign(wh - hh, wl - hl) < 0 then give = ARGV[m + COUNTER_ARGS + 1] end
      end
      if ck ~= ARGV[m] then give = '0' end -- not this hold's counter: it holds nothing here
      if done_before and not final then give = '0' end -- committed before: nothing again
      local key = KEYS[first_key + i]
      if give ~= '0' and redis.call('EXISTS', key) == 1 then
        redis.call('HINCRBY', key, 'reserved', negate(give))
      end
      released[#released + 1] = ARGV[m]
      released[#released + 1] = give
      if ck then
        remaining[#remaining + 1] = ck
        -- has - give, as a decimal string (HINCRBY-free arithmetic on split values)
        local hh, hl = split(has)
        local gh, gl = split(give)
        local dh, dl = hh - gh, hl - gl
        if dl < 0 then dh, dl = dh - 1, dl + BASE end
        remaining[#remaining + 1] = dh == 0 and tostring(dl) or (tostring(dh) .. string.format('%09d', dl))
      end
    end
    if final then
      redis.call('HSET', rkey, 'holds', '')
      refund(prefix, rid, exp_key) -- holds nothing now: forgets it and its open record
    elseif not done_before then
      redis.call('HSET', rkey, 'holds', table.concat(remaining, ' '), 'done', (r[3] or '') .. ' ' .. part,
        'd:' .. part, result)
    end
  end

  if not done_before then
    for i = 0, n - 1 do
      local key, m = KEYS[first_key + i], first_arg + i * HOLD_ARGS
      ensure_counter(key, index_key, m)
      redis.call('HINCRBY', key, 'spent', ARGV[m + COUNTER_ARGS])
    end
    local line0 = first_arg + n * HOLD_ARGS
    for j = 0, lines - 1 do
      append_ledger(ledger_key, line0 + j * LINE_ARGS, ik, rid, reserved_at, now, 'commit')
    end
  end
  if final then
    for i = 0, n - 1 do
      local key, m = KEYS[first_key + i], first_arg + i * HOLD_ARGS
      ensure_counter(key, index_key, m)
      redis.call('HINCRBY', key, 'count', '1')
    end
    redis.call('DEL', ikey)
    redis.call('HSET', ikey, 'state', 'committed', 'rid', rid, 'result', result)
    redis.call('PEXPIRE', ikey, ittl)
  end
  local out = {'ok', exists and '0' or '1', table.concat(released, ' '), done_before and '1' or '0'}
  for i = 0, n - 1 do
    local v = redis.call('HMGET', KEYS[first_key + i], 'spent', 'reserved', 'credit', 'count', 'leased')
    for f = 1, 5 do out[#out + 1] = v[f] or '0' end
  end
  return out
end

local out = {}
local k, a = 4, 3
for q = 1, tonumber(ARGV[2]) do
  local n, lines = tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6])
  out[q] = commit_one(k, a)
  k = k + 2 + n
  a = a + REQUEST_ARGS + n * HOLD_ARGS + lines * LINE_ARGS
end
return out
