-- Reconciliation: raise seeded counters to what the usage records show (never lower them).
-- KEYS: per scope B. ARGV: pday, pmonth, nscopes, then per scope day_stamp, month_stamp,
-- day_tokens, month_tokens, month_cost (the records' totals). Returns how many counters rose.
local pday, pmonth, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local raised = 0
for s = 1, n do
  local j = 4 + 5 * (s - 1)
  local dstamp, mstamp = ARGV[j], ARGV[j + 1]
  local d, mt, mc = tonumber(ARGV[j + 2]), tonumber(ARGV[j + 3]), tonumber(ARGV[j + 4])
  local kb = KEYS[s]
  local b = load_budget(kb)
  if b.s then
    if b.pd == pday and b.ed == dstamp and d > b.ud then
      redis.call('HSET', kb, 'ud', int(d))
      raised = raised + 1
    end
    if b.pm == pmonth and b.em == mstamp then
      if mt > b.umt then
        redis.call('HSET', kb, 'umt', int(mt))
        raised = raised + 1
      end
      if mc > b.umc then
        redis.call('HSET', kb, 'umc', int(mc))
        raised = raised + 1
      end
    end
  end
end
return raised
