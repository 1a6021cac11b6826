-- complete: the current execution finished; the job is COMPLETED. Idempotent for the same
-- execution (a retry after a lost reply answers ok and writes nothing).
-- KEYS: epoch, config, leases, timeouts, queued, events
-- ARGV: prefix, machine_id, execution_id, outputs_json
-- Reply: {'ok'} | {'stale'} | {'not_owner'} | {'restoring'}
K = bind_keys({ 'epoch', 'config', 'leases', 'timeouts', 'queued', 'events' })
local mid = uuid_arg(ARGV[2], 'machine_id')
local eid = uuid_arg(ARGV[3], 'execution_id')
local outputs = json_arg(ARGV[4], 1048576, 'outputs')

if not load_epoch() then return { 'restoring' } end
local id, job = fence(mid, eid, 'complete', 'COMPLETED')
-- A repeat of a complete that went through (its reply was lost) is answered ok, once more.
if job == 'again' then return { 'ok' } end
if not id then return { job } end
local cfg = config()
end_execution(eid, mid, job.user, 'COMPLETED', cfg)
finish(id, 'COMPLETED', cfg, nil)
emit('job.completed', id, eid, mid, json_obj({ { 'attempts', job.attempts, 'n' },
  { 'exec_status', 'COMPLETED', 's' }, { 'outputs', outputs, 'raw' } }))
return { 'ok' }
