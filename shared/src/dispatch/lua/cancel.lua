-- cancel (control plane): QUEUED (queued or held) → CANCELLED at once; PROCESSING → the cancel
-- flag, which the machine learns from its next heartbeat (or progress reply) and confirms with
-- `cancelled`.
-- KEYS: config, queued, events, heads, job:<id>
-- ARGV: prefix, job_id
-- Reply: {'cancelled'} | {'cancel_requested', machine_id, execution_id}
--      | {'finished', status} | {'unknown'}
K = bind_keys(KEYS_CANCEL)
local id = uuid_arg(ARGV[2], 'job_id')
local jk = want_key(5, 'job:', id)

load_epoch()
local j = call('HMGET', jk, 'status', 'class', 'user_id', 'cancel_requested', 'machine_id',
  'execution_id')
local status = j[1]
if not status then return { 'unknown' } end
if status == 'QUEUED' then
  -- In its class queue or in its user's held set, never both. Leaving the queue keeps the heads
  -- index a valid lower bound, so it is not touched.
  local from_queue = call('ZREM', key('q:', j[2]), id)
  local removed = from_queue
  if from_queue == 0 then
    removed = call('ZREM', key('held:', j[3]), id)
    if removed > 0 then call('INCRBY', key('user:', j[3], ':running'), -HELD_UNIT) end
  end
  if removed > 0 then call('DECR', K.queued) end
  finish(id, 'CANCELLED', false, 'cancel_requested', '1')
  if from_queue > 0 then
    -- It may have been unparked to use a free slot of its user; without this, the user's held
    -- jobs could wait for a release that never comes (nothing of theirs running any more).
    unpark_room(j[3], tonumber(call('GET', key('user:', j[3], ':running')) or '0'))
  end
  emit('job.cancelled', id, nil, nil, json_obj({ { 'reason', 'cancelled_while_queued', 'w' } }))
  return { 'cancelled' }
elseif status == 'PROCESSING' then
  if j[4] ~= '1' then
    call('HSET', jk, 'cancel_requested', '1')
    emit('job.cancel_requested', id, j[6], j[5], nil)
  end
  return { 'cancel_requested', j[5], j[6] }
end
return { 'finished', status }
