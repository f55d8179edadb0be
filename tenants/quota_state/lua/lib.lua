-- Shared by every quota script: tenants/quota_state/redis.py prepends it to each one at load
-- time. It mirrors tenants/quota_state/memory.py in meaning, and the test suite runs the same
-- cases against both. Definitions: tenants/quota_state/contract.py.
--
-- Per scope (a tenant, or one key), 3 keys, all hash-tagged with the tenant ({t<id>}) so that
-- one request's scopes live in one Redis Cluster slot:
--   B  HASH  s (seeded), pd/pm (day/month period ids), ed/em (reset stamps they were seeded
--            under), ud/umt/umc (used: day tokens, month tokens, month cost units),
--            hd/hmt/hmc (held by requests in flight), x:<reservation> "tokens|cost|pd|pm"
--   Z  ZSET  reservation -> lease end (a dead process's holds are dropped after it)
--   W  HASH  lo (oldest bucket counted), n/k (requests/tokens over the window),
--            r<bucket>/t<bucket> (requests/tokens per bucket)

local BUCKETS = 60

local function num(x, default)
  local v = tonumber(x)
  if v == nil then return default end
  return v
end

-- Integers as text without an exponent (Lua prints 14 significant digits otherwise).
local function int(x)
  return string.format('%.0f', x)
end

local function flt(x)
  return string.format('%.17g', x)
end

local B_FIELDS = {'s', 'pd', 'pm', 'ed', 'em', 'ud', 'umt', 'umc', 'hd', 'hmt', 'hmc'}

local function load_budget(kb)
  local v = redis.call('HMGET', kb, unpack(B_FIELDS))
  return {
    s = v[1], pd = num(v[2], 0), pm = num(v[3], 0), ed = v[4] or '', em = v[5] or '',
    ud = num(v[6], 0), umt = num(v[7], 0), umc = num(v[8], 0),
    hd = num(v[9], 0), hmt = num(v[10], 0), hmc = num(v[11], 0),
  }
end

local function save_budget(kb, b, ttl_ms)
  redis.call('HSET', kb, 's', '1', 'pd', int(b.pd), 'pm', int(b.pm), 'ed', b.ed, 'em', b.em,
    'ud', int(b.ud), 'umt', int(b.umt), 'umc', int(b.umc),
    'hd', int(b.hd), 'hmt', int(b.hmt), 'hmc', int(b.hmc))
  redis.call('PEXPIRE', kb, ttl_ms)
end

local function parse_hold(text)
  local tok, cost, pd, pm = string.match(text, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)$')
  return num(tok, 0), num(cost, 0), num(pd, 0), num(pm, 0)
end

local function unhold(b, text)
  local tok, cost, pd, pm = parse_hold(text)
  if pd == b.pd then b.hd = math.max(b.hd - tok, 0) end
  if pm == b.pm then
    b.hmt = math.max(b.hmt - tok, 0)
    b.hmc = math.max(b.hmc - cost, 0)
  end
end

-- Seed, roll over or check the reset stamps; false when the scope must be seeded first.
-- sc: {dstamp, mstamp, seed = nil | {d, mt, mc}}
local function prepare(b, sc, pday, pmonth)
  if not b.s then
    if not sc.seed then return false end
    b.s = '1'
    b.pd, b.pm, b.ed, b.em = pday, pmonth, sc.dstamp, sc.mstamp
    b.ud, b.umt, b.umc = sc.seed.d, sc.seed.mt, sc.seed.mc
    b.hd, b.hmt, b.hmc = 0, 0, 0
    return true
  end
  local ok = true
  if b.pd < pday then
    b.pd, b.ud, b.hd, b.ed = pday, 0, 0, sc.dstamp
  elseif b.ed ~= sc.dstamp then
    if sc.seed then b.ud, b.ed = sc.seed.d, sc.dstamp else ok = false end
  end
  if b.pm < pmonth then
    b.pm, b.em = pmonth, sc.mstamp
    b.umt, b.umc, b.hmt, b.hmc = 0, 0, 0, 0
  elseif b.em ~= sc.mstamp then
    if sc.seed then b.umt, b.umc, b.em = sc.seed.mt, sc.seed.mc, sc.mstamp else ok = false end
  end
  return ok
end

local function expire_holds(b, kb, kz, now)
  local lapsed = redis.call('ZRANGEBYSCORE', kz, '-inf', flt(now), 'LIMIT', 0, 64)
  for _, rid in ipairs(lapsed) do
    local hold = redis.call('HGET', kb, 'x:' .. rid)
    if hold then
      unhold(b, hold)
      redis.call('HDEL', kb, 'x:' .. rid)
    end
    redis.call('ZREM', kz, rid)
  end
end

-- The window with the buckets that stopped counting dropped (mutates W).
local function advance_window(kw, bucket)
  local v = redis.call('HMGET', kw, 'lo', 'n', 'k')
  local w = {lo = tonumber(v[1]), n = num(v[2], 0), k = num(v[3], 0)}
  local new_lo = bucket - BUCKETS
  if w.lo == nil or new_lo - w.lo > BUCKETS then
    if w.lo ~= nil then redis.call('DEL', kw) end
    w.lo, w.n, w.k = new_lo, 0, 0
    redis.call('HSET', kw, 'lo', int(new_lo), 'n', '0', 'k', '0')
  elseif w.lo < new_lo then
    local fields = {}
    for b = w.lo, new_lo - 1 do
      fields[#fields + 1] = 'r' .. int(b)
      fields[#fields + 1] = 't' .. int(b)
    end
    local vals = redis.call('HMGET', kw, unpack(fields))
    for j = 1, #fields, 2 do
      w.n = w.n - num(vals[j], 0)
      w.k = w.k - num(vals[j + 1], 0)
    end
    redis.call('HDEL', kw, unpack(fields))
    w.lo = new_lo
    redis.call('HSET', kw, 'lo', int(new_lo), 'n', int(w.n), 'k', int(w.k))
  end
  return w
end

-- The window as it counts at `bucket`, read only.
local function peek_window(kw, bucket)
  local v = redis.call('HMGET', kw, 'lo', 'n', 'k')
  local w = {lo = tonumber(v[1]), n = num(v[2], 0), k = num(v[3], 0)}
  local new_lo = bucket - BUCKETS
  if w.lo == nil or new_lo - w.lo > BUCKETS then
    return {lo = new_lo, n = 0, k = 0}
  end
  if w.lo < new_lo then
    local fields = {}
    for b = w.lo, new_lo - 1 do
      fields[#fields + 1] = 'r' .. int(b)
      fields[#fields + 1] = 't' .. int(b)
    end
    local vals = redis.call('HMGET', kw, unpack(fields))
    for j = 1, #fields, 2 do
      w.n = w.n - num(vals[j], 0)
      w.k = w.k - num(vals[j + 1], 0)
    end
  end
  return w
end

-- Seconds until the oldest buckets holding `excess` units (field prefix 'r' or 't') stop counting.
local function wait_for(kw, w, bucket, prefix, excess, bs, now)
  local fields = {}
  for b = w.lo, bucket do fields[#fields + 1] = prefix .. int(b) end
  local vals = redis.call('HMGET', kw, unpack(fields))
  local freed = 0
  for j = 1, #fields do
    freed = freed + num(vals[j], 0)
    if freed >= excess then
      return math.max((w.lo + j - 1 + BUCKETS + 1) * bs - now, 0.001)
    end
  end
  return math.max((bucket + BUCKETS + 1) * bs - now, 0.001)
end
