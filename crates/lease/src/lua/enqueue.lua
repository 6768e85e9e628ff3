-- Queue a task once: only if it is not queued already.
-- KEYS[1] queued-set, KEYS[2] shard list; ARGV[1] task id
if redis.call('SADD', KEYS[1], ARGV[1]) == 1 then
  redis.call('LPUSH', KEYS[2], ARGV[1])
  return 1
end
return 0
