-- Forget `queued` entries whose task is on no shard list, so the coordinator can queue them
-- again. A blocking pop (BLMPOP, which cannot run inside a script) removes the task from its
-- list and the worker clears the entry in a second call: a worker that dies between the two,
-- or a pop whose answer is lost with its connection, leaves an entry that `enqueue` would skip
-- forever. Clearing an entry whose pop is still about to clear it is harmless (SREM twice).
-- O(queued + listed): the coordinator runs it every half minute, not every tick.
-- KEYS[1] queued-set, KEYS[2..] shard lists. Returns the task ids it forgot.
local listed = {}
for i = 2, #KEYS do
  for _, v in ipairs(redis.call('LRANGE', KEYS[i], 0, -1)) do
    listed[v] = true
  end
end
local forgot = {}
for _, v in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if not listed[v] then
    redis.call('SREM', KEYS[1], v)
    forgot[#forgot + 1] = v
  end
end
return forgot
