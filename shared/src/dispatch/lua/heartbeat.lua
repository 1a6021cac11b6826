-- heartbeat: one round trip for a box and all its jobs.
-- KEYS: config, leases, machines, events, classes:ver, machine:<mid>
-- ARGV: prefix, machine_id, state (STARTING|READY), gpu_stats_json, then the execution ids the
--       agent is running.
-- Reply: {'ok', drain (0|1), classes_version, status, n_cancel, cancel eids..., abandon eids...}
--      | {'unknown_machine'} | {'restoring'}
K = bind_keys(KEYS_HEARTBEAT)
local mid = uuid_arg(ARGV[2], 'machine_id')
local state = ARGV[3]
if state ~= 'STARTING' and state ~= 'READY' then argerr('state', 'must be STARTING or READY') end
local gpu = json_arg(ARGV[4], 65536, 'gpu_stats')
local mk = want_key(6, 'machine:', mid)
if #ARGV - 4 > 1024 then argerr('running', 'at most 1024 execution ids') end
for i = 5, #ARGV do uuid_arg(ARGV[i], 'running') end

if not load_epoch() then return { 'restoring' } end
local m = call('HMGET', mk, 'status', 'drain', 'max_slots', 'execs', 'lease')
if not m[1] or machine_gone(m[1]) then return { 'unknown_machine' } end
local now = now_text()

-- Only executions both sides agree on get their lease extended (up to their hard deadline): one
-- the machine holds but the agent no longer reports (it restarted, it lost track) must expire
-- and be requeued; one the agent reports but the machine does not hold (requeued, timed out,
-- never its own) must stop.
local lease_until = now_ms() + config().lease_ms
local lease_text = nil
local reported = {}
for i = 5, #ARGV do reported[ARGV[i]] = true end
local recs = records(m[4])
local cancel, abandon = {}, {}
local extended = 0
local held = {}
for _, rec in ipairs(recs) do
  local eid = rec[1]
  held[eid] = true
  if reported[eid] then
    if tonumber(rec[6]) < lease_until then
      rec[7] = rec[6]
    else
      lease_text = lease_text or int(lease_until)
      rec[7] = lease_text
    end
    extended = extended + 1
    if call('HGET', key('job:', rec[2]), 'cancel_requested') == '1' then
      cancel[#cancel + 1] = eid
    end
  end
end
for i = 5, #ARGV do
  local eid = ARGV[i]
  if not held[eid] then
    held[eid] = true
    abandon[#abandon + 1] = eid
  end
end

-- The beat, the records and the status in one write; the machine's lease entry follows its
-- records (one ZADD at most).
local f = { 'last_heartbeat_ms', now, 'gpu_stats', gpu }
if extended > 0 then f[#f + 1] = 'execs'; f[#f + 1] = records_text(recs) end
local lease = lease_exact(mid, m[5], recs)
if lease then f[#f + 1] = 'lease'; f[#f + 1] = lease end
local status = machine_status_for(m[2], state == 'READY', #recs, tonumber(m[3]) or 1)
if status ~= m[1] then
  f[#f + 1] = 'status'; f[#f + 1] = status
end
call('HSET', mk, unpack(f))
if status ~= m[1] then emit('machine.status', nil, nil, mid, status_json(status, m[1], nil)) end
call('ZADD', K.machines, now, mid)
emit('machine.heartbeat', nil, nil, mid, json_obj({ { 'running', extended, 'n' },
  { 'status', status, 'w' }, { 'gpu', gpu, 'raw' } }))
local reply = { 'ok', m[2] == '1' and 1 or 0, call('GET', K['classes:ver']) or '0', status,
  #cancel }
for _, eid in ipairs(cancel) do reply[#reply + 1] = eid end
for _, eid in ipairs(abandon) do reply[#reply + 1] = eid end
return reply
