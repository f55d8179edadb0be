-- Shared by every balancer script: redis_state.py prepends it to each one at load time.
-- It mirrors gateway/balancer/memory.py and breaker.py line for line in meaning; the test
-- suite runs the same cases against both. Definitions: gateway/balancer/contract.py.
--
-- Per deployment (3 keys, passed in KEYS so the scripts declare everything they touch):
--   s     HASH last_t, cool, fails, fail_at (the last one's time), open_until, probe, probe_until, ur/ur_at/ur_used,
--              ut/ut_at/ut_used (the upstream's word), x (when the expiries are next renewed),
--              and per window <w> (r0, r1, r2: requests; k0: tokens; contract.py "Window"):
--              l<w> the oldest bucket counted, n<w> the units counted
--   b     HASH <w>:<bucket> the units reserved in one bucket of window <w> (about 41 per window
--              live at once), and '~' (keeps the key). Apart from s, so that the every-call
--              HMGET of s reads a small hash: Redis keeps hashes of up to 128 fields as a flat
--              list searched field by field, and one hash of both cost ~4x the CPU per call.
--   infl  ZSET reservation id -> time it is forgotten if never settled (in flight), and '~' at
--              +inf, which keeps the set from vanishing (with its expiry) when it empties
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

-- ARGV per candidate: weight, request_ref, token_ref, n windows, n x (name, unit, span, limit,
-- bucket seconds).
local function read_candidates(argv, i, keys, k)
  local n = tonumber(argv[i])
  i = i + 1
  local cands = {}
  for c = 1, n do
    local cand = {
      weight = tonumber(argv[i]), rref = tonumber(argv[i + 1]), tref = tonumber(argv[i + 2]),
      windows = {}, ks = keys[k], kb = keys[k + 1], kinfl = keys[k + 2],
    }
    local nwin = tonumber(argv[i + 3])
    i = i + 4
    for w = 1, nwin do
      cand.windows[w] = {name = argv[i], unit = argv[i + 1], span = tonumber(argv[i + 2]),
                         limit = tonumber(argv[i + 3]), bucket = tonumber(argv[i + 4])}
      i = i + 5
    end
    k = k + 3
    cands[c] = cand
  end
  return cands, i
end

local S_FIELDS = {'last_t', 'cool', 'fails', 'open_until', 'probe', 'probe_until',
                  'ur', 'ur_at', 'ur_used', 'ut', 'ut_at', 'ut_used', 'x'}
local NS = #S_FIELDS

local function int(x)
  return string.format('%.0f', x)
end

-- Move window w on to `now`: the buckets that stopped counting leave its sum (and the hash).
-- Each bucket leaves once, so this costs one HMGET + HDEL per bucket length at most; a window
-- idle for longer than its span starts again at zero.
local function advance(c, w, now)
  local lo = math.floor((now - w.span) / w.bucket)
  if w.lo == nil then  -- new: written by a reservation only (which sets the key's expiry)
    w.lo, w.n = lo, 0
    return
  end
  if lo <= w.lo then return end  -- the same bucket (or a clock a little behind)
  -- Its fields live in [w.lo, w.lo + buckets per span + 2]: writes go to the current bucket.
  local last = w.lo + math.ceil(w.span / w.bucket) + 3
  local gone = {}
  for b = w.lo, math.min(lo - 1, last) do gone[#gone + 1] = w.name .. ':' .. int(b) end
  if lo - 1 >= last then
    w.n = 0
  else
    local vals = redis.call('HMGET', c.kb, unpack(gone))
    for j = 1, #vals do w.n = w.n - num(vals[j], 0) end
  end
  redis.call('HDEL', c.kb, unpack(gone))
  w.lo, w.moved = lo, true
end

-- Read a deployment's hash (one HMGET) and move its windows on to `now`.
local function load_dep(c, now)
  local fields = {unpack(S_FIELDS)}
  for _, w in ipairs(c.windows) do
    fields[#fields + 1] = 'l' .. w.name
    fields[#fields + 1] = 'n' .. w.name
  end
  local v = redis.call('HMGET', c.ks, unpack(fields))
  local j = NS
  for _, w in ipairs(c.windows) do
    w.lo, w.n = tonumber(v[j + 1]), num(v[j + 2], 0)
    j = j + 2
    advance(c, w, now)
  end
  return {
    last_t = num(v[1], -INF), cool = num(v[2], 0), fails = num(v[3], 0),
    open_until = num(v[4], 0), probe = v[5], probe_until = num(v[6], 0),
    ur = tonumber(v[7]), ur_at = num(v[8], 0), ur_used = num(v[9], 0),
    ut = tonumber(v[10]), ut_at = num(v[11], 0), ut_used = num(v[12], 0),
    x = num(v[13], 0),
  }
end

-- The windows' bounds and sums (all, or those that moved), appended to HSET arguments `upd`.
local function window_fields(c, upd, all)
  for _, w in ipairs(c.windows) do
    if all or w.moved then
      upd[#upd + 1] = 'l' .. w.name; upd[#upd + 1] = int(w.lo)
      upd[#upd + 1] = 'n' .. w.name; upd[#upd + 1] = int(w.n)
    end
  end
  return upd
end

-- Write back windows that moved on without a reservation (a denial, a status read).
local function save_moved(c)
  local upd = window_fields(c, {}, false)
  if #upd > 0 then redis.call('HSET', c.ks, unpack(upd)) end
end

-- When `need` units of window w will have stopped counting, oldest bucket first.
local function free_at(c, w, now, last_t, need)
  local top = math.floor(math.max(now, last_t) / w.bucket)
  local fields = {}
  for b = w.lo, top do fields[#fields + 1] = w.name .. ':' .. int(b) end
  if #fields == 0 then return INF end
  local vals = redis.call('HMGET', c.kb, unpack(fields))
  local freed = 0
  for j = 1, #vals do
    freed = freed + num(vals[j], 0)
    if freed >= need then return (w.lo + j) * w.bucket + w.span end
  end
  return INF
end

-- (fits now, wait, headroom, held by its breaker) of 1 request + `demand` tokens; see
-- memory.py's _evaluate for definitions.
local function evaluate(c, d, now, demand, cfg)
  local fits, wait, head, broken = true, 0, 1.0, false
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
      fits, wait, broken = false, math.max(wait, blocked - now), true
    end
  end
  for _, w in ipairs(c.windows) do
    local need = demand
    if w.unit == 'r' then need = 1 end
    if need > w.limit then return false, INF, -INF, false end
    local left, frac
    if w.unit == 'r' then
      left = w.limit - w.n
      frac = left / w.limit
      left = left - 1
    else
      left = w.limit - w.n - demand
      frac = left / w.limit
    end
    if left < 0 then
      fits, wait = false, math.max(wait, free_at(c, w, now, d.last_t, -left) - now)
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
  return fits, wait, head, broken
end

-- (index or nil, its headroom, soonest wait, reason when none: 'capacity' | 'unhealthy' |
-- 'never'); as memory.py's _choose. Loads each candidate's state into c.d.
local function choose(cands, now, demand, cfg, rand)
  local best, ties, soonest, soonest_broken, heads = -INF, {}, INF, INF, {}
  for i, c in ipairs(cands) do
    c.d = load_dep(c, now)
    save_moved(c)
    local fits, wait, head, broken = evaluate(c, c.d, now, demand, cfg)
    if not fits then
      if broken then
        if wait < soonest_broken then soonest_broken = wait end
      elseif wait < soonest then
        soonest = wait
      end
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
  if #ties == 0 then
    if soonest < INF then return nil, 0, soonest, 'capacity' end
    if soonest_broken < INF then return nil, 0, soonest_broken, 'unhealthy' end
    return nil, 0, INF, 'never'
  end
  local pick = ties[1]
  if #ties > 1 then pick = ties[math.floor(rand * #ties) + 1] end
  return pick, heads[pick], 0, nil
end

-- Renew the deployment's expiries at most once every minute (not on every call): a key in use
-- never expires, an unused one goes key_ttl after its last renewal. The in-flight records of
-- dead processes are dropped at the same time. Appends to HSET arguments `upd`.
local function expiry_fields(c, d, now, cfg, upd)
  if now < d.x then return end
  local keep = math.max(cfg.key_ttl, d.cool - now + 60, d.open_until - now + 60)
  redis.call('PEXPIRE', c.ks, math.ceil(keep * 1000))
  redis.call('ZREMRANGEBYSCORE', c.kinfl, '-inf', fmt(now))
  -- A member that never leaves keeps each key (and so its expiry) when it empties: the next write
  -- would otherwise make a key without one until the next renewal.
  redis.call('ZADD', c.kinfl, 'inf', '~')
  redis.call('PEXPIRE', c.kinfl, math.ceil(cfg.key_ttl * 1000))
  redis.call('HSET', c.kb, '~', '1')
  redis.call('PEXPIRE', c.kb, math.ceil(cfg.key_ttl * 1000))
  upd[#upd + 1] = 'x'; upd[#upd + 1] = fmt(now + math.min(60, cfg.key_ttl / 4))
end

-- Record the reservation; returns (time it counts from, 1 if it is the half-open probe).
local function reserve(c, d, rid, now, demand, cfg)
  local t = now
  if d.last_t > t then t = d.last_t end  -- never before an earlier entry: it only counts longer
  for _, w in ipairs(c.windows) do
    local units = demand
    if w.unit == 'r' then units = 1 end
    if units ~= 0 then
      redis.call('HINCRBY', c.kb, w.name .. ':' .. int(math.floor(t / w.bucket)), units)
      w.n = w.n + units
    end
  end
  redis.call('ZADD', c.kinfl, fmt(now + cfg.inflight_ttl), rid)
  local upd = window_fields(c, {'last_t', fmt(t)}, true)
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
  expiry_fields(c, d, now, cfg, upd)
  redis.call('HSET', c.ks, unpack(upd))
  return t, probe
end

-- Settle or release one reservation of deployment c (ks, kb, kinfl; windows: name, unit, bucket),
-- once; with `ok`, also the deployment's good answer (closes its breaker). 1 if this call
-- finished the reservation, 0 if it was done.
local function finish(c, mode, rid, actual, provisioned, now, reserved, t, ok, retention, rbucket)
  local ks, kb = c.ks, c.kb
  -- The in-flight record is the "not yet finished" flag: removing it is what makes this once.
  local done = redis.call('ZREM', c.kinfl, rid) == 1
  if not done and not ok then return 0 end
  local fields = {'ur', 'ur_at', 'ur_used', 'ut', 'ut_at', 'ut_used', 'probe', 'fails', 'fail_at'}
  for _, w in ipairs(c.windows) do fields[#fields + 1] = 'l' .. w.name end
  local v = redis.call('HMGET', ks, unpack(fields))
  local upd = {}
  -- A success sent later (settle_later) closes the breaker only on failures recorded before it:
  -- failures after it (within the ~20 ms it waited) still count.
  if ok and v[8] and num(v[9], -INF) <= now then
    redis.call('HDEL', ks, 'fails', 'fail_at', 'open_until', 'probe', 'probe_until')
    v[7] = nil
  end
  if not done then return 0 end
  -- Still counted (it has left every window otherwise: nothing to correct)?
  if math.floor(t / rbucket) >= math.floor((now - retention) / rbucket) then
    local ur, ur_at, ur_used = tonumber(v[1]), num(v[2], 0), num(v[3], 0)
    local ut, ut_at, ut_used = tonumber(v[4]), num(v[5], 0), num(v[6], 0)
    local delta_r, delta_t = 0, 0
    if mode == 'settle' then
      -- PTU utilisation is corrected to actual usage; the standard TPM counter keeps its
      -- arrival estimate, so we never hold less than we reserved (contract.settled_tokens).
      local new = math.max(reserved, actual)
      if provisioned then new = actual end
      delta_t = new - reserved
    else
      delta_r, delta_t = -1, -reserved
    end
    for j, w in ipairs(c.windows) do
      local delta = delta_t
      if w.unit == 'r' then delta = delta_r end
      local b = math.floor(t / w.bucket)
      local lo = tonumber(v[9 + j])
      -- A bucket before the window's stored start has already left its sum.
      if delta ~= 0 and lo and b >= lo then
        redis.call('HINCRBY', kb, w.name .. ':' .. int(b), delta)
        redis.call('HINCRBY', ks, 'n' .. w.name, delta)
      end
    end
    if ur and t >= ur_at and delta_r ~= 0 then
      upd[#upd + 1] = 'ur_used'; upd[#upd + 1] = fmt(math.max(0, ur_used + delta_r))
    end
    if ut and t >= ut_at and delta_t ~= 0 then
      upd[#upd + 1] = 'ut_used'; upd[#upd + 1] = fmt(math.max(0, ut_used + delta_t))
    end
  end
  if #upd > 0 then redis.call('HSET', ks, unpack(upd)) end
  if v[7] == rid then redis.call('HDEL', ks, 'probe', 'probe_until') end
  return 1
end

-- Settlements carried by one call (settle.lua's, or riding along an acquire): 3 KEYS each (s, b,
-- infl) from KEYS[k], and from ARGV[i] each: mode, reservation id, actual tokens, provisioned,
-- now, reserved tokens, time it counts from, ok, retention, retention's bucket, n windows,
-- n x (name, unit, bucket). Returns finish's results in order.
local function finish_batch(keys, k, argv, i)
  local out = {}
  while argv[i] do
    local windows = {}
    local j = i + 11
    for w = 1, tonumber(argv[i + 10]) do
      windows[w] = {name = argv[j], unit = argv[j + 1], bucket = tonumber(argv[j + 2])}
      j = j + 3
    end
    local c = {ks = keys[k], kb = keys[k + 1], kinfl = keys[k + 2], windows = windows}
    out[#out + 1] = finish(c, argv[i], argv[i + 1], tonumber(argv[i + 2]), argv[i + 3] == '1',
                           tonumber(argv[i + 4]), tonumber(argv[i + 5]), tonumber(argv[i + 6]),
                           argv[i + 7] == '1', tonumber(argv[i + 8]), tonumber(argv[i + 9]))
    k, i = k + 3, j
  end
  return out
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
