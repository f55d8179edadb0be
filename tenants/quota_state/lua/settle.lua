-- Settlement of one or more reservations (a batch), each replaced with what its request used (or
-- released), atomically. The gateway batches the settlements of one tenant into one call.
-- KEYS: per reservation, per scope B, Z, W.
-- ARGV, one per reservation: rid|tokens|cost|reserved_tokens|dispatched|pday|pmonth|bucket|nscopes
--   then per scope budgeted|windowed|day_stamp|month_stamp.
-- Returns one string: per reservation (joined by '/'), per scope (joined by ';') ok,ud,umt,umc,
-- ok 1 when the scope's counters are the reservation's periods'.
local out = {}
local k = 1
for r = 1, #ARGV do
  out[r], k = settle_one(ARGV[r], k)
end
return table.concat(out, '/')
