-- fail: the current execution failed. Retryable with attempts left → back to QUEUED in its place;
-- otherwise FAILED. A job whose cancel was asked for ends CANCELLED instead of being retried.
-- KEYS: config, leases, queued, events, heads
-- ARGV: prefix, machine_id, execution_id, error_json, retryable (0|1)
-- Reply: {'ok', 'requeued'|'failed'|'cancelled', attempts} | {'stale'} | {'not_owner'}
--      | {'restoring'}
K = bind_keys(KEYS_AGENT)
local mid = uuid_arg(ARGV[2], 'machine_id')
local eid = uuid_arg(ARGV[3], 'execution_id')
local err = json_arg(ARGV[4], 65536, 'error')
local retryable = int_arg(ARGV[5], 0, 1, 'retryable') == 1

if not load_epoch() then return { 'restoring' } end
local m = report_machine(mid)
local id, job, rec = fence(mid, eid, m, 'fail')
if not id then return { job } end
end_execution(mid, m, rec, 'FAILED')
local data = json_obj({ { 'attempts', job.attempts, 'n' }, { 'retryable', retryable, 'b' },
  { 'exec_status', 'FAILED', 'w' }, { 'reason', 'failed', 'w' }, { 'error', err, 'raw' } })
if job.cancel then
  finish(id, 'CANCELLED', job.progress)
  emit('job.cancelled', id, eid, mid, data)
  return { 'ok', 'cancelled', job.attempts }
elseif retryable and job.attempts < job.max_attempts then
  requeue(id, job.class, job.score)
  emit('job.requeued', id, eid, mid, data)
  return { 'ok', 'requeued', job.attempts }
else
  finish(id, 'FAILED', job.progress, 'error', err)
  emit('job.failed', id, eid, mid, data)
  return { 'ok', 'failed', job.attempts }
end
