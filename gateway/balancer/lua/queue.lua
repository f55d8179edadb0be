-- Queue operations other than acquisition (which lives in acquire.lua).
-- KEYS: z, t, l, m, r, e (see lib.lua). ARGV: op, now, ticket, priority, tenant, lease seconds,
-- max depth, key_ttl, wake channel, queue name. A head that changes because tickets left is
-- announced (a newcomer that outranks the head polls at once anyway), and so is a ticket
-- evicted from a full queue (its waiter polls, and learns it was evicted).
--   enqueue -> 1 added (if the queue was full, in place of its last ticket, which a strictly
--              higher priority evicts) or already there (lease renewed), 0 queue full
--   touch   -> 1 lease renewed, 0 unknown ticket (also an evicted one)
--   leave   -> 1 removed, 0 unknown ticket (an evicted ticket's tombstone goes too)
--   depth   -> flat list priority, count, ...

local op, now, ticket = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local q = qkeys(KEYS, 1, ARGV[9], ARGV[10])
local cfg = {key_ttl = tonumber(ARGV[8])}

if op == 'touch' then
  local info = redis.call('HGET', q.t, ticket)
  if not info then return 0 end
  local _, lease = q_parse(info)
  redis.call('ZADD', q.l, fmt(now + lease), ticket)
  return 1
elseif op == 'leave' then
  redis.call('ZREM', q.e, ticket)  -- its waiter is done with it
  local before = q_head(q)
  if not q_remove(q, ticket, false) then return 0 end
  q_announce(q, before)
  return 1
end

local before = q_head(q)
q_prune(q, now)
q_announce(q, before)
if op == 'depth' then
  local out = {}
  local all = redis.call('HGETALL', q.m)
  for j = 1, #all, 2 do
    local p = string.match(all[j], '^n:(.*)$')
    if p and tonumber(all[j + 1]) > 0 then
      out[#out + 1] = p; out[#out + 1] = all[j + 1]
    end
  end
  return out
end

-- enqueue
local p, tenant, lease, max_depth = ARGV[4], ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7])
local info = redis.call('HGET', q.t, ticket)
if info then
  local _, kept = q_parse(info)
  redis.call('ZADD', q.l, fmt(now + kept), ticket)
  return 1
end
local depth = redis.call('ZCARD', q.z)
if depth >= max_depth then
  -- Full: a strictly better priority than the last ticket's (the one served last: highest
  -- score, then highest member = round, seq) takes its place; anything else is refused. Over
  -- full (another process has a larger max depth): refused, so that one arrival evicts at most one.
  if depth > max_depth then return 0 end
  local tail = redis.call('ZRANGE', q.z, -1, -1, 'WITHSCORES')
  if tonumber(p) >= tonumber(tail[2]) then return 0 end
  local victim = q_ticket(tail[1])
  local _, vlease = q_parse(redis.call('HGET', q.t, victim))
  q_remove(q, victim, false)
  redis.call('ZADD', q.e, fmt(now + vlease), victim)
  if q.channel ~= '' then redis.call('PUBLISH', q.channel, q.name .. '\n' .. victim) end
end
redis.call('ZREM', q.e, ticket)  -- back in the queue: no longer evicted
-- The tenant's round (memory._Queue explains the formula): fair turns between tenants.
local seq = redis.call('HINCRBY', q.m, 'seq', 1)
local v = num(redis.call('HGET', q.m, 'v:' .. p), 0)
local lk, wk = 'l|' .. p .. '|' .. tenant, 'w|' .. p .. '|' .. tenant
local last = tonumber(redis.call('HGET', q.r, lk))
local rnd = v
if last then
  local waiting = num(redis.call('HGET', q.r, wk), 0)
  rnd = math.max(v, math.min(last + 1, v + waiting + 1))
end
redis.call('HSET', q.r, lk, fmt(rnd))
redis.call('HINCRBY', q.r, wk, 1)
redis.call('HINCRBY', q.m, 'n:' .. p, 1)
local member = string.format('%015.0f:%015.0f:%s', rnd, seq, ticket)
redis.call('ZADD', q.z, p, member)
redis.call('HSET', q.t, ticket, p .. '|' .. fmt(lease) .. '|' .. member .. '|' .. tenant)
redis.call('ZADD', q.l, fmt(now + lease), ticket)
q_expire(q, cfg)
return 1
