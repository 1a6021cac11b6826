-- deregister: the agent is leaving (after its shutdown grace). Whatever it still holds is lost
-- now rather than at lease expiry.
-- KEYS: config, leases, queued, events, heads, machines, machine:<mid>
-- ARGV: prefix, machine_id
-- Reply: {'ok', n_lost} | {'unknown_machine'} | {'restoring'}
K = bind_keys(KEYS_DEREGISTER)
local mid = uuid_arg(ARGV[2], 'machine_id')
local mk = want_key(7, 'machine:', mid)

if not load_epoch() then return { 'restoring' } end
local m = report_machine(mid)
local old = m[1]
if not old then return { 'unknown_machine' } end
local lost = 0
for _, rec in ipairs(records(m[4])) do
  if lose_execution(mid, m, rec, 'deregistered') ~= 'cleaned' then lost = lost + 1 end
end
local f = { 'execs', '', 'ended', m[5] or '' }
if m[6] and m[6] ~= '' then
  call('ZREM', K.leases, mid)
  f[#f + 1] = 'lease'; f[#f + 1] = ''
end
call('ZREM', K.machines, mid)
if not machine_gone(old) then
  f[#f + 1] = 'status'; f[#f + 1] = 'OFFLINE'
  call('HSET', mk, unpack(f))
  call('PEXPIRE', mk, OFFLINE_MACHINE_TTL_MS)
  emit('machine.status', nil, nil, mid, json_obj({ { 'status', 'OFFLINE', 'w' },
    { 'previous', old, 'w' }, { 'reason', 'deregistered', 'w' } }))
else
  call('HSET', mk, unpack(f))
end
return { 'ok', lost }
