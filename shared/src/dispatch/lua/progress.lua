-- progress: the current execution's progress, for the API and SSE (not persisted row by row).
-- KEYS: config, leases, queued, events, heads (the layout shared by every report)
-- ARGV: prefix, machine_id, execution_id, value, max, node ('' for none)
-- Reply: {'ok', cancel_requested (0|1)} | {'stale'} | {'not_owner'} | {'restoring'}
K = bind_keys(KEYS_AGENT)
local mid = uuid_arg(ARGV[2], 'machine_id')
local eid = uuid_arg(ARGV[3], 'execution_id')
local value = int_arg(ARGV[4], 0, 1e15, 'value')
local max = int_arg(ARGV[5], 0, 1e15, 'max')
local node = str_arg(ARGV[6], 0, 256, 'node')
if node == '' then node = nil end

if not load_epoch() then return { 'restoring' } end
local id, job = fence(mid, eid, report_machine(mid), 'progress')
if not id then return { job } end
local p = json_obj({ { 'value', value, 'n' }, { 'max', max, 'n' }, { 'node', node, 's' } })
call('HSET', key('job:', id), 'progress', p)
emit('job.progress', id, eid, mid, p)
-- The reply tells the agent about a cancel at once, instead of at its next heartbeat.
return { 'ok', job.cancel and 1 or 0 }
