-- claim: the best job among the heads of the caller's classes, as one new execution.
-- KEYS: epoch, config, leases, timeouts, queued, events, machine:<mid>, machine:<mid>:execs,
--       then q:<class> for each class the machine can run (at least one).
-- ARGV: prefix, machine_id, execution_id (caller's UUIDv7: the fence), max_parks.
-- Reply: {'claimed', job_id, execution_id, attempts, max_attempts, class, priority, timeout_ms,
--         user_id, started_ms, deadline_ms, payload}
--      | {'empty'} | {'again'} (parked max_parks heads; call again) | {'at_capacity'}
--      | {'draining'} | {'unknown_machine'} | {'restoring'}
K = bind_keys({ 'epoch', 'config', 'leases', 'timeouts', 'queued', 'events' })
local mid = uuid_arg(ARGV[2], 'machine_id')
local eid = uuid_arg(ARGV[3], 'execution_id')
local max_parks = int_arg(ARGV[4], 1, 10000, 'max_parks')
local mk = want_key(7, 'machine:' .. mid)
local execs_key = want_key(8, 'machine:' .. mid .. ':execs')
if #KEYS < 9 then argerr('keys', 'at least one class queue') end
local qprefix = P .. 'q:'
for i = 9, #KEYS do
  if string.sub(KEYS[i], 1, #qprefix) ~= qprefix then argerr('keys', 'KEYS[' .. i .. '] must be a class queue') end
  class_arg(string.sub(KEYS[i], #qprefix + 1), 'class')
end

if not load_epoch() then return { 'restoring' } end
local m = redis.call('HMGET', mk, 'status', 'max_slots', 'drain')
if not m[1] or m[1] == 'OFFLINE' or m[1] == 'TERMINATED' then return { 'unknown_machine' } end

local function claimed_reply(id)
  local j = redis.call('HMGET', k_job(id), 'attempts', 'max_attempts', 'class', 'priority',
    'timeout_ms', 'user_id', 'payload')
  local ex = redis.call('HMGET', k_exec(eid), 'started_ms', 'deadline_ms')
  return { 'claimed', id, eid, j[1], j[2], j[3], j[4], j[5], j[6], ex[1], ex[2], j[7] or '' }
end

-- The same execution id again from the same machine is a retry of a claim whose reply was lost:
-- answer it again instead of leaving that job orphaned until its lease expires.
local ex = redis.call('HMGET', k_exec(eid), 'job', 'machine', 'status')
if ex[1] then
  if ex[2] == mid and ex[3] == 'RUNNING' then return claimed_reply(ex[1]) end
  argerr('execution_id', 'already used')
end
if m[3] == '1' then return { 'draining' } end
local running = redis.call('SCARD', execs_key)
if running >= (tonumber(m[2]) or 1) then return { 'at_capacity' } end
local cfg = config()

-- heads[i] = {id, score} of queue KEYS[i], or false when it is empty
local heads = {}
local function read_head(i)
  local r = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
  if r[1] then heads[i] = { r[1], tonumber(r[2]) } else heads[i] = false end
end
for i = 9, #KEYS do read_head(i) end

local parks = 0
while true do
  local best = nil
  for i = 9, #KEYS do
    local h = heads[i]
    if h and (not best or h[2] < heads[best][2]) then best = i end
  end
  if not best then return { 'empty' } end
  local id = heads[best][1]
  local jk = k_job(id)
  local j = redis.call('HMGET', jk, 'status', 'user_id', 'score')
  if j[1] ~= 'QUEUED' then
    -- A queue entry without a queued job behind it (should not happen); drop it so it cannot
    -- block the queue.
    redis.call('ZREM', KEYS[best], id)
  else
    local uid = j[2]
    local user_running = tonumber(redis.call('GET', k_user_running(uid)) or '0')
    if user_running < cfg.per_user then
      -- Take it.
      redis.call('ZREM', KEYS[best], id)
      redis.call('DECR', K.queued)
      local now = now_ms()
      local attempts = redis.call('HINCRBY', jk, 'attempts', 1)
      local timeout_ms = tonumber(redis.call('HGET', jk, 'timeout_ms'))
      local deadline = now + timeout_ms
      redis.call('HSET', jk, 'status', 'PROCESSING', 'execution_id', eid, 'machine_id', mid,
        'started_ms', fmt(now))
      redis.call('HDEL', jk, 'progress')
      redis.call('HSET', k_exec(eid), 'job', id, 'machine', mid, 'user', uid, 'status', 'RUNNING',
        'started_ms', fmt(now), 'deadline_ms', fmt(deadline))
      redis.call('ZADD', K.leases, fmt(now + cfg.lease_ms), eid)
      redis.call('ZADD', K.timeouts, fmt(deadline), eid)
      redis.call('SADD', execs_key, eid)
      redis.call('INCR', k_user_running(uid))
      machine_refresh(mid, true, nil)
      emit('job.claimed', id, eid, mid, json_obj({ { 'attempts', attempts, 'n' },
        { 'user_id', uid, 's' }, { 'deadline_ms', deadline, 'n' } }))
      return claimed_reply(id)
    end
    -- The user is at their limit: park the job aside (same score) so it no longer blocks anyone;
    -- it comes back when one of the user's jobs ends.
    redis.call('ZREM', KEYS[best], id)
    redis.call('ZADD', k_held(uid), j[3], id)
  end
  parks = parks + 1
  if parks >= max_parks then return { 'again' } end
  read_head(best)
end
