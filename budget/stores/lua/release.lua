-- Release one reservation: refund every hold, forget it and its open idempotency record.
-- KEYS: r:<reservation id>, exp.  ARGV: prefix, reservation id.
-- Returns 1, or 0 if it was already gone.
if refund(ARGV[1], ARGV[2], KEYS[2]) then return 1 end
return 0
