-- complete: the current execution finished; the job is COMPLETED. Idempotent for the same
-- execution (a retry after a lost reply answers ok and writes nothing).
-- KEYS: config, leases, queued, events, heads
-- ARGV: prefix, machine_id, execution_id, outputs_json
-- Reply: {'ok'} | {'stale'} | {'not_owner'} | {'restoring'}
K = bind_keys(KEYS_AGENT)
local mid = id_arg(ARGV[2], 'machine_id')
local eid = id_arg(ARGV[3], 'execution_id')
local outputs = json_arg(ARGV[4], 1048576, 'outputs')

if not load_epoch() then return { 'restoring' } end
local m = report_machine(mid)
known_machine_arg(mid, m)
local id, job, rec = fence(mid, eid, m, 'complete', 'COMPLETED', true)
-- A repeat of a complete that went through (its reply was lost) is answered ok, once more.
if job == 'again' then return { 'ok' } end
if not id then return { job } end
end_execution(mid, m, rec, 'COMPLETED')
-- (The last progress stays: it is shown only while a job runs, and dropping it costs a command.)
finish(id, 'COMPLETED', false)
emit('job.completed', id, eid, mid, '{"attempts":' .. rec[4]
  .. ',"exec_status":"COMPLETED","outputs":' .. outputs .. '}')
return { 'ok' }
