-- Extend the lease only if the caller still holds it.
-- KEYS[1] lease key, ARGV[1] holder, ARGV[2] ttl in ms
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
