-- common.lua: helpers every dispatch script starts with (Rust glues this file in front of each
-- script's body, so a script is one self-contained chunk; Redis Lua has no modules).
--
-- Conventions
-- * ARGV[1] is the key prefix `{<tag>}:`. Per-id keys (job:<id>, exec:<eid>, held:<uid>, ...) are
--   built from it inside the scripts because their names are only known from data read here
--   (a job's user, an execution's machine). They carry the same hash tag as every declared key,
--   so they live in the same Redis Cluster slot; the checks below make sure of that.
-- * Every fixed key a script touches is declared in KEYS and checked by name, so a wrapper that
--   passes keys in the wrong order fails loudly instead of writing to the wrong key.
-- * Times come from TIME, never from the caller (an agent's clock is not to be trusted).
-- * Numbers are written with fmt() (`%.0f`): Lua numbers are doubles and the default number to
--   string conversion may use an exponent; every value we store is an integer below 2^53.
-- * Argument errors are raised as `EMPARG <field>: <reason>`, which the Rust side maps to a typed
--   error. Nothing has been written when they are raised (all checks come first).

local P = ARGV[1]

local function argerr(field, reason)
  error({ err = 'EMPARG ' .. field .. ': ' .. reason })
end

if type(P) ~= 'string' or not string.match(P, '^{[%w_%.%-]+}:$') then
  argerr('prefix', 'must look like {name}:')
end
for i = 1, #KEYS do
  if string.sub(KEYS[i], 1, #P) ~= P then
    argerr('keys', 'KEYS[' .. i .. '] is outside ' .. P)
  end
end

-- Declared keys, by name: K.leases, K.events... `names` lists the fixed keys in KEYS order.
local function bind_keys(names)
  local k = {}
  for i, name in ipairs(names) do
    if KEYS[i] ~= P .. name then
      argerr('keys', 'KEYS[' .. i .. '] must be ' .. P .. name)
    end
    k[name] = KEYS[i]
  end
  return k
end

local function want_key(i, name)
  if KEYS[i] ~= P .. name then
    argerr('keys', 'KEYS[' .. i .. '] must be ' .. P .. name)
  end
  return KEYS[i]
end

local NOW = nil
local function now_ms()
  if not NOW then
    local t = redis.call('TIME')
    NOW = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return NOW
end

local function fmt(n)
  return string.format('%.0f', n)
end

local HEX = '[0-9a-f]'
local UUID_PATTERN = '^' .. string.rep(HEX, 8) .. '%-' .. string.rep(HEX, 4) .. '%-'
  .. string.rep(HEX, 4) .. '%-' .. string.rep(HEX, 4) .. '%-' .. string.rep(HEX, 12) .. '$'
local CLASS_PATTERN = '^' .. string.rep(HEX, 32) .. '$'

local function uuid_arg(s, field)
  if type(s) ~= 'string' or not string.match(s, UUID_PATTERN) then
    argerr(field, 'must be a lowercase hyphenated UUID')
  end
  return s
end

local function class_arg(s, field)
  if type(s) ~= 'string' or not string.match(s, CLASS_PATTERN) then
    argerr(field, 'must be 32 lowercase hex characters')
  end
  return s
end

local function int_arg(s, lo, hi, field)
  local n = tonumber(s)
  if not n or n ~= math.floor(n) or n < lo or n > hi then
    argerr(field, 'must be an integer from ' .. fmt(lo) .. ' to ' .. fmt(hi))
  end
  return n
end

local function str_arg(s, min_len, max_len, field)
  if type(s) ~= 'string' or #s < min_len or #s > max_len then
    argerr(field, 'must be ' .. min_len .. ' to ' .. max_len .. ' bytes')
  end
  return s
end

-- JSON arguments are stored and forwarded as given (so numbers keep their exact text); decoding
-- here only proves they are JSON.
local function json_arg(s, max_len, field)
  str_arg(s, 1, max_len, field)
  if not pcall(cjson.decode, s) then
    argerr(field, 'must be JSON')
  end
  return s
end

-- Builds a JSON object from {key, value, kind} triples without decoding anything: kind 's' is a
-- string (escaped by cjson), 'n' an integer, 'b' a boolean, 'raw' JSON text already validated.
-- A nil value (or false, which is how Redis hands back a missing field) drops the field, so
-- optional fields are simply absent; kind 'b' always writes true or false.
local function json_obj(fields)
  local parts = {}
  for i = 1, #fields do
    local key, value, kind = fields[i][1], fields[i][2], fields[i][3]
    if kind == 'b' or (value ~= nil and value ~= false) then
      local text
      if kind == 's' then
        text = cjson.encode(value)
      elseif kind == 'n' then
        text = fmt(value)
      elseif kind == 'b' then
        text = (value == true or value == 1 or value == '1') and 'true' or 'false'
      else
        text = value
      end
      parts[#parts + 1] = cjson.encode(key) .. ':' .. text
    end
  end
  return '{' .. table.concat(parts, ',') .. '}'
end

-- Key builders for per-id keys (see the header).
local function k_job(id) return P .. 'job:' .. id end
local function k_exec(eid) return P .. 'exec:' .. eid end
local function k_queue(class) return P .. 'q:' .. class end
local function k_wake(class) return P .. 'wake:' .. class end
local function k_held(uid) return P .. 'held:' .. uid end
local function k_user_running(uid) return P .. 'user:' .. uid .. ':running' end
local function k_machine(mid) return P .. 'machine:' .. mid end
local function k_machine_execs(mid) return P .. 'machine:' .. mid .. ':execs' end

-- A wake list only has to hold enough tokens to wake the claimers that are blocked right now
-- (each script pushes one token, and Redis hands it to a blocked BLPOP as soon as the script
-- ends); the cap bounds the spurious wake-ups left behind when nobody was waiting.
local WAKE_CAP = 32

-- Offline machines keep their hash this long (admin pages, a box that comes back), then go.
local OFFLINE_MACHINE_TTL_MS = 7 * 24 * 3600 * 1000

local K = nil -- set by each script with bind_keys
local EPOCH = nil -- the epoch value when the script declared the epoch key and it exists

local function load_epoch()
  EPOCH = redis.call('GET', K.epoch)
  return EPOCH
end

local function config()
  local c = redis.call('HMGET', K.config, 'max_concurrent_jobs_per_user', 'max_queue_size',
    'lease_ms', 'finished_ttl_ms')
  return {
    per_user = tonumber(c[1]) or 10,
    max_queue = tonumber(c[2]) or 1000,
    lease_ms = tonumber(c[3]) or 60000,
    finished_ttl_ms = tonumber(c[4]) or 3600000,
  }
end

-- Every state change writes its event in the same script, so Redis and the stream never
-- disagree. `data` is JSON text (see json_obj) or nil.
local function emit(kind, job, exec, machine, data)
  local f = { 'type', kind, 'ts', fmt(now_ms()) }
  if EPOCH then f[#f + 1] = 'ep'; f[#f + 1] = EPOCH end
  if job then f[#f + 1] = 'job'; f[#f + 1] = job end
  if exec then f[#f + 1] = 'exec'; f[#f + 1] = exec end
  if machine then f[#f + 1] = 'machine'; f[#f + 1] = machine end
  if data and data ~= '{}' then f[#f + 1] = 'data'; f[#f + 1] = data end
  redis.call('XADD', K.events, '*', unpack(f))
end

local function wake(class)
  local key = k_wake(class)
  redis.call('LPUSH', key, '1')
  redis.call('LTRIM', key, 0, WAKE_CAP - 1)
end

-- Machine status follows from facts: the operator's drain flag, whether the agent said it is
-- ready, and how many of its slots are taken. Emits machine.status when it changes.
-- `ready`: true/false to set readiness, nil to keep it as it is.
local function machine_refresh(mid, ready, reason)
  local mk = k_machine(mid)
  local m = redis.call('HMGET', mk, 'status', 'max_slots', 'drain')
  local old = m[1]
  if not old or old == 'OFFLINE' or old == 'TERMINATED' then return old end
  local running = redis.call('SCARD', k_machine_execs(mid))
  if ready == nil then ready = old ~= 'STARTING' end
  if running > 0 then ready = true end
  local new
  if m[3] == '1' then
    new = 'DRAINING'
  elseif not ready then
    new = 'STARTING'
  elseif running >= (tonumber(m[2]) or 1) then
    new = 'BUSY'
  else
    new = 'AVAILABLE'
  end
  if new ~= old then
    redis.call('HSET', mk, 'status', new)
    emit('machine.status', nil, nil, mid,
      json_obj({ { 'status', new, 's' }, { 'previous', old, 's' }, { 'reason', reason, 's' } }))
  end
  return new
end

-- Moves up to `free` of a user's held jobs back to their class queues, best first, and wakes
-- claimers for them. Called whenever the user's running count drops.
local function unpark(uid, free)
  if free <= 0 then return end
  local held = k_held(uid)
  local ids = redis.call('ZRANGE', held, 0, free - 1)
  for _, id in ipairs(ids) do
    redis.call('ZREM', held, id)
    local j = redis.call('HMGET', k_job(id), 'class', 'score', 'status')
    if j[1] and j[3] == 'QUEUED' then
      redis.call('ZADD', k_queue(j[1]), j[2], id)
      wake(j[1])
    end
  end
end

local function release_user(uid, cfg)
  local key = k_user_running(uid)
  local n = redis.call('DECR', key)
  if n <= 0 then
    redis.call('DEL', key)
    n = 0
  end
  unpark(uid, cfg.per_user - n)
end

-- Ends an execution: lease and timeout gone, tombstone kept for finished_ttl (so a late report
-- can still be told apart: another machine's → refused, its own → stale), machine and user
-- slots freed.
local function end_execution(eid, mid, uid, exec_status, cfg)
  redis.call('ZREM', K.leases, eid)
  redis.call('ZREM', K.timeouts, eid)
  local ek = k_exec(eid)
  redis.call('HSET', ek, 'status', exec_status, 'ended_ms', fmt(now_ms()))
  redis.call('PEXPIRE', ek, cfg.finished_ttl_ms)
  redis.call('SREM', k_machine_execs(mid), eid)
  machine_refresh(mid, nil, nil)
  release_user(uid, cfg)
end

-- A job back in its place: the score it got at submission is kept, so a requeued job goes
-- ahead of everything submitted after it at its priority.
local function requeue(id)
  local jk = k_job(id)
  redis.call('HSET', jk, 'status', 'QUEUED')
  redis.call('HDEL', jk, 'execution_id', 'machine_id', 'started_ms', 'progress')
  local j = redis.call('HMGET', jk, 'class', 'score')
  redis.call('ZADD', k_queue(j[1]), j[2], id)
  redis.call('INCR', K.queued)
  wake(j[1])
end

-- A finished job keeps its hash for finished_ttl (idempotent enqueue, late reports, the API's
-- fast path) but not its payload, which is the big part.
local function finish(id, status, cfg, extra)
  local jk = k_job(id)
  redis.call('HSET', jk, 'status', status, 'finished_ms', fmt(now_ms()))
  if extra then redis.call('HSET', jk, unpack(extra)) end
  redis.call('HDEL', jk, 'payload', 'progress')
  redis.call('PEXPIRE', jk, cfg.finished_ttl_ms)
end

-- The fence. A report is accepted only from the job's current execution, and only from the
-- machine that runs it. Returns job id and the job's fields on success, else nil and the
-- outcome to reply with. Another machine's report changes nothing and writes no event (it must
-- not get the real execution marked stale); a late report of the caller's own execution is
-- recorded as execution.stale. `done_status`: the execution status this report leads to, when
-- a repeat of it (the agent retrying after a lost reply) should just be answered 'again'.
local function fence(mid, eid, report, done_status)
  local ex = redis.call('HMGET', k_exec(eid), 'job', 'machine', 'status')
  if ex[1] and ex[2] ~= mid then return nil, 'not_owner' end
  if ex[1] and done_status and ex[3] == done_status then return nil, 'again' end
  if ex[1] and ex[3] == 'RUNNING' then
    local j = redis.call('HMGET', k_job(ex[1]), 'status', 'execution_id', 'user_id', 'attempts',
      'max_attempts', 'cancel_requested')
    if j[1] == 'PROCESSING' and j[2] == eid then
      return ex[1], {
        user = j[3],
        attempts = tonumber(j[4]) or 0,
        max_attempts = tonumber(j[5]) or 1,
        cancel = j[6] == '1',
      }
    end
  end
  emit('execution.stale', ex[1], eid, mid,
    json_obj({ { 'report', report, 's' }, { 'exec_status', ex[3], 's' } }))
  return nil, 'stale'
end

-- An execution nobody watches any more (its lease expired, its machine left): the job goes back
-- to its place while it has attempts left, else FAILED attempts_exhausted; a job whose cancel
-- was asked for ends CANCELLED. Returns what happened.
local function lose_execution(eid, reason, cfg)
  redis.call('ZREM', K.leases, eid)
  redis.call('ZREM', K.timeouts, eid)
  local ex = redis.call('HMGET', k_exec(eid), 'job', 'machine', 'status', 'user')
  if not ex[1] or ex[3] ~= 'RUNNING' then return 'cleaned' end
  local id, mid, uid = ex[1], ex[2], ex[4]
  local j = redis.call('HMGET', k_job(id), 'status', 'execution_id', 'attempts', 'max_attempts',
    'cancel_requested')
  end_execution(eid, mid, uid, 'LOST', cfg)
  if j[1] ~= 'PROCESSING' or j[2] ~= eid then return 'cleaned' end
  local attempts = tonumber(j[3]) or 0
  if j[5] == '1' then
    finish(id, 'CANCELLED', cfg, nil)
    emit('job.cancelled', id, eid, mid,
      json_obj({ { 'reason', reason, 's' }, { 'exec_status', 'LOST', 's' } }))
    return 'cancelled'
  elseif attempts < (tonumber(j[4]) or 1) then
    requeue(id)
    emit('job.requeued', id, eid, mid, json_obj({ { 'reason', reason, 's' },
      { 'attempts', attempts, 'n' }, { 'exec_status', 'LOST', 's' } }))
    return 'requeued'
  else
    local err = json_obj({ { 'code', 'attempts_exhausted', 's' },
      { 'message', 'the job was lost ' .. attempts .. ' times (' .. reason .. ')', 's' } })
    finish(id, 'FAILED', cfg, { 'error', err })
    emit('job.failed', id, eid, mid, json_obj({ { 'error', err, 'raw' },
      { 'attempts', attempts, 'n' }, { 'reason', reason, 's' }, { 'exec_status', 'LOST', 's' } }))
    return 'failed'
  end
end

-- Runs past its hard deadline: FAILED timeout, whatever attempts are left (DESIGN.md).
local function time_out_execution(eid, cfg)
  redis.call('ZREM', K.timeouts, eid)
  local ex = redis.call('HMGET', k_exec(eid), 'job', 'machine', 'status', 'user')
  if not ex[1] or ex[3] ~= 'RUNNING' then
    redis.call('ZREM', K.leases, eid)
    return 'cleaned'
  end
  local id, mid, uid = ex[1], ex[2], ex[4]
  local j = redis.call('HMGET', k_job(id), 'status', 'execution_id', 'attempts', 'timeout_ms')
  end_execution(eid, mid, uid, 'FAILED', cfg)
  if j[1] ~= 'PROCESSING' or j[2] ~= eid then return 'cleaned' end
  local err = json_obj({ { 'code', 'timeout', 's' },
    { 'message', 'the job ran longer than its timeout of ' .. j[4] .. ' ms', 's' } })
  finish(id, 'FAILED', cfg, { 'error', err })
  emit('job.failed', id, eid, mid, json_obj({ { 'error', err, 'raw' },
    { 'attempts', tonumber(j[3]) or 0, 'n' }, { 'reason', 'timeout', 's' },
    { 'exec_status', 'FAILED', 's' } }))
  return 'timed_out'
end
