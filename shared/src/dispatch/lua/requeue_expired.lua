-- requeue_expired (the reaper; control plane): executions whose lease ran out go back to their
-- queue (or FAILED attempts_exhausted); executions past their hard deadline fail with timeout.
-- Both are due in one sorted set (`leases` holds each execution's next deadline: the lease's, or
-- the hard one when that comes first); the execution's deadline_ms tells them apart.
-- One script, so two reapers at once cannot handle an execution twice.
-- KEYS: config, leases, queued, events, heads
-- ARGV: prefix, limit, now_ms ('' = Redis TIME; a value is for tests and tools)
-- Reply: {requeued, failed, timed_out, cancelled, cleaned}
K = bind_keys({ 'config', 'leases', 'queued', 'events', 'heads' })
int_arg(ARGV[2], 1, 10000, 'limit')
if ARGV[3] ~= '' then NOW = int_arg(ARGV[3], 0, 1e15, 'now_ms') end

-- Runs past its hard deadline: FAILED timeout, whatever attempts are left (DESIGN.md).
local function time_out_execution(eid, ex)
  local id, mid = ex[1], ex[2]
  local j = job_fields(id)
  end_execution(eid, ex, 'FAILED')
  if j.status ~= 'PROCESSING' or j.execution_id ~= eid then return 'cleaned' end
  local message = 'the job ran longer than its timeout of ' .. (j.timeout_ms or '?') .. ' ms'
  local err = json_obj({ { 'code', 'timeout', 'w' }, { 'message', message, 's' } })
  finish(id, 'FAILED', j.progress, 'error', err)
  emit('job.failed', id, eid, mid, json_obj({ { 'error', err, 'raw' },
    { 'attempts', j.attempts, 'n' }, { 'reason', 'timeout', 'w' },
    { 'exec_status', 'FAILED', 'w' } }))
  return 'timed_out'
end

load_epoch()
local now = now_ms()
local now_s = now_text()
local counts = { requeued = 0, failed = 0, timed_out = 0, cancelled = 0, cleaned = 0 }
for _, eid in ipairs(redis.call('ZRANGEBYSCORE', K.leases, '-inf', now_s, 'LIMIT', 0, ARGV[2])) do
  local ex = exec_read(eid)
  local r
  -- Past both deadlines is a timeout, not a lost execution.
  if ex[1] and ex[3] == 'RUNNING' and now >= (tonumber(ex[5]) or math.huge) then
    r = time_out_execution(eid, ex)
  else
    r = lose_execution(eid, ex, 'lease_expired')
  end
  counts[r] = counts[r] + 1
end
return { counts.requeued, counts.failed, counts.timed_out, counts.cancelled, counts.cleaned }
