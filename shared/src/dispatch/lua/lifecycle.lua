-- lifecycle.lua: helpers of the functions that end, requeue or fence executions (complete,
-- complete_claim, fail, cancelled, release, progress, cancel, requeue_expired, deregister), in
-- the library after common.lua.

-- Takes `eid` off its machine's list and refreshes the machine's status, in one read and one
-- write (nothing for a machine that is gone).
local function machine_release(mid, eid)
  local m = redis.call('HMGET', key('machine:', mid), unpack(MACHINE_FIELDS))
  local old = m[1]
  if not old or old == 'OFFLINE' or old == 'TERMINATED' then return old end
  return refresh_machine(mid, m, execs_remove(m[4], eid))
end

-- Moves up to `free` of a user's held jobs back to their class queues, best first (ZPOPMIN:
-- one command reads and removes them), and wakes claimers for them. Called whenever the user's
-- running count drops while something of theirs is held. Every job popped leaves the held count,
-- placed or not (one that is no longer QUEUED is simply dropped).
local function unpark(uid, free)
  if free <= 0 then return end
  local held = redis.call('ZPOPMIN', key('held:', uid), free)
  if #held == 0 then return end
  for i = 1, #held, 2 do
    local id = held[i]
    local j = redis.call('HMGET', key('job:', id), 'class', 'status')
    if j[1] and j[2] == 'QUEUED' then
      place(j[1], id, held[i + 1])
    end
  end
  redis.call('INCRBY', key('user:', uid, ':running'), int(-(#held / 2) * HELD_UNIT))
end

-- `n`: the user's counter as it stands. When something of theirs is held, as many held jobs as
-- they have room for go back to their queues.
local function unpark_room(uid, n)
  if n >= HELD_UNIT then unpark(uid, config().per_user - n % HELD_UNIT) end
end

-- One of the user's jobs stopped running: their counter goes down by one and, when something of
-- theirs is held (the same counter tells), that much room is handed to it.
-- (A counter at 0 stays: deleting it would cost a command at every end of a user's only job,
-- and the next claim of theirs would create it again. One small key per user.)
local function release_user(uid)
  local rk = key('user:', uid, ':running')
  local n = redis.call('DECR', rk)
  if n <= 0 then
    if n < 0 then redis.call('DEL', rk) end -- a count lost with Redis's data: start again
    return
  end
  unpark_room(uid, n)
end

-- Ends an execution: its lease entry gone, its record rewritten with its end status and an
-- expiry (so a late report can still be told apart: another machine's → refused, its own →
-- stale), machine and user slots freed. `ex` is its exec_read. end_execution_later leaves the
-- machine and the user to the caller (complete_claim, which claims the next job first).
local function end_execution_later(eid, ex, exec_status)
  redis.call('ZREM', K.leases, eid)
  redis.call('SET', key('exec:', eid), exec_text(ex, exec_status), 'PX', config().finished_ttl)
end
local function end_execution(eid, ex, exec_status)
  end_execution_later(eid, ex, exec_status)
  machine_release(ex[2], eid)
  release_user(ex[4])
end

-- A job back in its place: the score it got at submission is kept, so a requeued job goes
-- ahead of everything submitted after it at its priority.
local function requeue(id, class, score)
  local jk = key('job:', id)
  redis.call('HSET', jk, 'status', 'QUEUED')
  redis.call('HDEL', jk, 'execution_id', 'machine_id', 'started_ms', 'progress')
  redis.call('INCR', K.queued)
  place(class, id, score)
end

-- A finished job keeps its hash for finished_ttl (idempotent enqueue, late reports, the API's
-- fast path) but not its payload, which is the big part: it is emptied in the same HSET.
-- `had_progress`: the job has a progress field to drop. `field, value`: one more field to set.
local function finish(id, status, had_progress, field, value)
  local jk = key('job:', id)
  if field then
    redis.call('HSET', jk, 'status', status, 'finished_ms', now_text(), 'payload', '', field,
      value)
  else
    redis.call('HSET', jk, 'status', status, 'finished_ms', now_text(), 'payload', '')
  end
  if had_progress then redis.call('HDEL', jk, 'progress') end
  redis.call('PEXPIRE', jk, config().finished_ttl)
end

-- The job fields a fenced report or an expiry needs, in this order (see job_fields).
local JOB_FIELDS = { 'status', 'execution_id', 'attempts', 'max_attempts', 'cancel_requested',
  'class', 'score', 'progress', 'timeout_ms' }
local function job_fields(id)
  local j = redis.call('HMGET', key('job:', id), unpack(JOB_FIELDS))
  return {
    status = j[1],
    execution_id = j[2],
    attempts = tonumber(j[3]) or 0,
    attempts_text = j[3] or '0',
    max_attempts = tonumber(j[4]) or 1,
    cancel = j[5] == '1',
    class = j[6],
    score = j[7],
    progress = j[8] ~= false,
    timeout_ms = j[9],
  }
end

-- The fence. A report is accepted only from the job's current execution, and only from the
-- machine that runs it. Returns job id and the job's fields (job_fields, plus `user`) on
-- success, else nil and the outcome to reply with. Another machine's report changes nothing and
-- writes no event (it must not get the real execution marked stale); a late report of the
-- caller's own execution is recorded as execution.stale. `done_status`: the execution status
-- this report leads to, when a repeat of it (the agent retrying after a lost reply) should just
-- be answered 'again'. `light`: the caller needs only `user` and `attempts_text` (complete),
-- which the execution holds: a RUNNING execution is always its job's current one (every script
-- that moves a job on ends its execution first), so the job is not read. The third result is the
-- execution's exec_read, for end_execution.
local function fence(mid, eid, report, done_status, light)
  local ex = exec_read(eid)
  if ex[1] and ex[2] ~= mid then return nil, 'not_owner' end
  if ex[1] and done_status and ex[3] == done_status then return nil, 'again' end
  if light and ex[3] == 'RUNNING' then
    return ex[1], { user = ex[4], attempts_text = ex[6] }, ex
  end
  if ex[1] and ex[3] == 'RUNNING' then
    local j = job_fields(ex[1])
    if j.status == 'PROCESSING' and j.execution_id == eid then
      j.user = ex[4]
      return ex[1], j, ex
    end
  end
  emit('execution.stale', ex[1], eid, mid,
    json_obj({ { 'report', report, 'w' }, { 'exec_status', ex[3], 'w' } }))
  return nil, 'stale'
end

-- An execution nobody watches any more (its lease expired, its machine left): the job goes back
-- to its place while it has attempts left, else FAILED attempts_exhausted; a job whose cancel
-- was asked for ends CANCELLED. `ex`: the execution's exec_read. Returns what happened.
local function lose_execution(eid, ex, reason)
  if not ex[1] or ex[3] ~= 'RUNNING' then
    redis.call('ZREM', K.leases, eid)
    return 'cleaned'
  end
  local id, mid = ex[1], ex[2]
  local j = job_fields(id)
  end_execution(eid, ex, 'LOST')
  if j.status ~= 'PROCESSING' or j.execution_id ~= eid then return 'cleaned' end
  local attempts = j.attempts
  if j.cancel then
    finish(id, 'CANCELLED', j.progress)
    emit('job.cancelled', id, eid, mid,
      json_obj({ { 'reason', reason, 'w' }, { 'exec_status', 'LOST', 'w' } }))
    return 'cancelled'
  elseif attempts < j.max_attempts then
    requeue(id, j.class, j.score)
    emit('job.requeued', id, eid, mid, json_obj({ { 'reason', reason, 'w' },
      { 'attempts', attempts, 'n' }, { 'exec_status', 'LOST', 'w' } }))
    return 'requeued'
  else
    local err = json_obj({ { 'code', 'attempts_exhausted', 'w' },
      { 'message', 'the job was lost ' .. attempts .. ' times (' .. reason .. ')', 's' } })
    finish(id, 'FAILED', j.progress, 'error', err)
    emit('job.failed', id, eid, mid, json_obj({ { 'error', err, 'raw' },
      { 'attempts', attempts, 'n' }, { 'reason', reason, 'w' }, { 'exec_status', 'LOST', 'w' } }))
    return 'failed'
  end
end
