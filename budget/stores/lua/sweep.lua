-- Refund up to `batch` expired reservations without an intent, and hand over up to `batch` with one
-- (expired, or with `reclaim` any of the taker's own): each gets expires = now_ms + lease_ms *
-- 2^min(attempts so far, doublings), a lease that doubles with every hand-over (backoff).
-- KEYS: exp.  ARGV: prefix, now_ms, batch, lease_ms, taker, reclaim ('1'/'0'), doublings.
-- Returns {refunded, number handed over, then each one's <unsettled_reply> (see _lib), flattened
-- with its length first}.
local prefix, now, batch = ARGV[1], ARGV[2], tonumber(ARGV[3])
local lease, doublings = tonumber(ARGV[4]), tonumber(ARGV[7])
local taker, reclaim = ARGV[5], ARGV[6] == '1'
local refunded, taken = 0, {}

local function take(rid)
  local attempts = tonumber(redis.call('HGET', prefix .. 'r:' .. rid, 'attempts') or '0')
  -- Exact integers: lease * 2^k stays far below 2^53 for any lease in ms.
  local expires = string.format('%d', tonumber(now) + lease * 2 ^ math.min(attempts, doublings))
  local reply = hand_over(prefix, rid, KEYS[1], expires, taker)
  taken[#taken + 1] = tostring(#reply)
  for _, v in ipairs(reply) do taken[#taken + 1] = v end
end

local handed, given = 0, {}
-- Page through the expired, each page after what earlier pages left in range (a refund leaves it,
-- a hand-over moves it past now unless the lease is 0), so refunds and hand-overs each get up to
-- `batch` however the two kinds are interleaved.
local offset = 0
for _ = 1, 64 do
  if handed >= batch and refunded >= batch then break end
  local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', tostring(offset), tostring(batch))
  if #ids == 0 then break end
  for _, rid in ipairs(ids) do
    local intent = redis.call('HGET', prefix .. 'r:' .. rid, 'intent')
    if intent and intent ~= '' then
      if handed < batch and not given[rid] then
        take(rid)
        given[rid] = true
        handed = handed + 1
      end
    elseif refunded < batch then
      if refund(prefix, rid, KEYS[1]) then refunded = refunded + 1 end
    end
    local score = redis.call('ZSCORE', KEYS[1], rid)
    if score and tonumber(score) <= tonumber(now) then offset = offset + 1 end
  end
end
if reclaim then
  -- A restarted broker: none of its own holds is in flight any more, expired or not.
  for _, rid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')) do
    if handed >= batch then break end
    local r = redis.call('HMGET', prefix .. 'r:' .. rid, 'intent', 'owner')
    if r[1] and r[1] ~= '' and r[2] == taker and not given[rid] then
      take(rid)
      given[rid] = true
      handed = handed + 1
    end
  end
end
local out = {tostring(refunded), tostring(handed)}
for _, v in ipairs(taken) do out[#out + 1] = v end
return out
