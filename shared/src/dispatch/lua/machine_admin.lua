-- machine_admin (control plane): drain, undrain, or mark a machine OFFLINE/TERMINATED.
-- A draining machine claims nothing and finishes what it runs; the flag survives re-registration.
-- KEYS: config, machines, events, machine:<mid>
-- ARGV: prefix, machine_id, action (drain|undrain|offline|terminated)
-- Reply: {'ok', status} | {'unknown_machine'}
K = bind_keys(KEYS_MACHINES)
local mid = uuid_arg(ARGV[2], 'machine_id')
local action = ARGV[3]
local mk = want_key(4, 'machine:', mid)
if action ~= 'drain' and action ~= 'undrain' and action ~= 'offline' and action ~= 'terminated' then
  argerr('action', 'must be drain, undrain, offline or terminated')
end

load_epoch()
local m = call('HMGET', mk, 'status', 'max_slots', 'execs')
local old = m[1]
if not old then return { 'unknown_machine' } end
if action == 'drain' or action == 'undrain' then
  if action == 'drain' then
    call('HSET', mk, 'drain', '1')
  else
    call('HDEL', mk, 'drain')
  end
  if machine_gone(old) then return { 'ok', old } end
  return { 'ok', set_machine_status(mid, old, machine_status_for(action == 'drain' and '1' or nil,
    old ~= 'STARTING', execs_count(m[3]), tonumber(m[2]) or 1), action) }
end
local new = upper(action)
call('ZREM', K.machines, mid)
if old ~= new then
  call('HSET', mk, 'status', new)
  call('PEXPIRE', mk, OFFLINE_MACHINE_TTL_MS)
  emit('machine.status', nil, nil, mid, json_obj({ { 'status', new, 'w' }, { 'previous', old, 'w' },
    { 'reason', 'operator', 'w' } }))
end
return { 'ok', new }
