-- Admission: check every scope's budgets and windows, then reserve in all of them, atomically.
-- KEYS: per scope B, Z, W.
-- ARGV: now, rid, tokens, cost, pday, pmonth, lease_end, bucket_seconds, budget_ttl_ms,
--       window_ttl_ms, nscopes, then per scope 13 values: budgeted, windowed, rpm, tpm, daily,
--       monthly_tokens, monthly_cost, day_stamp, month_stamp, has_seed, seed_d, seed_mt, seed_mc.
-- Returns {'A', bucket, n1, k1, n2, k2, ...}       admitted (window use with this request)
--         {'R', scope, limit, used, held, wait, n1, k1, ...}  refused (wait '-1': none / never)
--         {'U', scope, ...}                        these scopes must be seeded first
local now, rid = tonumber(ARGV[1]), ARGV[2]
local tokens, cost = tonumber(ARGV[3]), tonumber(ARGV[4])
local pday, pmonth, lease_end = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7]
local bs, budget_ttl, window_ttl = tonumber(ARGV[8]), ARGV[9], ARGV[10]
local n = tonumber(ARGV[11])
local bucket = math.floor(now / bs)

local scopes = {}
local i = 12
for s = 1, n do
  local sc = {
    budgeted = ARGV[i] == '1', windowed = ARGV[i + 1] == '1',
    rpm = tonumber(ARGV[i + 2]), tpm = tonumber(ARGV[i + 3]),
    daily = tonumber(ARGV[i + 4]), mtok = tonumber(ARGV[i + 5]), mcost = tonumber(ARGV[i + 6]),
    dstamp = ARGV[i + 7], mstamp = ARGV[i + 8],
    kb = KEYS[3 * s - 2], kz = KEYS[3 * s - 1], kw = KEYS[3 * s],
  }
  if ARGV[i + 9] == '1' then
    sc.seed = {d = tonumber(ARGV[i + 10]), mt = tonumber(ARGV[i + 11]), mc = tonumber(ARGV[i + 12])}
  end
  scopes[s] = sc
  i = i + 13
end

-- Budgets: seed, roll over, drop lapsed holds. Written back even when refusing.
local unseeded = {}
for s = 1, n do
  local sc = scopes[s]
  if sc.budgeted then
    local b = load_budget(sc.kb)
    if prepare(b, sc, pday, pmonth) then
      expire_holds(b, sc.kb, sc.kz, now)
      save_budget(sc.kb, b, budget_ttl)
      sc.b = b
    else
      unseeded[#unseeded + 1] = s
    end
  end
end
if #unseeded > 0 then
  return {'U', unpack(unseeded)}
end

local use = {}
for s = 1, n do
  local sc = scopes[s]
  if sc.windowed then
    sc.w = advance_window(sc.kw, bucket)
    redis.call('PEXPIRE', sc.kw, window_ttl)
    use[#use + 1] = sc.w.n
    use[#use + 1] = sc.w.k
  else
    use[#use + 1] = 0
    use[#use + 1] = 0
  end
end

local function refuse(s, limit, used, held, wait)
  return {'R', s, limit, int(used), int(held), wait, unpack(use)}
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
    redis.call('PEXPIRE', sc.kz, budget_ttl)
  end
  if w then
    redis.call('HINCRBY', sc.kw, 'r' .. int(bucket), 1)
    redis.call('HINCRBY', sc.kw, 't' .. int(bucket), tokens)
    w.n = redis.call('HINCRBY', sc.kw, 'n', 1)
    w.k = redis.call('HINCRBY', sc.kw, 'k', tokens)
    out[#out + 1] = w.n
    out[#out + 1] = w.k
  else
    out[#out + 1] = 0
    out[#out + 1] = 0
  end
end
return out
