-- Admission: check every scope's budgets and windows, then reserve in all of them, atomically.
-- Settlements of earlier requests of the same tenant ride along (settled first), so that under
-- steady traffic a request costs one script call in all.
-- KEYS: per scope B, Z, W; then the settlements' keys (as settle.lua takes them).
-- ARGV[1]: now|rid|tokens|cost|pday|pmonth|lease_end|bucket_seconds|budget_ttl_ms|window_ttl_ms|
--   nscopes
-- ARGV[1 + s], per scope: budgeted|windowed|rpm|tpm|daily|monthly_tokens|monthly_cost|day_stamp|
--   month_stamp, then |seed_d|seed_mt|seed_mc when the caller read the scope's seed.
-- ARGV[2 + nscopes ...]: settlements, one each (as settle.lua takes them).
-- Returns one string (one reply to read, not an array of them): the verdict '|'-joined,
--   A|bucket|n1|k1|n2|k2...                 admitted (window use with this request)
--   R|scope|limit|used|held|wait|n1|k1...   refused (wait -1: none, or never)
--   U|scope|...                             these scopes must be seeded first
-- then '#' and the settlements' rows (as settle.lua returns them).
local h = split(ARGV[1])
local now, rid = tonumber(h[1]), h[2]
local tokens, cost = tonumber(h[3]), tonumber(h[4])
local pday, pmonth, lease_end = tonumber(h[5]), tonumber(h[6]), h[7]
local bs, budget_ttl, window_ttl = tonumber(h[8]), h[9], h[10]
local n = tonumber(h[11])
local bucket = math.floor(now / bs)

local settled = {}
local k = 3 * n + 1
for r = 2 + n, #ARGV do
  settled[#settled + 1], k = settle_one(ARGV[r], k)
end
local tail = '#' .. table.concat(settled, '/')

local scopes = {}
for s = 1, n do
  local a = split(ARGV[1 + s])
  local sc = {
    budgeted = a[1] == '1', windowed = a[2] == '1',
    rpm = tonumber(a[3]), tpm = tonumber(a[4]),
    daily = tonumber(a[5]), mtok = tonumber(a[6]), mcost = tonumber(a[7]),
    dstamp = a[8], mstamp = a[9],
    kb = KEYS[3 * s - 2], kz = KEYS[3 * s - 1], kw = KEYS[3 * s],
  }
  if a[10] then
    sc.seed = {d = tonumber(a[10]), mt = tonumber(a[11]), mc = tonumber(a[12])}
  end
  scopes[s] = sc
end

-- Budgets: seed, roll over, drop lapsed holds. Written back even when refusing.
local unseeded = {}
for s = 1, n do
  local sc = scopes[s]
  if sc.budgeted then
    local b = load_budget(sc.kb)
    local current = b.s and b.pd == pday and b.pm == pmonth and b.ed == sc.dstamp and b.em == sc.mstamp
    if current or prepare(b, sc, pday, pmonth) then
      if expire_holds(b, sc.kb, sc.kz, now) or not current then
        -- Seeded, rolled over or reset: the TTLs restart from here (at least once a day in use).
        save_budget(sc.kb, b, budget_ttl)
        redis.call('PEXPIRE', sc.kz, budget_ttl)
      end
      sc.b = b
    else
      unseeded[#unseeded + 1] = s
    end
  end
end
if #unseeded > 0 then
  return 'U|' .. table.concat(unseeded, '|') .. tail
end

local use = {}
for s = 1, n do
  local sc = scopes[s]
  if sc.windowed then
    sc.w = advance_window(sc.kw, bucket, window_ttl)
    use[#use + 1] = int(sc.w.n)
    use[#use + 1] = int(sc.w.k)
  else
    use[#use + 1] = '0'
    use[#use + 1] = '0'
  end
end

local function refuse(s, limit, used, held, wait)
  return table.concat({'R', s, limit, int(used), int(held), wait, table.concat(use, '|')}, '|') .. tail
end

for s = 1, n do
  local sc, b = scopes[s], scopes[s].b
  if b then
    if sc.daily > 0 and b.ud + b.hd >= sc.daily then return refuse(s, 'daily_tokens', b.ud, b.hd, '-1') end
    if sc.mtok > 0 and b.umt + b.hmt >= sc.mtok then return refuse(s, 'monthly_tokens', b.umt, b.hmt, '-1') end
    if sc.mcost > 0 and b.umc + b.hmc >= sc.mcost then return refuse(s, 'monthly_cost', b.umc, b.hmc, '-1') end
  end
end
for s = 1, n do
  local sc, w = scopes[s], scopes[s].w
  if w then
    if sc.rpm > 0 and w.n + 1 > sc.rpm then
      return refuse(s, 'rpm', w.n, 0, flt(wait_for(sc.kw, w, bucket, 'r', w.n + 1 - sc.rpm, bs, now)))
    end
    if sc.tpm > 0 and w.k + tokens > sc.tpm then
      local wait = '-1'
      if tokens <= sc.tpm then wait = flt(wait_for(sc.kw, w, bucket, 't', w.k + tokens - sc.tpm, bs, now)) end
      return refuse(s, 'tpm', w.k, 0, wait)
    end
  end
end

-- Reserve.
local out = {'A', int(bucket)}
for s = 1, n do
  local sc = scopes[s]
  local b, w = sc.b, sc.w
  if b then
    b.hd, b.hmt, b.hmc = b.hd + tokens, b.hmt + tokens, b.hmc + cost
    redis.call('HSET', sc.kb, 'hd', int(b.hd), 'hmt', int(b.hmt), 'hmc', int(b.hmc),
      'x:' .. rid, int(tokens) .. '|' .. int(cost) .. '|' .. int(b.pd) .. '|' .. int(b.pm))
    redis.call('ZADD', sc.kz, lease_end, rid)
  end
  if w then
    redis.call('HINCRBY', sc.kw, 'r' .. int(bucket), 1)
    redis.call('HINCRBY', sc.kw, 't' .. int(bucket), tokens)
    w.n = redis.call('HINCRBY', sc.kw, 'n', 1)
    w.k = redis.call('HINCRBY', sc.kw, 'k', tokens)
    out[#out + 1] = int(w.n)
    out[#out + 1] = int(w.k)
  else
    out[#out + 1] = '0'
    out[#out + 1] = '0'
  end
end
return table.concat(out, '|') .. tail
