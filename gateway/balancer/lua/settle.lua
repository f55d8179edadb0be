-- settle / release one reservation, once; and, with `ok`, the deployment's good answer (which
-- closes its breaker: signal.lua's 'ok', folded in here to save a round trip per request).
-- KEYS: s, b, infl of its deployment.
-- ARGV: mode ('settle'|'release'), reservation id, actual tokens, provisioned ('1'|'0'), now,
--       reserved tokens, time it counts from (the grant's), ok ('1'|'0'), retention, retention's
--       bucket, n windows, n x (name, unit, bucket) of the windows it was reserved in.
-- Returns 1 if this call finished the reservation, 0 if it was done.

local mode, rid = ARGV[1], ARGV[2]
local actual, provisioned, now = tonumber(ARGV[3]), ARGV[4] == '1', tonumber(ARGV[5])
local reserved, t, ok = tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8] == '1'
local retention, rbucket = tonumber(ARGV[9]), tonumber(ARGV[10])
local ks, kb, kinfl = KEYS[1], KEYS[2], KEYS[3]

-- The in-flight record is the "not yet finished" flag: removing it is what makes this once.
local done = redis.call('ZREM', kinfl, rid) == 1
if not done and not ok then return 0 end

local fields = {'ur', 'ur_at', 'ur_used', 'ut', 'ut_at', 'ut_used', 'probe', 'fails'}
local windows = {}
local i = 12
for j = 1, tonumber(ARGV[11]) do
  windows[j] = {name = ARGV[i], unit = ARGV[i + 1], bucket = tonumber(ARGV[i + 2])}
  fields[#fields + 1] = 'l' .. ARGV[i]
  i = i + 3
end
local v = redis.call('HMGET', ks, unpack(fields))
local upd = {}
if ok and v[8] then
  redis.call('HDEL', ks, 'fails', 'open_until', 'probe', 'probe_until')
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
  for j, w in ipairs(windows) do
    local delta = delta_t
    if w.unit == 'r' then delta = delta_r end
    local b = math.floor(t / w.bucket)
    local lo = tonumber(v[8 + j])
    -- A bucket before the window's stored start has already left its sum.
    if delta ~= 0 and lo and b >= lo then
      redis.call('HINCRBY', kb, w.name .. ':' .. string.format('%.0f', b), delta)
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
