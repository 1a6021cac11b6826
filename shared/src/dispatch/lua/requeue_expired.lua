-- requeue_expired (the reaper; control plane): executions whose lease ran out go back to their
-- queue (or FAILED attempts_exhausted); executions past their hard deadline fail with timeout.
-- One script, so two reapers at once cannot handle an execution twice.
-- KEYS: epoch, config, leases, timeouts, queued, events
-- ARGV: prefix, limit (per kind), now_ms ('' = Redis TIME; a value is for tests and tools)
-- Reply: {requeued, failed, timed_out, cancelled, cleaned}
K = bind_keys({ 'epoch', 'config', 'leases', 'timeouts', 'queued', 'events' })
local limit = int_arg(ARGV[2], 1, 10000, 'limit')
if ARGV[3] ~= '' then NOW = int_arg(ARGV[3], 0, 1e15, 'now_ms') end

load_epoch()
local cfg = config()
local now = fmt(now_ms())
local counts = { requeued = 0, failed = 0, timed_out = 0, cancelled = 0, cleaned = 0 }
-- Timeouts first: an execution past both deadlines is a timeout, not a lost one.
for _, eid in ipairs(redis.call('ZRANGEBYSCORE', K.timeouts, '-inf', now, 'LIMIT', 0, limit)) do
  local r = time_out_execution(eid, cfg)
  counts[r] = counts[r] + 1
end
for _, eid in ipairs(redis.call('ZRANGEBYSCORE', K.leases, '-inf', now, 'LIMIT', 0, limit)) do
  local r = lose_execution(eid, 'lease_expired', cfg)
  counts[r] = counts[r] + 1
end
return { counts.requeued, counts.failed, counts.timed_out, counts.cancelled, counts.cleaned }
