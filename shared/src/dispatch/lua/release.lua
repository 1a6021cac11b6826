-- release: the agent gives a running job back (shutdown grace ran out). The job returns to its
-- place without an attempts check: it did not fail. A job whose cancel was asked for ends
-- CANCELLED. The execution ends CANCELLED (stopped on purpose).
-- KEYS: config, leases, queued, events, heads
-- ARGV: prefix, machine_id, execution_id
-- Reply: {'ok', 'requeued'|'cancelled'} | {'stale'} | {'not_owner'} | {'restoring'}
K = bind_keys(KEYS_AGENT)
local mid = uuid_arg(ARGV[2], 'machine_id')
local eid = uuid_arg(ARGV[3], 'execution_id')

if not load_epoch() then return { 'restoring' } end
local m = report_machine(mid)
local id, job, rec = fence(mid, eid, m, 'release')
if not id then return { job } end
end_execution(mid, m, rec, 'CANCELLED')
local data = json_obj({ { 'attempts', job.attempts, 'n' }, { 'reason', 'released', 'w' },
  { 'exec_status', 'CANCELLED', 'w' } })
if job.cancel then
  finish(id, 'CANCELLED', job.progress)
  emit('job.cancelled', id, eid, mid, data)
  return { 'ok', 'cancelled' }
end
requeue(id, job.class, job.score)
emit('job.requeued', id, eid, mid, data)
return { 'ok', 'requeued' }
