-- Live state of deployments for the admin page / status API (not on the request path).
-- KEYS: 3 per deployment. ARGV: now, 7 config values, n, per deployment (read_candidates).
-- Returns per deployment: {wait, headroom, in flight, cool, fails, open_until, probe,
-- upstream requests ('' = no fresh word), upstream tokens, used per window...}.

local now = tonumber(ARGV[1])
local cfg, i = read_config(ARGV, 2)
local cands = read_candidates(ARGV, i, KEYS, 1)
local out = {}
for j, c in ipairs(cands) do
  local d = load_dep(c, now)
  save_moved(c)
  local _, wait, head = evaluate(c, d, now, 0, cfg)
  redis.call('ZREMRANGEBYSCORE', c.kinfl, '-inf', fmt(now))
  local age = cfg.upstream_age
  local ur, ut = '', ''
  if d.ur and now < d.ur_at + age then ur = fmt(d.ur - d.ur_used) end
  if d.ut and now < d.ut_at + age then ut = fmt(d.ut - d.ut_used) end
  local probe = '0'
  if d.probe and now < d.probe_until then probe = '1' end
  local row = {fmt(wait), fmt(head), tostring(redis.call('ZCOUNT', c.kinfl, '-inf', '(inf')), fmt(d.cool),
               fmt(d.fails), fmt(d.open_until), probe, ur, ut}
  for _, w in ipairs(c.windows) do row[#row + 1] = fmt(w.n) end
  out[j] = row
end
return out
