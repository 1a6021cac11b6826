-- heartbeat: one round trip for a box and all its jobs.
-- KEYS: config, leases, machines, events, classes:ver, machine:<mid>
-- ARGV: prefix, machine_id, state (STARTING|READY), gpu_stats_json, then the execution ids the
--       agent is running.
-- Reply: {'ok', drain (0|1), classes_version, status, n_cancel, cancel eids..., abandon eids...}
--      | {'unknown_machine'} | {'restoring'}
K = bind_keys({ 'config', 'leases', 'machines', 'events', 'classes:ver' })
local mid = uuid_arg(ARGV[2], 'machine_id')
local state = ARGV[3]
if state ~= 'STARTING' and state ~= 'READY' then argerr('state', 'must be STARTING or READY') end
local gpu = json_arg(ARGV[4], 65536, 'gpu_stats')
local mk = want_key(6, 'machine:' .. mid)
if #ARGV - 4 > 1024 then argerr('running', 'at most 1024 execution ids') end
for i = 5, #ARGV do uuid_arg(ARGV[i], 'running') end

if not load_epoch() then return { 'restoring' } end
local m = redis.call('HMGET', mk, 'status', 'drain', 'max_slots', 'execs')
if not m[1] or m[1] == 'OFFLINE' or m[1] == 'TERMINATED' then return { 'unknown_machine' } end
local now = now_text()

local current = {}
local n_running = 0
if m[4] and m[4] ~= '' then
  for e in string.gmatch(m[4], '%S+') do
    current[e] = true
    n_running = n_running + 1
  end
end
-- Only executions both sides agree on get their lease extended (up to their hard deadline): one
-- the machine holds but the agent no longer reports (it restarted, it lost track) must expire
-- and be requeued; one the agent reports but the machine does not hold (requeued, timed out,
-- never its own) must stop.
local lease_until = now_ms() + config().lease_ms
local lease_text = nil
local cancel, abandon, seen = {}, {}, {}
local extended = 0
for i = 5, #ARGV do
  local eid = ARGV[i]
  if not seen[eid] then
    seen[eid] = true
    if current[eid] then
      local e = exec_read(eid)
      local deadline = tonumber(e[5])
      local until_text
      if deadline and deadline < lease_until then
        until_text = e[5]
      else
        lease_text = lease_text or int(lease_until)
        until_text = lease_text
      end
      redis.call('ZADD', K.leases, 'XX', until_text, eid)
      extended = extended + 1
      if e[1] and redis.call('HGET', key('job:', e[1]), 'cancel_requested') == '1' then
        cancel[#cancel + 1] = eid
      end
    else
      abandon[#abandon + 1] = eid
    end
  end
end

-- The beat and the status in one write.
local status = machine_status_for(m[2], state == 'READY', n_running, tonumber(m[3]) or 1)
if status ~= m[1] then
  redis.call('HSET', mk, 'last_heartbeat_ms', now, 'gpu_stats', gpu, 'status', status)
  emit('machine.status', nil, nil, mid, status_json(status, m[1], nil))
else
  redis.call('HSET', mk, 'last_heartbeat_ms', now, 'gpu_stats', gpu)
end
redis.call('ZADD', K.machines, now, mid)
emit('machine.heartbeat', nil, nil, mid, json_obj({ { 'running', extended, 'n' },
  { 'status', status, 'w' }, { 'gpu', gpu, 'raw' } }))
local reply = { 'ok', m[2] == '1' and 1 or 0, redis.call('GET', K['classes:ver']) or '0', status,
  #cancel }
for _, eid in ipairs(cancel) do reply[#reply + 1] = eid end
for _, eid in ipairs(abandon) do reply[#reply + 1] = eid end
return reply
