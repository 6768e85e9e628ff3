-- Pop the oldest task from the first non-empty shard, in the order the caller gives (it
-- rotates the order so every shard gets served).
-- KEYS[1] queued-set, KEYS[2..] shard lists
for i = 2, #KEYS do
  local v = redis.call('RPOP', KEYS[i])
  if v then
    redis.call('SREM', KEYS[1], v)
    return v
  end
end
return false
