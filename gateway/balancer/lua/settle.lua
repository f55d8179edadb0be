-- settle / release one reservation, once. KEYS: log, tok, s, infl of its deployment.
-- ARGV: mode ('settle'|'release'), reservation id, actual tokens, provisioned ('1'|'0'), now,
--       retention, key_ttl. Returns 1 if this call finished the reservation, 0 if it was done.

local mode, rid = ARGV[1], ARGV[2]
local actual, provisioned, now = tonumber(ARGV[3]), ARGV[4] == '1', tonumber(ARGV[5])
local cfg = {retention = tonumber(ARGV[6]), key_ttl = tonumber(ARGV[7])}
local c = {klog = KEYS[1], ktok = KEYS[2], ks = KEYS[3], kinfl = KEYS[4]}

-- The in-flight record is the "not yet finished" flag: removing it is what makes this once.
if redis.call('ZREM', c.kinfl, rid) == 0 then return 0 end
prune_log(c, now - cfg.retention)
local d = load_dep(c.ks)
local t = tonumber(redis.call('ZSCORE', c.klog, rid))
local reserved = tonumber(redis.call('HGET', c.ktok, rid))
local upd = {}
if t and reserved then  -- else it already left every window: nothing to correct
  if mode == 'settle' then
    -- PTU utilisation is corrected to actual usage; the standard TPM counter keeps its
    -- arrival estimate, so we never hold less than we reserved (state.settled_tokens).
    local new = math.max(reserved, actual)
    if provisioned then new = actual end
    local delta = new - reserved
    redis.call('HSET', c.ktok, rid, fmt(new))
    upd = {'tsum', fmt(d.tsum + delta)}
    if d.ut and t >= d.ut_at then
      upd[#upd + 1] = 'ut_used'; upd[#upd + 1] = fmt(math.max(0, d.ut_used + delta))
    end
  else
    redis.call('ZREM', c.klog, rid)
    redis.call('HDEL', c.ktok, rid)
    upd = {'tsum', fmt(d.tsum - reserved)}
    if d.ur and t >= d.ur_at then
      upd[#upd + 1] = 'ur_used'; upd[#upd + 1] = fmt(math.max(0, d.ur_used - 1))
    end
    if d.ut and t >= d.ut_at then
      upd[#upd + 1] = 'ut_used'; upd[#upd + 1] = fmt(math.max(0, d.ut_used - reserved))
    end
  end
end
if #upd > 0 then redis.call('HSET', c.ks, unpack(upd)) end
if d.probe == rid then redis.call('HDEL', c.ks, 'probe', 'probe_until') end
return 1
