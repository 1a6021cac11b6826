-- lifecycle.lua: helpers of the functions that end, requeue or fence executions (complete,
-- complete_claim, fail, cancelled, release, progress, cancel, requeue_expired, deregister), in
-- the library after common.lua.

-- Moves up to `free` of a user's held jobs back to their class queues, best first (ZPOPMIN:
-- one command reads and removes them), and wakes claimers for them. Called whenever the user's
-- running count drops while something of theirs is held. Every job popped leaves the held count,
-- placed or not (one that is no longer QUEUED is simply dropped).
local function unpark(uid, free)
  if free <= 0 then return end
  local held = call('ZPOPMIN', key('held:', uid), free)
  if #held == 0 then return end
  for i = 1, #held, 2 do
    local id = held[i]
    local j = call('HMGET', key('job:', id), 'class', 'status')
    if j[1] and j[2] == 'QUEUED' then
      place(j[1], id, held[i + 1])
    end
  end
  call('INCRBY', key('user:', uid, ':running'), int(-(#held / 2) * HELD_UNIT))
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
  local n = call('DECR', rk)
  if n <= 0 then
    if n < 0 then call('DEL', rk) end -- a count lost with Redis's data: start again
    return
  end
  unpark_room(uid, n)
end

-- Ends execution `rec` (its record, see common.lua) on machine `m` (its HMGET of
-- MACHINE_FIELDS), in memory only: the record leaves the list and the end goes in front of
-- `ended`. The caller writes the machine (write_machine/refresh_machine with m[4] and m[5]) once,
-- however many executions it ended. The user's slot is freed at once.
local function end_execution_later(m, rec, exec_status)
  m[4] = execs_remove(m[4], rec[1])
  m[5] = ended_add(m[5], rec[1], exec_status)
  release_user(rec[3])
end

-- Ends one execution and writes its machine. Its lease entry stays (see lease_lower).
local function end_execution(mid, m, rec, exec_status)
  end_execution_later(m, rec, exec_status)
  refresh_machine(mid, m, m[4], m[5], nil)
end

-- A job back in its place: the score it got at submission is kept, so a requeued job goes
-- ahead of everything submitted after it at its priority.
local function requeue(id, class, score)
  local jk = key('job:', id)
  call('HSET', jk, 'status', 'QUEUED')
  call('HDEL', jk, 'execution_id', 'machine_id', 'started_ms', 'progress')
  call('INCR', K.queued)
  place(class, id, score)
end

-- A finished job keeps its hash (idempotent enqueue, late reports, the API's fast path, and the
-- reconciler, which must not restore a job Postgres does not know finished yet) but not its
-- payload, which is the big part: it is emptied in the same HSET. It gets no TTL here: the
-- persister starts its finished_ttl once Postgres holds the job's end (Dispatch::expire_finished),
-- so Redis never forgets a finished job that is not persisted yet.
-- `had_progress`: the job has a progress field to drop. `field, value`: one more field to set.
local function finish(id, status, had_progress, field, value)
  local jk = key('job:', id)
  if field then
    call('HSET', jk, 'status', status, 'finished_ms', now_text(), 'payload', '', field,
      value)
  else
    call('HSET', jk, 'status', status, 'finished_ms', now_text(), 'payload', '')
  end
  if had_progress then call('HDEL', jk, 'progress') end
end

-- ON_EMITTED's for complete_claim (see xadd).
local function finish_completed(id)
  finish(id, 'COMPLETED', false)
end

-- The job fields a fenced report or an expiry needs, in this order (see job_fields).
local JOB_FIELDS = { 'status', 'execution_id', 'attempts', 'max_attempts', 'cancel_requested',
  'class', 'score', 'progress', 'timeout_ms' }
local function job_fields(id)
  local j = call('HMGET', key('job:', id), unpack(JOB_FIELDS))
  return {
    status = j[1],
    execution_id = j[2],
    attempts = tonumber(j[3]) or 0,
    max_attempts = tonumber(j[4]) or 1,
    cancel = j[5] == '1',
    class = j[6],
    score = j[7],
    progress = j[8] ~= false,
    timeout_ms = j[9],
  }
end

-- The fence. A report is accepted only from the machine that runs the execution, while it runs
-- (its record is on the machine's list), and only while it is its job's current one. `m`: the
-- caller's machine, its HMGET of MACHINE_FIELDS. Returns job id, the job's fields (job_fields,
-- plus `user`; with `light`, the record again) and the execution's record on success, else nil
-- and the outcome to reply with.
-- Another machine's report changes nothing and writes no event (it must not get the real
-- execution marked stale); a late report of the caller's own execution is recorded as
-- execution.stale. `done_status`: the execution status this report leads to, when a repeat of
-- it (the agent retrying after a lost reply) should just be answered 'again'. `light`: the
-- caller needs only the user and the attempts (complete), which the record holds: a running
-- execution is always its job's current one (every function that moves a job on ends its
-- execution first), so the job is not read, and the record returned holds its first four parts
-- only (eid, job, user, attempts: what ending it needs).
local function fence(mid, eid, m, report, done_status, light)
  local at = record_at(m[4], eid)
  if at then
    if light then
      -- Only the record's first four parts are read (the rest are not needed to end it).
      local job, user, attempts = match(m[4], RECORD_HEAD_PATTERN, at)
      local rec = { eid, job, user, attempts }
      return job, rec, rec
    end
    local rec = record_parse(m[4], at)
    local j = job_fields(rec[2])
    if j.status == 'PROCESSING' and j.execution_id == eid then
      j.user = rec[3]
      return rec[2], j, rec
    end
    -- (A running record whose job moved on should not happen: reported as stale.)
    emit('execution.stale', rec[2], eid, mid,
      json_obj({ { 'report', report, 'w' }, { 'exec_status', 'RUNNING', 'w' } }))
    return nil, 'stale'
  end
  -- Not on the list: the id is matched now, before it names a key (see id_arg).
  uuid_arg(eid, 'execution_id')
  local job, owner = exec_owner(eid)
  if owner and owner ~= mid then return nil, 'not_owner' end
  local ended = ended_status(m[5], eid)
  if ended and done_status and ended == done_status then return nil, 'again' end
  emit('execution.stale', job, eid, mid,
    json_obj({ { 'report', report, 'w' }, { 'exec_status', ended, 'w' } }))
  return nil, 'stale'
end

-- An execution nobody watches any more (its lease expired, its machine left): the job goes back
-- to its place while it has attempts left, else FAILED attempts_exhausted; a job whose cancel
-- was asked for ends CANCELLED. `rec`: the execution's record on machine `m`, which it leaves
-- (in memory: the caller writes the machine). Returns what happened.
local function lose_execution(mid, m, rec, reason)
  local id, eid = rec[2], rec[1]
  local j = job_fields(id)
  end_execution_later(m, rec, 'LOST')
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

-- A report's machine, read once: its HMGET of MACHINE_FIELDS.
local function report_machine(mid)
  return call('HMGET', machine_key(mid), unpack(MACHINE_FIELDS))
end
