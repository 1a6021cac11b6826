-- sweep_machines (control plane): machines silent for longer than stale_ms become OFFLINE (their
-- leases have long expired, the reaper requeued their jobs). A box that comes back is told it is
-- unknown and registers again under the same id.
-- KEYS: config, machines, events
-- ARGV: prefix, stale_ms, limit, now_ms ('' = Redis TIME)
-- Reply: {n_marked_offline}
K = bind_keys(KEYS_MACHINES)
local stale_ms = int_arg(ARGV[2], 1, 1e12, 'stale_ms')
int_arg(ARGV[3], 1, 10000, 'limit')
if ARGV[4] ~= '' then NOW = int_arg(ARGV[4], 0, 1e15, 'now_ms') end

load_epoch()
local n = 0
for _, mid in ipairs(call('ZRANGEBYSCORE', K.machines, '-inf', int(now_ms() - stale_ms),
  'LIMIT', 0, ARGV[3])) do
  call('ZREM', K.machines, mid)
  local mk = key('machine:', mid)
  local old = call('HGET', mk, 'status')
  if old and not machine_gone(old) then
    call('HSET', mk, 'status', 'OFFLINE')
    call('PEXPIRE', mk, OFFLINE_MACHINE_TTL_MS)
    emit('machine.status', nil, nil, mid, json_obj({ { 'status', 'OFFLINE', 'w' },
      { 'previous', old, 'w' }, { 'reason', 'no_heartbeat', 'w' } }))
    n = n + 1
  end
end
return { n }
