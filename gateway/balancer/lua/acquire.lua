-- try_acquire / try_acquire_queued: choose the fitting candidate with the most headroom and
-- reserve 1 request + demand tokens on it, atomically (and, queued, only for the head).
-- KEYS: [6 queue keys if ARGV[5] == 'queue'] then 3 keys per candidate (s, b, infl).
-- ARGV: now, demand, reservation id, random [0,1), mode ('raw'|'queue'), ticket ('' = none),
--       wake channel, queue name, 7 config values, n candidates, per candidate (read_candidates);
--       then settlements of earlier requests riding along (their KEYS after the candidates'),
--       done first, as settle.lua does them (lib.lua, finish_batch).
-- Returns {'G', candidate index, reservation id, time, headroom, probe} or {'D', wait, reason}.

local now, demand, rid = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local rand, mode, ticket = tonumber(ARGV[4]), ARGV[5], ARGV[6]
local cfg, i = read_config(ARGV, 9)
local q, k = nil, 1
if mode == 'queue' then
  q, k = qkeys(KEYS, 1, ARGV[7], ARGV[8]), 7
end
local cands, rest = read_candidates(ARGV, i, KEYS, k)
finish_batch(KEYS, k + 3 * #cands, ARGV, rest)

-- A new arrival at an empty queue (the common case below saturation) has nothing to prune,
-- announce or keep alive: one ZCARD instead of about a dozen commands.
if q and ticket == '' and redis.call('ZCARD', q.z) == 0 then q = nil end

if q then
  local before = q_head(q)
  q_prune(q, now)
  q_announce(q, before)
  q_expire(q, cfg)  -- a queue lives as long as somebody polls it
  local ahead
  if ticket ~= '' then
    local info = redis.call('HGET', q.t, ticket)
    if not info then
      -- Evicted by a better arrival (a tombstone, reported once; q_prune dropped stale ones)?
      if redis.call('ZREM', q.e, ticket) == 1 then return {'D', '0', 'evicted'} end
      return {'D', '0', 'not_queued'}
    end
    local _, lease = q_parse(info)
    redis.call('ZADD', q.l, fmt(now + lease), ticket)  -- each poll renews the lease
    ahead = q_head(q) ~= ticket
  else
    ahead = redis.call('ZCARD', q.z) > 0  -- a new arrival never jumps the waiters
  end
  if ahead then
    local _, _, wait, why = choose(cands, now, demand, cfg, rand)
    if why == 'never' then return {'D', 'inf', 'never'} end
    if why == 'unhealthy' then return {'D', fmt(wait), 'unhealthy'} end
    return {'D', fmt(wait), 'queued'}
  end
end

local idx, head, wait, why = choose(cands, now, demand, cfg, rand)
if not idx then
  if why == 'never' then return {'D', 'inf', 'never'} end
  return {'D', fmt(wait), why}
end
local c = cands[idx]
local t, probe = reserve(c, c.d, rid, now, demand, cfg)
if q and ticket ~= '' then
  q_remove(q, ticket, true)
  q_announce(q, ticket)
end
return {'G', tostring(idx), rid, fmt(t), fmt(head), tostring(probe)}
