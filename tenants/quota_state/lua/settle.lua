-- Settlement: replace a reservation with what the request used (or release it), atomically.
-- KEYS: per scope B, Z, W.
-- ARGV: rid, tokens, cost, reserved_tokens, dispatched, pday, pmonth, bucket, nscopes,
--       then per scope 4 values: budgeted, windowed, day_stamp, month_stamp.
-- Returns per scope {ok, ud, umt, umc}: ok 1 when the scope's counters are the reservation's periods'.
local rid, tokens, cost = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local reserved, dispatched = tonumber(ARGV[4]), ARGV[5] == '1'
local pday, pmonth, bucket = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local n = tonumber(ARGV[9])

local out = {}
local i = 10
for s = 1, n do
  local budgeted, windowed = ARGV[i] == '1', ARGV[i + 1] == '1'
  local dstamp, mstamp = ARGV[i + 2], ARGV[i + 3]
  local kb, kz, kw = KEYS[3 * s - 2], KEYS[3 * s - 1], KEYS[3 * s]
  i = i + 4
  local row = {0, 0, 0, 0}
  if budgeted then
    local b = load_budget(kb)
    -- A lost hash (emptied Redis) is not recreated here: its absence is what asks for seeding.
    if b.s then
      local hold = redis.call('HGET', kb, 'x:' .. rid)
      if hold then
        unhold(b, hold)
        redis.call('HDEL', kb, 'x:' .. rid)
      end
      redis.call('ZREM', kz, rid)
      -- Counted only into the periods it was admitted in, and not across an admin's reset.
      if pday == b.pd and dstamp == b.ed then b.ud = b.ud + tokens end
      if pmonth == b.pm and mstamp == b.em then
        b.umt = b.umt + tokens
        b.umc = b.umc + cost
      end
      redis.call('HSET', kb, 'ud', int(b.ud), 'umt', int(b.umt), 'umc', int(b.umc),
        'hd', int(b.hd), 'hmt', int(b.hmt), 'hmc', int(b.hmc))
      if pday == b.pd and pmonth == b.pm then row = {1, int(b.ud), int(b.umt), int(b.umc)} end
    end
  end
  if windowed then
    local lo = tonumber(redis.call('HGET', kw, 'lo'))
    if lo ~= nil and bucket >= lo then
      if dispatched then
        redis.call('HINCRBY', kw, 't' .. int(bucket), tokens - reserved)
        redis.call('HINCRBY', kw, 'k', tokens - reserved)
      else
        redis.call('HINCRBY', kw, 'r' .. int(bucket), -1)
        redis.call('HINCRBY', kw, 'n', -1)
        redis.call('HINCRBY', kw, 't' .. int(bucket), -reserved)
        redis.call('HINCRBY', kw, 'k', -reserved)
      end
    end
  end
  out[s] = row
end
return out
