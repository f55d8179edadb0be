-- What the admin shows: each scope's window use and budget counters, read only.
-- KEYS: per scope B, Z, W. ARGV: now, bucket_seconds, pday, pmonth, nscopes, then per scope
-- day_stamp, month_stamp.
-- Returns per scope {n, k, seeded, ud, umt, umc, hmt, hmc}.
local now, bs = tonumber(ARGV[1]), tonumber(ARGV[2])
local pday, pmonth, n = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local bucket = math.floor(now / bs)
local out = {}
for s = 1, n do
  local dstamp, mstamp = ARGV[4 + 2 * s], ARGV[5 + 2 * s]
  local kb, kw = KEYS[3 * s - 2], KEYS[3 * s]
  local w = peek_window(kw, bucket)
  local row = {int(w.n), int(w.k), 0, '0', '0', '0', '0', '0'}
  local b = load_budget(kb)
  if b.s then
    local day_ok = b.pd == pday and b.ed == dstamp
    local month_ok = b.pm == pmonth and b.em == mstamp
    if day_ok and month_ok then row[3] = 1 end
    if day_ok then row[4] = int(b.ud) end
    if month_ok then
      row[5], row[6], row[7], row[8] = int(b.umt), int(b.umc), int(b.hmt), int(b.hmc)
    end
  end
  out[s] = row
end
return out
