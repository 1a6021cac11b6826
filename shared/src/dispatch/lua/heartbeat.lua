-- heartbeat: one round trip for a box and all its jobs.
-- KEYS: epoch, config, leases, machines, events, classes:ver, machine:<mid>, machine:<mid>:execs
-- ARGV: prefix, machine_id, state (STARTING|READY), gpu_stats_json, then the execution ids the
--       agent is running.
-- Reply: {'ok', drain (0|1), classes_version, status, n_cancel, cancel eids..., abandon eids...}
--      | {'unknown_machine'} | {'restoring'}
K = bind_keys({ 'epoch', 'config', 'leases', 'machines', 'events', 'classes:ver' })
local mid = uuid_arg(ARGV[2], 'machine_id')
local state = ARGV[3]
if state ~= 'STARTING' and state ~= 'READY' then argerr('state', 'must be STARTING or READY') end
local gpu = json_arg(ARGV[4], 65536, 'gpu_stats')
local mk = want_key(7, 'machine:' .. mid)
local execs_key = want_key(8, 'machine:' .. mid .. ':execs')
if #ARGV - 4 > 1024 then argerr('running', 'at most 1024 execution ids') end
for i = 5, #ARGV do uuid_arg(ARGV[i], 'running') end

if not load_epoch() then return { 'restoring' } end
local m = redis.call('HMGET', mk, 'status', 'drain')
if not m[1] or m[1] == 'OFFLINE' or m[1] == 'TERMINATED' then return { 'unknown_machine' } end
local cfg = config()
local now = now_ms()
redis.call('HSET', mk, 'last_heartbeat_ms', fmt(now), 'gpu_stats', gpu)
redis.call('ZADD', K.machines, fmt(now), mid)

local current = {}
for _, eid in ipairs(redis.call('SMEMBERS', execs_key)) do current[eid] = true end
-- Only executions both sides agree on get their lease extended: one the machine holds but the
-- agent no longer reports (it restarted, it lost track) must expire and be requeued; one the
-- agent reports but the machine does not hold (requeued, timed out, never its own) must stop.
local cancel, abandon, seen = {}, {}, {}
local extended = 0
for i = 5, #ARGV do
  local eid = ARGV[i]
  if not seen[eid] then
    seen[eid] = true
    if current[eid] then
      redis.call('ZADD', K.leases, 'XX', fmt(now + cfg.lease_ms), eid)
      extended = extended + 1
      local id = redis.call('HGET', k_exec(eid), 'job')
      if id and redis.call('HGET', k_job(id), 'cancel_requested') == '1' then
        cancel[#cancel + 1] = eid
      end
    else
      abandon[#abandon + 1] = eid
    end
  end
end

local status = machine_refresh(mid, state == 'READY', nil)
emit('machine.heartbeat', nil, nil, mid, json_obj({ { 'running', extended, 'n' },
  { 'status', status, 's' }, { 'gpu', gpu, 'raw' } }))
local reply = { 'ok', m[2] == '1' and 1 or 0, redis.call('GET', K['classes:ver']) or '0', status,
  #cancel }
for _, eid in ipairs(cancel) do reply[#reply + 1] = eid end
for _, eid in ipairs(abandon) do reply[#reply + 1] = eid end
return reply
