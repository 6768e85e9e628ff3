-- Cluster-wide rate limit (GCRA): reserve the next `units` slots of a budget and return how many
-- microseconds the caller must wait before using them. Every worker reserves from the same key,
-- so the budget holds however many workers there are.
-- KEYS[1] budget key; ARGV[1] microseconds per unit; ARGV[2] units
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + tonumber(ARGV[1]) * tonumber(ARGV[2])
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.floor((new_tat - now) / 1000) + 1000)
return math.floor(tat - now)
