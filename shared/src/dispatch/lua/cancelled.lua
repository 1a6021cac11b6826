-- cancelled: the agent confirms it stopped a job whose cancel was asked for; the job is
-- CANCELLED. Without a cancel request nothing changes (an agent may not cancel on its own).
-- KEYS: config, leases, queued, events, heads
-- ARGV: prefix, machine_id, execution_id
-- Reply: {'ok'} | {'not_requested'} | {'stale'} | {'not_owner'} | {'restoring'}
K = bind_keys(KEYS_AGENT)
local mid = uuid_arg(ARGV[2], 'machine_id')
local eid = uuid_arg(ARGV[3], 'execution_id')

if not load_epoch() then return { 'restoring' } end
local m = report_machine(mid)
local id, job, rec = fence(mid, eid, m, 'cancelled')
if not id then return { job } end
if not job.cancel then return { 'not_requested' } end
end_execution(mid, m, rec, 'CANCELLED')
finish(id, 'CANCELLED', job.progress)
emit('job.cancelled', id, eid, mid, json_obj({ { 'attempts', job.attempts, 'n' },
  { 'exec_status', 'CANCELLED', 'w' } }))
return { 'ok' }
