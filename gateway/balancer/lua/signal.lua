-- What the upstream told us about one deployment. KEYS: s (its state hash).
-- ARGV: op, now, a, b, breaker threshold, open seconds, key_ttl.
--   observe: a, b = remaining requests, remaining tokens ('' = not reported)
--   cool:    a = until (the later of two cool-downs wins)
--   fail:    count a failure; returns the breaker state afterwards ('open' | 'closed')
--   ok:      a success closes the breaker

local op, now = ARGV[1], tonumber(ARGV[2])
local a, b = ARGV[3], ARGV[4]
local threshold, open_seconds, key_ttl = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local ks = KEYS[1]
local result = 'ok'

if op == 'observe' then
  if a ~= '' then redis.call('HSET', ks, 'ur', a, 'ur_at', fmt(now), 'ur_used', '0') end
  if b ~= '' then redis.call('HSET', ks, 'ut', b, 'ut_at', fmt(now), 'ut_used', '0') end
elseif op == 'cool' then
  local until_ = tonumber(a)
  if until_ > num(redis.call('HGET', ks, 'cool'), 0) then redis.call('HSET', ks, 'cool', fmt(until_)) end
elseif op == 'fail' then
  local fails = redis.call('HINCRBY', ks, 'fails', 1)
  redis.call('HSET', ks, 'fail_at', fmt(now))  -- a success settled later resets only older ones
  result = 'closed'
  if fails >= threshold then
    local open_until = math.max(num(redis.call('HGET', ks, 'open_until'), 0), now + open_seconds)
    redis.call('HSET', ks, 'open_until', fmt(open_until))
    redis.call('HDEL', ks, 'probe', 'probe_until')
    result = 'open'
  end
elseif op == 'ok' then
  redis.call('HDEL', ks, 'fails', 'fail_at', 'open_until', 'probe', 'probe_until')
end

local v = redis.call('HMGET', ks, 'cool', 'open_until')
local keep = math.max(key_ttl, num(v[1], 0) - now + 60, num(v[2], 0) - now + 60)
redis.call('PEXPIRE', ks, math.ceil(keep * 1000))
return result
