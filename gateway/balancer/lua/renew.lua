-- renew: a grant that reached its caller late is moved to `now` in one step: released and
-- reserved again on the same deployment, atomically, so nobody (another process's queue head)
-- takes the slot in between and the request keeps its turn (policy._renewed).
-- KEYS: s, b, infl of the deployment.
-- ARGV: now, demand, new reservation id, random [0,1), old reservation id, time it counted
--       from, 7 config values, retention's bucket, 1, the candidate (read_candidates).
-- Returns as acquire.lua does: {'G', 1, rid, time, headroom, probe} or {'D', wait, reason}.

local now, demand, rid, rand = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local old, t = ARGV[5], tonumber(ARGV[6])
local cfg, i = read_config(ARGV, 7)
local rbucket = tonumber(ARGV[i])
local cands = read_candidates(ARGV, i + 1, KEYS, 1)
local c = cands[1]
finish(c, 'release', old, 0, false, now, demand, t, false, cfg.retention, rbucket)
local idx, head, wait, why = choose(cands, now, demand, cfg, rand)
if not idx then
  if why == 'never' then return {'D', 'inf', 'never'} end
  return {'D', fmt(wait), why}
end
local at, probe = reserve(c, c.d, rid, now, demand, cfg)
return {'G', '1', rid, fmt(at), fmt(head), tostring(probe)}
