-- register: a box announces itself. One machine id per external id, so a restarted agent on the
-- same box keeps its id; the caller's candidate (a fresh UUIDv7) is used only for a new box.
-- KEYS: config, machines, machine-ids, events, classes:ver
-- ARGV: prefix, candidate_id, external_id, provider, region, capabilities_json, max_slots
-- Reply: {'registered', machine_id, reused (0|1), classes_version} | {'restoring'}
K = bind_keys(KEYS_REGISTER)
local candidate = uuid_arg(ARGV[2], 'machine_id')
local external = str_arg(ARGV[3], 1, 256, 'external_id')
local provider = str_arg(ARGV[4], 1, 64, 'provider')
local region = str_arg(ARGV[5], 1, 64, 'region')
local caps = json_arg(ARGV[6], 262144, 'capabilities')
local max_slots = int_arg(ARGV[7], 1, 64, 'max_slots')

if not load_epoch() then return { 'restoring' } end
local mid = call('HGET', K['machine-ids'], external)
local reused = 1
if not mid then
  reused = 0
  mid = candidate
  local other = call('HGET', key('machine:', mid), 'external_id')
  if other and other ~= external then argerr('machine_id', 'already belongs to another box') end
  call('HSET', K['machine-ids'], external, mid)
end
local mk = key('machine:', mid)
local now = now_text()
local m = call('HMGET', mk, 'status', 'drain', 'execs')
local old = m[1]
-- The drain flag survives a re-registration: an operator's drain outlives an agent restart.
call('HSET', mk, 'external_id', external, 'provider', provider, 'region', region,
  'capabilities', caps, 'max_slots', ARGV[7], 'registered_ms', now, 'last_heartbeat_ms', now,
  'status', 'STARTING')
call('PERSIST', mk)
call('ZADD', K.machines, now, mid)
emit('machine.registered', nil, nil, mid, json_obj({ { 'external_id', external, 's' },
  { 'provider', provider, 's' }, { 'region', region, 's' }, { 'max_slots', max_slots, 'n' },
  { 'reused', reused == 1, 'b' }, { 'previous', old, 'w' }, { 'capabilities', caps, 'raw' } }))
-- Not ready yet (the agent says READY on a heartbeat), unless it still runs something.
set_machine_status(mid, 'STARTING', machine_status_for(m[2], false,
  execs_count(m[3]), max_slots), 'registered')
return { 'registered', mid, reused, call('GET', K['classes:ver']) or '0' }
