-- common.lua: helpers of every dispatch function. Rust builds one function library from it,
-- lifecycle.lua, claim_next.lua and one body per function (see scripts.rs): the library is
-- loaded once (FUNCTION LOAD) and each call (FCALL) runs only its body, so none of these
-- helpers is built again per call, as it would be with EVALSHA.
--
-- Conventions
-- * ARGV[1] is the key prefix `{<tag>}:`. Per-id keys (job:<id>, exec:<eid>, held:<uid>, ...) are
--   built from it inside the functions because their names are only known from data read here
--   (a job's user, an execution's machine, the class the heads index names). They carry the same
--   hash tag as every declared key, so they live in the same Redis Cluster slot.
-- * Every fixed key a function touches is declared in KEYS and checked by name (bind_keys,
--   want_key), so a wrapper that passes keys in the wrong order fails loudly instead of writing
--   to the wrong key.
-- * Times come from TIME, read once per call (now_ms), never from the caller (an agent's clock
--   is not to be trusted).
-- * Numbers go to redis.call as text, each formatted once (int()): a Lua number passed to
--   redis.call is formatted by Redis with printf, about 1 µs each on a slow box. Integer
--   arguments arrive as canonical digits (int_arg) and are passed on as they came.
-- * Argument errors are raised as `EMPARG <field>: <reason>`, which the Rust side maps to a typed
--   error. Nothing has been written when they are raised (all checks come first).
-- * State of one call (KEYS, ARGV, the prefix, the keys bound, the time, the settings read, an
--   event held back) lives in the upvalues below and is reset by begin(), which every function
--   runs first.
--
-- Cost. Most of a call's Redis CPU is Lua and the glue around each redis.call (0.5-3 µs each),
-- not the commands' own work: functions read each hash once with one HMGET, keep what they
-- read, and write each hash once where they can. Hot events build their JSON by concatenation
-- (json_obj's generic loop costs ~4 µs an event).

local KEYS, ARGV, P
local K -- set by each function with bind_keys: K.leases, K.events...
local NOW, NOW_TEXT
local EPOCH, CFG
local HELD_EVENT

local function argerr(field, reason)
  error({ err = 'EMPARG ' .. field .. ': ' .. reason })
end

-- The start of every call: its keys and arguments, the prefix checked, the state of the
-- previous call gone.
local function begin(keys, args)
  KEYS, ARGV = keys, args
  P = args[1]
  K, NOW, NOW_TEXT, EPOCH, CFG, HELD_EVENT = nil, nil, nil, nil, nil, nil
  if type(P) ~= 'string' or not string.match(P, '^{[%w_%.%-]+}:$') then
    argerr('prefix', 'must look like {name}:')
  end
end

-- Declared keys, by name. `names` lists the fixed keys in KEYS order.
local function bind_keys(names)
  local k = {}
  for i = 1, #names do
    local name = names[i]
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

-- Integer to decimal text (Lua's own conversion switches to an exponent at 1e14).
local function int(n)
  if n < 1e14 and n > -1e14 then
    return n .. ''
  end
  return string.format('%.0f', n)
end

-- Redis time in ms, as a number (now_ms) and as text (now_text), from one TIME per script. The
-- text is cut from TIME's own digits (seconds, then the first 3 of 6 microsecond digits), so
-- neither needs printf. A function may set NOW (tests' clock) before the first call.
local function now_text()
  if not NOW_TEXT then
    if NOW then
      NOW_TEXT = int(NOW)
    else
      local t = redis.call('TIME')
      local us = t[2]
      local ms = #us > 3 and string.sub(us, 1, #us - 3) or ''
      NOW_TEXT = t[1] .. string.sub('000', 1, 3 - #ms) .. ms
      NOW = tonumber(NOW_TEXT)
    end
  end
  return NOW_TEXT
end
local function now_ms()
  if not NOW then now_text() end
  return NOW
end

-- Literals (however long), not concatenations: Lua 5.1 would build and hash them again on every
-- call.
local UUID_PATTERN =
  '^[0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f]%-[0-9a-f][0-9a-f][0-9a-f][0-9a-f]%-[0-9a-f][0-9a-f][0-9a-f][0-9a-f]%-[0-9a-f][0-9a-f][0-9a-f][0-9a-f]%-[0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f]$'
local CLASS_PATTERN =
  '^[0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f]$'

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

-- A non-negative integer argument in canonical digits, so it can be stored and passed on as
-- the text it came as. Returns the number.
local function int_arg(s, lo, hi, field)
  local n = type(s) == 'string' and string.find(s, '^%d+$') and tonumber(s)
  if not n or n < lo or n > hi then
    argerr(field, 'must be an integer from ' .. int(lo) .. ' to ' .. int(hi))
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

-- Builds a JSON object from {key, value, kind} triples without decoding anything. Keys are our
-- own identifiers and need no escaping. Kinds: 'w' a word we wrote or checked (UUIDs, class ids,
-- status words, our reasons), quoted as it is; 's' any text, escaped by cjson; 'n' an integer;
-- 'b' a boolean; 'raw' JSON text already validated. A nil value (or false, which is how Redis
-- hands back a missing field) drops the field, so optional fields are simply absent; kind 'b'
-- always writes true or false.
local function json_obj(fields)
  local parts = {}
  for i = 1, #fields do
    local f = fields[i]
    local key, value, kind = f[1], f[2], f[3]
    if kind == 'b' then
      parts[#parts + 1] = '"' .. key .. '":'
        .. ((value == true or value == 1 or value == '1') and 'true' or 'false')
    elseif value ~= nil and value ~= false then
      local text
      if kind == 'w' then
        text = '"' .. value .. '"'
      elseif kind == 's' then
        text = cjson.encode(value)
      elseif kind == 'n' then
        text = int(value)
      else
        text = value
      end
      parts[#parts + 1] = '"' .. key .. '":' .. text
    end
  end
  return '{' .. table.concat(parts, ',') .. '}'
end

-- Per-id keys (see the header): key('job:', id), key('user:', uid, ':running')... One helper
-- rather than one per kind of key: each local function is built again on every call.
local function key(kind, id, suffix)
  if suffix then return P .. kind .. id .. suffix end
  return P .. kind .. id
end

-- A wake list only has to hold enough tokens to wake the claimers that are blocked right now
-- (each script pushes one token, and Redis hands it to a blocked BLPOP as soon as the script
-- ends); the cap bounds the spurious wake-ups left behind when nobody was waiting. A list that
-- nobody drains (every claimer busy) is cut back to WAKE_CAP once it reaches twice that, so the
-- trim costs one command per WAKE_CAP pushes instead of one per push.
local WAKE_CAP = 32

-- Offline machines keep their hash this long (admin pages, a box that comes back), then go.
local OFFLINE_MACHINE_TTL_MS = 7 * 24 * 3600 * 1000

-- The epoch and the settings live in one hash (`config`), read with one HMGET per script. The
-- epoch field is present once state is complete (restored after a Redis loss); agents' scripts
-- answer `restoring` while it is missing. finished_ttl is kept as text (it is only ever passed on
-- to PX/PEXPIRE). A user's running count shares its counter with their held jobs (see
-- HELD_UNIT), so per_user is capped well below it.
local function load_epoch()
  local c = redis.call('HMGET', K.config, 'epoch', 'max_concurrent_jobs_per_user',
    'max_queue_size', 'lease_ms', 'finished_ttl_ms')
  EPOCH = c[1]
  local per_user = tonumber(c[2]) or 10
  if per_user > 100000 then per_user = 100000 end
  CFG = {
    per_user = per_user,
    max_queue = tonumber(c[3]) or 1000,
    lease_ms = tonumber(c[4]) or 60000,
    finished_ttl = c[5] or '3600000',
  }
  return EPOCH
end
local function config()
  if not CFG then load_epoch() end
  return CFG
end

-- A user's counter `user:<uid>:running` holds running + HELD_UNIT * held: how many of their jobs
-- run and how many wait in their held set, in one number, so ending a job learns with the same
-- DECR whether anything of theirs waits to be unparked.
local HELD_UNIT = 1048576

-- Every state change writes its event in the same script, so Redis and the stream never
-- disagree. `data` is JSON text (see json_obj) or nil.
--
-- One stream entry may carry two events: the first under the usual field names, the second
-- under `type2`, `job2`, `exec2`, `machine2`, `data2`, sharing `ts` and `ep` (the persister
-- applies them in that order). hold_event keeps an event back so the next emit writes both in
-- one XADD; flush_event writes a held event alone. complete_claim uses it for the completion
-- and the claim that follows.
-- `timed`: the entry carries `ts` (the call's time); without it, the time is the entry id's
-- (the same Redis clock, read by XADD itself), which spares a function that needs the time for
-- nothing else its TIME call (enqueue).
local FIRST_EVENT = { 'type', 'job', 'exec', 'machine', 'data' }
local SECOND_EVENT = { 'type2', 'job2', 'exec2', 'machine2', 'data2' }
-- Appends one event's fields to `f` under `names` (FIRST_EVENT or SECOND_EVENT).
local function add_event(f, names, kind, job, exec, machine, data)
  f[#f + 1] = names[1]; f[#f + 1] = kind
  if job then f[#f + 1] = names[2]; f[#f + 1] = job end
  if exec then f[#f + 1] = names[3]; f[#f + 1] = exec end
  if machine then f[#f + 1] = names[4]; f[#f + 1] = machine end
  if data and data ~= '{}' then f[#f + 1] = names[5]; f[#f + 1] = data end
end
local function xadd(timed, kind, job, exec, machine, data)
  local f = {}
  if timed then f[1] = 'ts'; f[2] = now_text() end
  if EPOCH then f[#f + 1] = 'ep'; f[#f + 1] = EPOCH end
  local first = HELD_EVENT
  if first then
    HELD_EVENT = nil
    add_event(f, FIRST_EVENT, first[1], first[2], first[3], first[4], first[5])
    add_event(f, SECOND_EVENT, kind, job, exec, machine, data)
  else
    add_event(f, FIRST_EVENT, kind, job, exec, machine, data)
  end
  redis.call('XADD', K.events, '*', unpack(f))
end
local function emit(kind, job, exec, machine, data)
  xadd(true, kind, job, exec, machine, data)
end
local function emit_untimed(kind, job, exec, machine, data)
  xadd(false, kind, job, exec, machine, data)
end
local function hold_event(kind, job, exec, machine, data)
  HELD_EVENT = { kind, job, exec, machine, data }
end
local function flush_event()
  local e = HELD_EVENT
  if e then
    HELD_EVENT = nil
    emit(e[1], e[2], e[3], e[4], e[5])
  end
end

local function wake(class)
  local wk = key('wake:', class)
  if redis.call('LPUSH', wk, '1') > 2 * WAKE_CAP then
    redis.call('LTRIM', wk, 0, WAKE_CAP - 1)
  end
end

-- A QUEUED job into its class queue at `score`, with its wake token. The heads index keeps a
-- lower bound of every non-empty queue's head (ZADD LT only ever lowers it, and adds the class
-- when it is missing); removals never touch it, claims that walk the index tighten it.
local function place(class, id, score)
  redis.call('ZADD', key('q:', class), score, id)
  redis.call('ZADD', K.heads, 'LT', score, class)
  wake(class)
end

-- Machine status follows from facts: the operator's drain flag, whether the agent said it is
-- ready (a machine that runs something is), and how many of its slots are taken.
local function machine_status_for(drain, ready, running, max_slots)
  if drain == '1' then return 'DRAINING' end
  if not ready and running == 0 then return 'STARTING' end
  if running >= max_slots then return 'BUSY' end
  return 'AVAILABLE'
end

-- machine.status data. Statuses and reasons are our own words: no escaping.
local function status_json(new, old, reason)
  local s = '{"status":"' .. new .. '"'
  if old then s = s .. ',"previous":"' .. old .. '"' end
  if reason then s = s .. ',"reason":"' .. reason .. '"' end
  return s .. '}'
end

-- A machine's running executions are the field `execs` of its hash: their ids, separated by
-- single spaces ('' or missing when idle). Read with the status in one HMGET, written with it in
-- one HSET. Every id is a checked 36-character UUID, so the count follows from the length.
local MACHINE_FIELDS = { 'status', 'max_slots', 'drain', 'execs' }
local function execs_count(execs)
  if not execs or execs == '' then return 0 end
  return (#execs + 1) / 37
end
local function execs_has(execs, eid)
  return execs and execs ~= '' and string.find(execs, eid, 1, true) ~= nil
end
local function execs_add(execs, eid)
  if not execs or execs == '' then return eid end
  return execs .. ' ' .. eid
end
-- Returns the list without `eid` (unchanged when it is not there).
local function execs_remove(execs, eid)
  if not execs or execs == '' then return '' end
  if execs == eid then return '' end
  local at = string.find(execs, eid, 1, true)
  if not at then return execs end
  if at == 1 then return string.sub(execs, 38) end
  return string.sub(execs, 1, at - 2) .. string.sub(execs, at + 36)
end

-- Writes a machine's execution list and, when it changed, its status with its machine.status
-- event, in one HSET. `m` is the machine's HMGET of MACHINE_FIELDS.
local function write_machine(mid, m, execs, new, reason)
  local mk = key('machine:', mid)
  if new ~= m[1] then
    redis.call('HSET', mk, 'execs', execs, 'status', new)
    emit('machine.status', nil, nil, mid, status_json(new, m[1], reason))
  else
    redis.call('HSET', mk, 'execs', execs)
  end
  return new
end

-- Writes a machine's execution list with the status that follows from it (drain flag, readiness
-- and slots as `m` holds them).
local function refresh_machine(mid, m, execs)
  return write_machine(mid, m, execs, machine_status_for(m[3], m[1] ~= 'STARTING',
    execs_count(execs), tonumber(m[2]) or 1), nil)
end

-- Writes a machine's new status, with its machine.status event, when it changed.
local function set_machine_status(mid, old, new, reason)
  if new ~= old then
    redis.call('HSET', key('machine:', mid), 'status', new)
    emit('machine.status', nil, nil, mid, status_json(new, old, reason))
  end
  return new
end

-- An execution is one string key, `exec:<eid>`, written whole: "<job> <machine> <status> <user>
-- <deadline_ms> <attempts> <started_ms>" (every part a UUID, a status word or digits). Created
-- with SET NX by the claim (which also proves the id unused), rewritten with its end status and
-- an expiry (a tombstone for finished_ttl, so a late report can be told apart) when it ends.
local function exec_read(eid)
  local v = redis.call('GET', key('exec:', eid))
  if not v then return {} end
  local job, mid, status, user, deadline, attempts, started =
    string.match(v, '^(%S+) (%S+) (%S+) (%S+) (%S+) (%S+) (%S+)$')
  return { job, mid, status, user, deadline, attempts, started }
end
local function exec_text(ex, status)
  return ex[1] .. ' ' .. ex[2] .. ' ' .. status .. ' ' .. ex[4] .. ' ' .. ex[5] .. ' ' .. ex[6]
    .. ' ' .. ex[7]
end
