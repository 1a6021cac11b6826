-- deregister: the agent is leaving (after its shutdown grace). Whatever it still holds is lost
-- now rather than at lease expiry.
-- KEYS: config, leases, queued, events, heads, machines, machine:<mid>
-- ARGV: prefix, machine_id
-- Reply: {'ok', n_lost} | {'unknown_machine'} | {'restoring'}
K = bind_keys({ 'config', 'leases', 'queued', 'events', 'heads', 'machines' })
local mid = uuid_arg(ARGV[2], 'machine_id')
local mk = want_key(7, 'machine:' .. mid)

if not load_epoch() then return { 'restoring' } end
local m = redis.call('HMGET', mk, 'status', 'execs')
local old = m[1]
if not old then return { 'unknown_machine' } end
local lost = 0
for eid in string.gmatch(m[2] or '', '%S+') do
  if lose_execution(eid, exec_read(eid), 'deregistered') ~= 'cleaned' then lost = lost + 1 end
end
-- Whatever lose_execution did not remove (executions that had already ended).
redis.call('HSET', mk, 'execs', '')
redis.call('ZREM', K.machines, mid)
if old ~= 'OFFLINE' and old ~= 'TERMINATED' then
  redis.call('HSET', mk, 'status', 'OFFLINE')
  redis.call('PEXPIRE', mk, OFFLINE_MACHINE_TTL_MS)
  emit('machine.status', nil, nil, mid, json_obj({ { 'status', 'OFFLINE', 'w' },
    { 'previous', old, 'w' }, { 'reason', 'deregistered', 'w' } }))
end
return { 'ok', lost }
