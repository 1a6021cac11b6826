-- deregister: the agent is leaving (after its shutdown grace). Whatever it still holds is lost
-- now rather than at lease expiry.
-- KEYS: epoch, config, leases, queued, events, heads, machines, machine:<mid>,
--       machine:<mid>:execs
-- ARGV: prefix, machine_id
-- Reply: {'ok', n_lost} | {'unknown_machine'} | {'restoring'}
K = bind_keys({ 'epoch', 'config', 'leases', 'queued', 'events', 'heads', 'machines' })
local mid = uuid_arg(ARGV[2], 'machine_id')
local mk = want_key(8, 'machine:' .. mid)
local execs_key = want_key(9, 'machine:' .. mid .. ':execs')

if not load_epoch() then return { 'restoring' } end
local old = redis.call('HGET', mk, 'status')
if not old then return { 'unknown_machine' } end
local lost = 0
for _, eid in ipairs(redis.call('SMEMBERS', execs_key)) do
  if lose_execution(eid, exec_fields(eid), 'deregistered') ~= 'cleaned' then lost = lost + 1 end
end
-- Whatever lose_execution did not remove (executions that had already ended).
redis.call('DEL', execs_key)
redis.call('ZREM', K.machines, mid)
if old ~= 'OFFLINE' and old ~= 'TERMINATED' then
  redis.call('HSET', mk, 'status', 'OFFLINE')
  redis.call('PEXPIRE', mk, OFFLINE_MACHINE_TTL_MS)
  emit('machine.status', nil, nil, mid, json_obj({ { 'status', 'OFFLINE', 'w' },
    { 'previous', old, 'w' }, { 'reason', 'deregistered', 'w' } }))
end
return { 'ok', lost }
