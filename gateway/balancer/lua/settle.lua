-- settle / release one reservation, once; and, with `ok`, the deployment's good answer (which
-- closes its breaker: signal.lua's 'ok', folded in here to save a round trip per request).
-- KEYS: s, b, infl of its deployment.
-- ARGV: mode ('settle'|'release'), reservation id, actual tokens, provisioned ('1'|'0'), now,
--       reserved tokens, time it counts from (the grant's), ok ('1'|'0'), retention, retention's
--       bucket, n windows, n x (name, unit, bucket) of the windows it was reserved in.
-- Returns 1 if this call finished the reservation, 0 if it was done.

local windows = {}
local i = 12
for j = 1, tonumber(ARGV[11]) do
  windows[j] = {name = ARGV[i], unit = ARGV[i + 1], bucket = tonumber(ARGV[i + 2])}
  i = i + 3
end
local c = {ks = KEYS[1], kb = KEYS[2], kinfl = KEYS[3], windows = windows}
return finish(c, ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4] == '1', tonumber(ARGV[5]), tonumber(ARGV[6]),
              tonumber(ARGV[7]), ARGV[8] == '1', tonumber(ARGV[9]), tonumber(ARGV[10]))
