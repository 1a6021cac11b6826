-- requeue_expired (the reaper; control plane): executions whose lease ran out go back to their
-- queue (or FAILED attempts_exhausted); executions past their hard deadline fail with timeout.
-- `leases` holds one entry per machine that runs something, scored with a lower bound of when
-- its first execution is due (see lease_lower); each record's until_ms and deadline_ms tell
-- what is due and why. A machine found with nothing due gets its entry moved to the true
-- minimum (or removed): counted as cleaned.
-- One function, so two reapers at once cannot handle an execution twice.
-- KEYS: config, leases, queued, events, heads
-- ARGV: prefix, limit (machines), now_ms ('' = Redis TIME; a value is for tests and tools)
-- Reply: {requeued, failed, timed_out, cancelled, cleaned}
K = bind_keys(KEYS_AGENT)
int_arg(ARGV[2], 1, 10000, 'limit')
if ARGV[3] ~= '' then NOW = int_arg(ARGV[3], 0, 1e15, 'now_ms') end

-- Runs past its hard deadline: FAILED timeout, whatever attempts are left (DESIGN.md).
local function time_out_execution(mid, m, rec)
  local id, eid = rec[2], rec[1]
  local j = job_fields(id)
  end_execution_later(m, rec, 'FAILED')
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
for _, mid in ipairs(call('ZRANGEBYSCORE', K.leases, '-inf', now_s, 'LIMIT', 0, ARGV[2])) do
  local m = report_machine(mid)
  if not m[1] then
    -- (The machine's hash is gone, and its records with it.)
    call('ZREM', K.leases, mid)
    counts.cleaned = counts.cleaned + 1
  else
    local handled, running = 0, {}
    for _, rec in ipairs(records(m[4])) do
      if tonumber(rec[7]) > now then
        running[#running + 1] = rec
      else
        local r
        -- Past both deadlines is a timeout, not a lost execution.
        if now >= tonumber(rec[6]) then
          r = time_out_execution(mid, m, rec)
        else
          r = lose_execution(mid, m, rec, 'lease_expired')
        end
        counts[r] = counts[r] + 1
        handled = handled + 1
      end
    end
    if handled == 0 then counts.cleaned = counts.cleaned + 1 end
    local lease = lease_exact(mid, m[6], running)
    if handled > 0 then
      refresh_machine(mid, m, m[4], m[5], lease)
    elseif lease then
      call('HSET', key('machine:', mid), 'lease', lease)
    end
  end
end
return { counts.requeued, counts.failed, counts.timed_out, counts.cancelled, counts.cleaned }
