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

-- The hot scripts take their numbers '|'-joined, one argument per scope: packing and sending
-- each argument costs the client more than splitting them here costs Redis.
local function split(text)
  local out = {}
  for part in string.gmatch(text, '[^|]+') do out[#out + 1] = part end
  return out
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

-- Drop holds whose lease ended (their process died); true when any was dropped.
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
  return #lapsed > 0
end

-- The window with the buckets that stopped counting dropped (mutates W; its TTL restarts
-- whenever the oldest bucket moves, so at most once per bucket).
local function advance_window(kw, bucket, ttl_ms)
  local v = redis.call('HMGET', kw, 'lo', 'n', 'k')
  local w = {lo = tonumber(v[1]), n = num(v[2], 0), k = num(v[3], 0)}
  local new_lo = bucket - BUCKETS
  if w.lo ~= nil and w.lo >= new_lo then
    return w  -- the same bucket as the last request (or a clock a little behind)
  end
  if w.lo == nil or new_lo - w.lo > BUCKETS then
    if w.lo ~= nil then redis.call('DEL', kw) end
    w.lo, w.n, w.k = new_lo, 0, 0
    redis.call('HSET', kw, 'lo', int(new_lo), 'n', '0', 'k', '0')
  else
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
  redis.call('PEXPIRE', kw, ttl_ms)
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

-- Settle one reservation, given as its '|'-joined argument, whose scopes' keys start at KEYS[k]:
-- the hold is dropped and what the request used is counted (or, when no upstream took it, it
-- leaves the windows). Returns the per-scope rows ("ok,ud,umt,umc" joined by ';') and the next k.
local function settle_one(text, k)
  local a = split(text)
  local rid, tokens, cost = a[1], tonumber(a[2]), tonumber(a[3])
  local reserved, dispatched = tonumber(a[4]), a[5] == '1'
  local pday, pmonth, bucket = tonumber(a[6]), tonumber(a[7]), tonumber(a[8])
  local n = tonumber(a[9])
  local i = 10
  local rows = {}
  for s = 1, n do
    local budgeted, windowed = a[i] == '1', a[i + 1] == '1'
    local dstamp, mstamp = a[i + 2], a[i + 3]
    local kb, kz, kw = KEYS[k], KEYS[k + 1], KEYS[k + 2]
    i, k = i + 4, k + 3
    local row = '0,0,0,0'
    if budgeted then
      local b = load_budget(kb)
      -- A lost hash (emptied Redis) is not recreated here: its absence is what asks for seeding.
      if b.s then
        local hold = redis.call('HGET', kb, 'x:' .. rid)
        if hold then
          unhold(b, hold)
          redis.call('HDEL', kb, 'x:' .. rid)
          redis.call('ZREM', kz, rid)
        end
        -- Counted only into the periods it was admitted in, and not across an admin's reset.
        if pday == b.pd and dstamp == b.ed then b.ud = b.ud + tokens end
        if pmonth == b.pm and mstamp == b.em then
          b.umt = b.umt + tokens
          b.umc = b.umc + cost
        end
        redis.call('HSET', kb, 'ud', int(b.ud), 'umt', int(b.umt), 'umc', int(b.umc),
          'hd', int(b.hd), 'hmt', int(b.hmt), 'hmc', int(b.hmc))
        if pday == b.pd and pmonth == b.pm then row = '1,' .. int(b.ud) .. ',' .. int(b.umt) .. ',' .. int(b.umc) end
      end
    end
    if windowed then
      local lo = tonumber(redis.call('HGET', kw, 'lo'))
      if lo ~= nil and bucket >= lo then
        if dispatched then
          if tokens ~= reserved then
            redis.call('HINCRBY', kw, 't' .. int(bucket), tokens - reserved)
            redis.call('HINCRBY', kw, 'k', tokens - reserved)
          end
        else
          redis.call('HINCRBY', kw, 'r' .. int(bucket), -1)
          redis.call('HINCRBY', kw, 'n', -1)
          redis.call('HINCRBY', kw, 't' .. int(bucket), -reserved)
          redis.call('HINCRBY', kw, 'k', -reserved)
        end
      end
    end
    rows[s] = row
  end
  return table.concat(rows, ';'), k
end
