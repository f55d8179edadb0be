-- Shared by every balancer script: redis_state.py prepends it to each one at load time.
-- It mirrors gateway/balancer/memory.py and breaker.py line for line in meaning; the test
-- suite runs the same cases against both. Definitions: gateway/balancer/contract.py.
--
-- Per deployment (4 keys, passed in KEYS so the scripts declare everything they touch):
--   log   ZSET reservation id -> time it counts from (a sliding log; every window reads it)
--   tok   HASH reservation id -> tokens it holds in the token window
--   s     HASH tsum (tokens over the log), last_t, cool, fails, open_until, probe,
--              probe_until, ur/ur_at/ur_used, ut/ut_at/ut_used (the upstream's word)
--   infl  ZSET reservation id -> time it is forgotten if never settled (in flight)
-- Per queue (6 keys; a change of head is PUBLISHed as "<queue>\n<ticket>", and so is an
-- evicted ticket, to wake its waiter):
--   z ZSET score priority, member "<round:15>:<seq:15>:<ticket>" (equal scores sort by member)
--   t HASH ticket -> "priority|lease seconds|member|tenant"
--   l ZSET ticket -> lease deadline
--   m HASH seq, n:<priority> (depth), v:<priority> (round served last)
--   r HASH l|<priority>|<tenant> (tenant's last round), w|<priority>|<tenant> (waiting)
--   e ZSET ticket -> tombstone expiry: tickets a better arrival evicted from the full queue

local INF = math.huge
local MIN_WAIT = 1e-6
local TIE = 1e-9

-- Lua turns numbers into strings with 14 significant digits: too few for epoch times.
local function fmt(x)
  if x == INF then return 'inf' end
  if x == -INF then return '-inf' end
  return string.format('%.17g', x)
end

local function num(x, default)
  local v = tonumber(x)
  if v == nil then return default end
  return v
end

local function read_config(argv, i)
  return {
    retention = tonumber(argv[i]), upstream_age = tonumber(argv[i + 1]),
    threshold = tonumber(argv[i + 2]), probe_seconds = tonumber(argv[i + 3]),
    inflight_ttl = tonumber(argv[i + 4]), key_ttl = tonumber(argv[i + 5]),
    open_seconds = tonumber(argv[i + 6]),
  }, i + 7
end

-- ARGV per candidate: weight, request_ref, token_ref, n windows, n x (unit, span, limit).
local function read_candidates(argv, i, keys, k)
  local n = tonumber(argv[i])
  i = i + 1
  local cands = {}
  for c = 1, n do
    local cand = {
      weight = tonumber(argv[i]), rref = tonumber(argv[i + 1]), tref = tonumber(argv[i + 2]),
      windows = {}, klog = keys[k], ktok = keys[k + 1], ks = keys[k + 2], kinfl = keys[k + 3],
    }
    local nwin = tonumber(argv[i + 3])
    i = i + 4
    for w = 1, nwin do
      cand.windows[w] = {unit = argv[i], span = tonumber(argv[i + 1]), limit = tonumber(argv[i + 2])}
      i = i + 3
    end
    k = k + 4
    cands[c] = cand
  end
  return cands, i
end

local S_FIELDS = {'tsum', 'last_t', 'cool', 'fails', 'open_until', 'probe', 'probe_until',
                  'ur', 'ur_at', 'ur_used', 'ut', 'ut_at', 'ut_used'}

local function load_dep(ks)
  local v = redis.call('HMGET', ks, unpack(S_FIELDS))
  return {
    tsum = num(v[1], 0), last_t = num(v[2], -INF), cool = num(v[3], 0), fails = num(v[4], 0),
    open_until = num(v[5], 0), probe = v[6], probe_until = num(v[7], 0),
    ur = tonumber(v[8]), ur_at = num(v[9], 0), ur_used = num(v[10], 0),
    ut = tonumber(v[11]), ut_at = num(v[12], 0), ut_used = num(v[13], 0),
  }
end

-- Drop entries that left the longest window (t <= cut), keeping tsum in step. In chunks:
-- unpack() has a stack limit, and a long-idle deployment may have many to drop.
local function prune_log(c, cut)
  local freed = 0
  while true do
    local old = redis.call('ZRANGE', c.klog, '-inf', fmt(cut), 'BYSCORE', 'LIMIT', 0, 500)
    if #old == 0 then break end
    local toks = redis.call('HMGET', c.ktok, unpack(old))
    for i = 1, #toks do freed = freed + num(toks[i], 0) end
    redis.call('ZREM', c.klog, unpack(old))
    redis.call('HDEL', c.ktok, unpack(old))
    if #old < 500 then break end
  end
  if freed ~= 0 then redis.call('HINCRBY', c.ks, 'tsum', fmt(-freed)) end
end

-- When `need` units of window w (entries with t > cut) will have expired, oldest first.
local function free_at(c, w, cut, need)
  if w.unit == 'r' then
    local e = redis.call('ZRANGE', c.klog, '(' .. fmt(cut), '+inf', 'BYSCORE', 'LIMIT', need - 1, 1, 'WITHSCORES')
    if #e == 0 then return INF end
    return tonumber(e[2]) + w.span
  end
  local freed, offset = 0, 0
  while true do
    local e = redis.call('ZRANGE', c.klog, '(' .. fmt(cut), '+inf', 'BYSCORE', 'LIMIT', offset, 200, 'WITHSCORES')
    if #e == 0 then return INF end
    local ids = {}
    for j = 1, #e, 2 do ids[#ids + 1] = e[j] end
    local toks = redis.call('HMGET', c.ktok, unpack(ids))
    for j = 1, #ids do
      freed = freed + num(toks[j], 0)
      if freed >= need then return tonumber(e[2 * j]) + w.span end
    end
    offset = offset + #ids
  end
end

-- (fits now, wait, headroom) of 1 request + `demand` tokens; see state.py for definitions.
local function evaluate(c, d, now, demand, cfg)
  local fits, wait, head = true, 0, 1.0
  if d.cool > now then
    fits, wait = false, d.cool - now
  end
  if d.fails >= cfg.threshold then
    local blocked = 0
    if now < d.open_until then
      blocked = d.open_until
    elseif d.probe and now < d.probe_until then
      blocked = d.probe_until
    end
    if blocked > now then
      fits, wait = false, math.max(wait, blocked - now)
    end
  end
  for _, w in ipairs(c.windows) do
    local need = demand
    if w.unit == 'r' then need = 1 end
    if need > w.limit then return false, INF, -INF end
    local cut = now - w.span
    local left, frac
    if w.unit == 'r' then
      left = w.limit - redis.call('ZCOUNT', c.klog, '(' .. fmt(cut), '+inf')
      frac = left / w.limit
      left = left - 1
    else
      left = w.limit - d.tsum - demand
      frac = left / w.limit
    end
    if left < 0 then
      fits, wait = false, math.max(wait, free_at(c, w, cut, -left) - now)
    end
    if frac < head then head = frac end
  end
  local age = cfg.upstream_age
  if d.ur and now < d.ur_at + age then
    local left = d.ur - d.ur_used
    if left < 1 then fits, wait = false, math.max(wait, d.ur_at + age - now) end
    head = math.min(head, left / math.max(d.ur, c.rref, 1))
  end
  if d.ut and now < d.ut_at + age then
    local left = d.ut - d.ut_used - demand
    if left < 0 then fits, wait = false, math.max(wait, d.ut_at + age - now) end
    head = math.min(head, left / math.max(d.ut, c.tref, 1))
  end
  if not fits and wait < MIN_WAIT then wait = MIN_WAIT end
  return fits, wait, head
end

-- (index or nil, its headroom, soonest wait). Loads each candidate's state into c.d.
local function choose(cands, now, demand, cfg, rand)
  local best, ties, soonest, heads = -INF, {}, INF, {}
  for i, c in ipairs(cands) do
    prune_log(c, now - cfg.retention)
    c.d = load_dep(c.ks)
    local fits, wait, head = evaluate(c, c.d, now, demand, cfg)
    if not fits then
      if wait < soonest then soonest = wait end
    else
      heads[i] = head
      local s = head - 2
      if c.weight > 0 then s = c.weight * head end
      if s > best + TIE then
        best, ties = s, {i}
      elseif s >= best - TIE then
        ties[#ties + 1] = i
      end
    end
  end
  if #ties == 0 then return nil, 0, soonest end
  local pick = ties[1]
  if #ties > 1 then pick = ties[math.floor(rand * #ties) + 1] end
  return pick, heads[pick], 0
end

local function expire_dep(c, d, now, cfg)
  local ms = math.ceil(cfg.key_ttl * 1000)
  redis.call('PEXPIRE', c.klog, ms)
  redis.call('PEXPIRE', c.ktok, ms)
  redis.call('PEXPIRE', c.kinfl, ms)
  local keep = math.max(cfg.key_ttl, d.cool - now + 60, d.open_until - now + 60)
  redis.call('PEXPIRE', c.ks, math.ceil(keep * 1000))
end

-- Record the reservation; returns (time it counts from, 1 if it is the half-open probe).
local function reserve(c, d, rid, now, demand, cfg)
  local t = now
  if d.last_t > t then t = d.last_t end  -- keep the log ordered; an entry only counts longer
  redis.call('ZADD', c.klog, fmt(t), rid)
  redis.call('HSET', c.ktok, rid, fmt(demand))
  redis.call('ZREMRANGEBYSCORE', c.kinfl, '-inf', fmt(now))
  redis.call('ZADD', c.kinfl, fmt(now + cfg.inflight_ttl), rid)
  local upd = {'tsum', fmt(d.tsum + demand), 'last_t', fmt(t)}
  if d.ur and t >= d.ur_at then
    upd[#upd + 1] = 'ur_used'; upd[#upd + 1] = fmt(d.ur_used + 1)
  end
  if d.ut and t >= d.ut_at then
    upd[#upd + 1] = 'ut_used'; upd[#upd + 1] = fmt(d.ut_used + demand)
  end
  local probe = 0
  if d.fails >= cfg.threshold then
    probe = 1
    upd[#upd + 1] = 'probe'; upd[#upd + 1] = rid
    upd[#upd + 1] = 'probe_until'; upd[#upd + 1] = fmt(now + cfg.probe_seconds)
  end
  redis.call('HSET', c.ks, unpack(upd))
  expire_dep(c, d, now, cfg)
  return t, probe
end

-- Queue ---------------------------------------------------------------------------------

-- `channel` and `name`: where to announce a new head (redis_state.py wakes its waiter).
local function qkeys(keys, k, channel, name)
  return {z = keys[k], t = keys[k + 1], l = keys[k + 2], m = keys[k + 3], r = keys[k + 4],
          e = keys[k + 5], channel = channel, name = name}
end

local function q_parse(info)
  local p, lease, member, tenant = string.match(info, '^([^|]*)|([^|]*)|([^|]*)|(.*)$')
  return p, tonumber(lease), member, tenant
end

local function q_remove(q, ticket, served)
  local info = redis.call('HGET', q.t, ticket)
  if not info then return false end
  local p, _, member, tenant = q_parse(info)
  redis.call('ZREM', q.z, member)
  redis.call('HDEL', q.t, ticket)
  redis.call('ZREM', q.l, ticket)
  if redis.call('HINCRBY', q.m, 'n:' .. p, -1) <= 0 then redis.call('HDEL', q.m, 'n:' .. p) end
  local wk = 'w|' .. p .. '|' .. tenant
  if redis.call('HINCRBY', q.r, wk, -1) <= 0 then redis.call('HDEL', q.r, wk) end
  if served then
    local rnd = tonumber(string.sub(member, 1, 15))
    if rnd > num(redis.call('HGET', q.m, 'v:' .. p), 0) then
      redis.call('HSET', q.m, 'v:' .. p, fmt(rnd))
    end
  end
  return true
end

-- Drop tickets whose lease ran out (their process died), so the queue never jams; and
-- tombstones of evicted tickets past their expiry.
local function q_prune(q, now)
  redis.call('ZREMRANGEBYSCORE', q.e, '-inf', fmt(now))
  while true do
    local gone = redis.call('ZRANGE', q.l, '-inf', fmt(now), 'BYSCORE', 'LIMIT', 0, 100)
    for _, ticket in ipairs(gone) do q_remove(q, ticket, false) end
    if #gone < 100 then return end
  end
end

local function q_ticket(member)
  return string.match(member, '^[^:]*:[^:]*:(.*)$')
end

local function q_head(q)
  local first = redis.call('ZRANGE', q.z, 0, 0)[1]
  if not first then return nil end
  return q_ticket(first)
end

-- Tell the new head's process, if the head changed, so its waiter need not poll to learn it.
local function q_announce(q, before)
  local head = q_head(q)
  if head and head ~= before and q.channel ~= '' then
    redis.call('PUBLISH', q.channel, q.name .. '\n' .. head)
  end
end

local function q_expire(q, cfg)
  local ms = math.ceil(cfg.key_ttl * 1000)
  for _, key in ipairs({q.z, q.t, q.l, q.m, q.r, q.e}) do redis.call('PEXPIRE', key, ms) end
end
