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
-- * Times come from Redis's clock, never from the caller (an agent's clock is not to be
--   trusted): from TIME, read once per call (now_ms), or, in a call that writes an event before
--   it needs the time, from that event's stream entry id (see xadd), which spares the TIME.
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
-- (json_obj's generic loop costs ~4 µs an event). Redis's Lua hashes every string it creates in
-- full (each argument, each reply value, each concatenation), and every string and table is
-- garbage to collect, so the hot paths build as few as they can: names built once and kept
-- (bind_keys, machine_key), arguments found well formed before remembered (checked_set), scratch
-- tables reused (xadd_fields, machine_write), no closures per call.

local KEYS, ARGV, P
local K -- set by each function with bind_keys: K.leases, K.events...
local NOW, NOW_TEXT
local EPOCH, CFG
local HELD_HEADER, HELD_DATA -- an event held back (hold_event)
local ON_EMITTED, ON_EMITTED_ARG
local MACHINE_ID, MACHINE_KEY -- the caller's machine and its key, once want_key checked it

-- Standard functions as locals. Redis's Lua reaches every global through the __index of a
-- protected table (several lookups per use); a local is one upvalue read. The library's load runs
-- without them (only redis.register_function exists then), so the first call binds them.
local call, find, match, sub, byte, gmatch, format, upper
local concat, tinsert, tremove, json_decode, json_encode
local tonumber, unpack, pcall, ipairs
local function bind_standard_functions()
  call = redis.call
  find, match, sub, byte = string.find, string.match, string.sub, string.byte
  gmatch, format, upper = string.gmatch, string.format, string.upper
  concat, tinsert, tremove = table.concat, table.insert, table.remove
  json_decode, json_encode = cjson.decode, cjson.encode
  tonumber, unpack, pcall, ipairs = _G.tonumber, _G.unpack, _G.pcall, _G.ipairs
end

local function argerr(field, reason)
  error({ err = 'EMPARG ' .. field .. ': ' .. reason })
end

-- The last prefix found well formed: the same prefix again is not matched again.
local CHECKED_PREFIX

-- The start of every call: its keys and arguments, the prefix checked, the state of the
-- previous call gone.
local function begin(keys, args)
  if not call then bind_standard_functions() end
  KEYS, ARGV = keys, args
  P = args[1]
  K, NOW, NOW_TEXT, EPOCH, CFG, HELD_HEADER, ON_EMITTED = nil, nil, nil, nil, nil, nil, nil
  MACHINE_ID, MACHINE_KEY = nil, nil
  if P ~= CHECKED_PREFIX then
    if not P or not find(P, '^{[%w_%.%-]+}:$') then
      argerr('prefix', 'must look like {name}:')
    end
    CHECKED_PREFIX = P
  end
end

-- Declared keys, by name. `names` is one of the constant lists below; its key names are built
-- once per prefix and kept (bound[names]), so a call only compares its KEYS with them (Lua
-- interns strings: equal strings are one object) instead of building every name again.
local bound = {}
local function bind_keys(names)
  local b = bound[names]
  if not b or b.prefix ~= P then
    b = { prefix = P, want = {}, k = {} }
    for i = 1, #names do
      b.want[i] = P .. names[i]
      b.k[names[i]] = b.want[i]
    end
    bound[names] = b
  end
  local want = b.want
  for i = 1, #want do
    if KEYS[i] ~= want[i] then
      argerr('keys', 'KEYS[' .. i .. '] must be ' .. want[i])
    end
  end
  return b.k
end
-- The fixed keys of each function, in KEYS order.
local KEYS_AGENT = { 'config', 'leases', 'queued', 'events', 'heads' }
local KEYS_CANCEL = { 'config', 'queued', 'events', 'heads' }
local KEYS_DEREGISTER = { 'config', 'leases', 'queued', 'events', 'heads', 'machines' }
local KEYS_ENQUEUE = { 'config', 'seq', 'queued', 'classes', 'classes:ver', 'events', 'heads',
  'machines' }
local KEYS_HEARTBEAT = { 'config', 'leases', 'machines', 'events', 'classes:ver' }
local KEYS_CONFIG = { 'config' }
local KEYS_MACHINES = { 'config', 'machines', 'events' }
local KEYS_REGISTER = { 'config', 'machines', 'machine-ids', 'events', 'classes:ver' }

-- A per-id key declared at KEYS[i], named by `kind` and `id` (want_key(6, 'machine:', mid)). The
-- caller's machine key is kept for machine_key.
local function want_key(i, kind, id)
  local want = P .. kind .. id
  if KEYS[i] ~= want then
    argerr('keys', 'KEYS[' .. i .. '] must be ' .. want)
  end
  if kind == 'machine:' then MACHINE_ID, MACHINE_KEY = id, want end
  return want
end

-- Integer to decimal text. %d formats it without the floating-point printf path of Lua's own
-- conversion (%.14g, which also switches to an exponent at 1e14).
local function int(n)
  if n < 9007199254740992 and n > -9007199254740992 then
    return format('%d', n)
  end
  return format('%.0f', n)
end

-- Redis time in ms, as a number (now_ms) and as text (now_text), from one TIME per script. The
-- text is cut from TIME's own digits (seconds, then the first 3 of 6 microsecond digits), so
-- neither needs printf. A function may set NOW (tests' clock) before the first call.
local function now_text()
  if not NOW_TEXT then
    if NOW then
      NOW_TEXT = int(NOW)
    else
      local t = call('TIME')
      local us = t[2]
      local ms = #us > 3 and sub(us, 1, #us - 3) or ''
      NOW_TEXT = t[1] .. sub('000', 1, 3 - #ms) .. ms
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

-- Arguments arrive as strings (missing ones as nil): `not s` is the check for a string, and
-- cheaper than type(s), which interns its answer.
local function uuid_arg(s, field)
  if not s or not find(s, UUID_PATTERN) then
    argerr(field, 'must be a lowercase hyphenated UUID')
  end
  return s
end

-- The caller's machine and execution ids on the agent's hot paths (complete, complete_claim),
-- checked by what they name rather than matched against UUID_PATTERN up front:
-- * a machine id whose hash exists is one its registration checked (only register creates
--   machine hashes), so known_machine_arg matches it only when its hash is missing;
-- * an execution id found on the machine's list is one its claim checked (record_at matches a
--   whole 36-character record id), so fence matches it only when it is not there.
-- Either check still comes before the id is used for anything else or anything is written.
local function id_arg(s, field)
  if not s or #s ~= 36 then
    argerr(field, 'must be a lowercase hyphenated UUID')
  end
  return s
end
local function known_machine_arg(mid, m)
  if not m[1] then uuid_arg(mid, 'machine_id') end
end

-- Arguments found well formed before, so their like costs one table lookup (user and class ids,
-- priorities, limits and requirements repeat from call to call). Each set holds at most
-- CHECKED_MAX texts and is emptied when full, so what is common now stays; JSON is remembered only
-- up to CHECKED_JSON_MAX bytes.
local CHECKED_MAX, CHECKED_JSON_MAX = 256, 1024
local function checked_set()
  return { n = 0, seen = {} }
end
local function remember(set, s, value)
  if set.n >= CHECKED_MAX then set.seen, set.n = {}, 0 end
  set.seen[s] = value
  set.n = set.n + 1
end
local checked_ints, checked_json = checked_set(), checked_set()
local checked_users, checked_classes = checked_set(), checked_set()

-- `s` checked by `check` (which raises on a bad one) unless `set` remembers it well formed.
local function remembered_arg(set, s, field, check)
  if s and set.seen[s] then return s end
  check(s, field)
  remember(set, s, true)
  return s
end

-- A user id (enqueue): one user submits many jobs.
local function user_arg(s, field)
  return remembered_arg(checked_users, s, field, uuid_arg)
end

local function class_text_arg(s, field)
  if not s or not find(s, CLASS_PATTERN) then
    argerr(field, 'must be 32 lowercase hex characters')
  end
end
-- A class id: every job of a kind, and every claim of the machines that run it, names it.
local function class_arg(s, field)
  return remembered_arg(checked_classes, s, field, class_text_arg)
end

-- A non-negative integer argument in canonical digits, so it can be stored and passed on as
-- the text it came as. Returns the number. `repeats`: as json_arg's (a priority, a limit; not a
-- progress value).
local function int_arg(s, lo, hi, field, repeats)
  local n = repeats and s and checked_ints.seen[s]
  if not n then
    n = s and find(s, '^%d+$') and tonumber(s)
    if n and repeats then remember(checked_ints, s, n) end
  end
  if not n or n < lo or n > hi then
    argerr(field, 'must be an integer from ' .. int(lo) .. ' to ' .. int(hi))
  end
  return n
end

local function str_arg(s, min_len, max_len, field)
  if not s or #s < min_len or #s > max_len then
    argerr(field, 'must be ' .. min_len .. ' to ' .. max_len .. ' bytes')
  end
  return s
end

-- JSON arguments are stored and forwarded as given (so numbers keep their exact text); decoding
-- here only proves they are JSON.
-- `repeats`: texts of this field repeat from call to call (a class's requirements), so one
-- found well formed is remembered; others (outputs, errors, GPU stats) are each their own and
-- would only push the ones that repeat out.
local function json_arg(s, max_len, field, repeats)
  str_arg(s, 1, max_len, field)
  if repeats and checked_json.seen[s] then return s end
  if not pcall(json_decode, s) then
    argerr(field, 'must be JSON')
  end
  if repeats and #s <= CHECKED_JSON_MAX then remember(checked_json, s, true) end
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
        text = json_encode(value)
      elseif kind == 'n' then
        text = int(value)
      else
        text = value
      end
      parts[#parts + 1] = '"' .. key .. '":' .. text
    end
  end
  return '{' .. concat(parts, ',') .. '}'
end

-- Per-id keys (see the header): key('job:', id), key('user:', uid, ':running')... One helper
-- rather than one per kind of key: each local function is built again on every call.
local function key(kind, id, suffix)
  if suffix then return P .. kind .. id .. suffix end
  return P .. kind .. id
end

-- A machine's key: the caller's own, which want_key checked, is not built again.
local function machine_key(mid)
  if mid == MACHINE_ID then return MACHINE_KEY end
  return key('machine:', mid)
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
-- answer `restoring` while it is missing. finished_ttl is how long an execution's key outlives its
-- deadline (see exec_owner). A user's running count shares its counter with their held jobs (see
-- HELD_UNIT), so per_user is capped well below it.
-- The settings as last parsed, with the text they were parsed from: settings change rarely, so a
-- call whose HMGET brings the same text (the same interned strings) takes them as they are.
local cfg_parsed, cfg_text = nil, {}
local function load_epoch()
  local c = call('HMGET', K.config, 'epoch', 'max_concurrent_jobs_per_user',
    'max_queue_size', 'lease_ms', 'finished_ttl_ms')
  EPOCH = c[1]
  local t = cfg_text
  if not (cfg_parsed and c[2] == t[2] and c[3] == t[3] and c[4] == t[4] and c[5] == t[5]) then
    local per_user = tonumber(c[2]) or 10
    if per_user > 100000 then per_user = 100000 end
    cfg_parsed = {
      per_user = per_user,
      max_queue = tonumber(c[3]) or 1000,
      lease_ms = tonumber(c[4]) or 60000,
      finished_ttl = tonumber(c[5]) or 3600000,
    }
    cfg_text = c
  end
  CFG = cfg_parsed
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
-- An event is two fields: `e`, its type and ids in one text (`<type> <job> <exec> <machine>`,
-- `-` for an id it has not), and `data`, when it has any. Ids are UUIDs and types are words, so
-- neither holds a space. One field for the type and the ids instead of four: each field is two
-- more arguments to convert and two more stream entries to write, which costs more than the
-- concatenation.
-- One stream entry may carry two events: the second under `e2` and `data2`, sharing `ts` and `ep`
-- (the persister applies them in that order). hold_event keeps an event back so the next emit
-- writes both in one XADD; flush_event writes a held event alone. complete_claim uses it for the
-- completion and the claim that follows.
-- `ts`: an entry carries the call's time when the call knows it already (read with TIME, or a
-- test's clock). Otherwise the entry id's time is the event's, and becomes the call's: now_ms
-- and now_text answer it from then on, so a function that writes its event before it needs the
-- time (the claim, enqueue) reads no TIME. ON_EMITTED, when set, runs once the call's first
-- entry is written, with ON_EMITTED_ARG (a function and its argument rather than a closure, which
-- would be built on every call): complete_claim writes the job's end there, with that time.
-- `timed` false: never `ts` (enqueue, whose event time is always its entry's).
local FIRST_EVENT = { 'e', 'data' }
local SECOND_EVENT = { 'e2', 'data2' }
-- XADD's fields, built in this one table (reused, never emptied: each XADD passes its first n).
local xadd_fields = {}
-- An event's `e` field.
local function event_header(kind, job, exec, machine)
  return kind .. ' ' .. (job or '-') .. ' ' .. (exec or '-') .. ' ' .. (machine or '-')
end
-- Puts one event's fields in xadd_fields from n + 1 on, under `names` (FIRST_EVENT or
-- SECOND_EVENT). Returns the new n.
local function add_event(n, names, header, data)
  local f = xadd_fields
  f[n + 1] = names[1]
  f[n + 2] = header
  n = n + 2
  if data and data ~= '{}' then f[n + 1] = names[2]; f[n + 2] = data; n = n + 2 end
  return n
end
local function xadd(timed, header, data)
  local f, n = xadd_fields, 0
  if timed and NOW then f[1] = 'ts'; f[2] = now_text(); n = 2 end
  if EPOCH then f[n + 1] = 'ep'; f[n + 2] = EPOCH; n = n + 2 end
  local held = HELD_HEADER
  if held then
    HELD_HEADER = nil
    n = add_event(n, FIRST_EVENT, held, HELD_DATA)
    n = add_event(n, SECOND_EVENT, header, data)
  else
    n = add_event(n, FIRST_EVENT, header, data)
  end
  local id = call('XADD', K.events, '*', unpack(f, 1, n))
  if not NOW then
    NOW_TEXT = match(id, '^%d+')
    NOW = tonumber(NOW_TEXT)
  end
  local after = ON_EMITTED
  if after then
    ON_EMITTED = nil
    after(ON_EMITTED_ARG)
  end
end
local function emit(kind, job, exec, machine, data)
  xadd(true, event_header(kind, job, exec, machine), data)
end
local function emit_untimed(kind, job, exec, machine, data)
  xadd(false, event_header(kind, job, exec, machine), data)
end
local function hold_event(kind, job, exec, machine, data)
  HELD_HEADER, HELD_DATA = event_header(kind, job, exec, machine), data
end
local function flush_event()
  local held = HELD_HEADER
  if held then
    HELD_HEADER = nil
    xadd(true, held, HELD_DATA)
  end
end

local function wake(class, wk)
  wk = wk or key('wake:', class)
  if call('LPUSH', wk, '1') > 2 * WAKE_CAP then
    call('LTRIM', wk, 0, WAKE_CAP - 1)
  end
end

-- A QUEUED job into its class queue at `score`, with its wake token. The heads index keeps a
-- lower bound of every non-empty queue's head (ZADD LT only ever lowers it, and adds the class
-- when it is missing); removals never touch it, claims that walk the index tighten it. Returns
-- whether the class was missing from the index (every class in it is a known one). `qk`, `wk`:
-- the class's queue and wake keys when the caller has them already.
local function place(class, id, score, qk, wk)
  call('ZADD', qk or key('q:', class), score, id)
  local added = call('ZADD', K.heads, 'LT', score, class)
  wake(class, wk)
  return added == 1
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

-- A machine's running executions live in its hash, field `execs`: one record each, separated by
-- single spaces ('' or missing when idle), read with the status in one HMGET and written with it
-- in one HSET:
--   <eid>,<job>,<user>,<attempts>,<started_ms>,<deadline_ms>,<until_ms>
-- `deadline_ms` is the hard one (the job's timeout); `until_ms` is when the execution is due:
-- its lease's end, or its deadline when that comes first. Every part is a UUID or digits, so a
-- record holds no space or comma of its own. An execution runs exactly while its record is
-- there: nothing else says so.
-- `ended`: the machine's last ENDED_KEEP executions that ended, `<eid's last 12 hex>:<STATUS>`
-- separated by spaces, newest first, so a report repeated after a lost reply is told apart from a
-- late one (see ended_add).
-- `lease`: the score of the machine's entry in `leases`, missing or '' when it has none (see
-- lease_lower).
local MACHINE_FIELDS = { 'status', 'max_slots', 'drain', 'execs', 'ended', 'lease' }
local ENDED_KEEP = 4
local RECORD_PATTERN = '^([^,]+),([^,]+),([^,]+),([^,]+),([^,]+),([^,]+),([^ ]+)'
-- A record's job, user and attempts (its parts 2-4).
local RECORD_HEAD_PATTERN = '^[^,]+,([^,]+),([^,]+),([^,]+)'

local function execs_count(execs)
  if not execs or execs == '' then return 0 end
  local n, at = 1, find(execs, ' ', 1, true)
  while at do
    n = n + 1
    at = find(execs, ' ', at + 1, true)
  end
  return n
end

-- Where `eid`'s record starts in `execs`, or nil.
local function record_at(execs, eid)
  if not execs or execs == '' then return nil end
  local from = 1
  while true do
    local at = find(execs, eid, from, true)
    if not at then return nil end
    if (at == 1 or byte(execs, at - 1) == 32) and byte(execs, at + 36) == 44 then
      return at
    end
    from = at + 36
  end
end

-- A record as a table: { eid, job, user, attempts, started_ms, deadline_ms, until_ms } (text).
local function record_parse(execs, at)
  return { match(execs, RECORD_PATTERN, at) }
end

-- `eid`'s record on this list, or nil.
local function record_find(execs, eid)
  local at = record_at(execs, eid)
  if not at then return nil end
  return record_parse(execs, at)
end

local function record_text(r)
  return r[1] .. ',' .. r[2] .. ',' .. r[3] .. ',' .. r[4] .. ',' .. r[5] .. ',' .. r[6] .. ','
    .. r[7]
end

-- Every record of the list, parsed.
local function records(execs)
  local out = {}
  for r in gmatch(execs or '', '[^ ]+') do
    out[#out + 1] = record_parse(r, 1)
  end
  return out
end

local function records_text(recs)
  local parts = {}
  for i = 1, #recs do parts[i] = record_text(recs[i]) end
  return concat(parts, ' ')
end

local function execs_add(execs, record)
  if not execs or execs == '' then return record end
  return execs .. ' ' .. record
end

-- Returns the list without `eid`'s record (unchanged when it is not there).
local function execs_remove(execs, eid)
  local at = record_at(execs, eid)
  if not at then return execs or '' end
  local stop = find(execs, ' ', at, true)
  if not stop then
    if at == 1 then return '' end
    return sub(execs, 1, at - 2)
  end
  if at == 1 then return sub(execs, stop + 1) end
  return sub(execs, 1, at - 1) .. sub(execs, stop + 1)
end

-- `ended` with `eid` (ended with `status`) in front, cut to ENDED_KEEP entries. An execution is
-- named there by its id's last 12 hex digits (48 bits, most of them random in a UUIDv7): a third
-- of the bytes every call reads, copies and writes. Two of one machine's last ends sharing them is
-- practically impossible, and would only answer a repeated report of one as the other's (ok or
-- stale: nothing is written either way).
local function ended_add(ended, eid, status)
  local e = sub(eid, 25) .. ':' .. status
  if not ended or ended == '' then return e end
  local s = e .. ' ' .. ended
  local at = 0
  for _ = 1, ENDED_KEEP do
    at = find(s, ' ', at + 1, true)
    if not at then return s end
  end
  return sub(s, 1, at - 1)
end

-- How `eid` ended on this machine, if it is one of its last ENDED_KEEP.
local function ended_status(ended, eid)
  if not ended or ended == '' then return nil end
  local at = find(ended, sub(eid, 25) .. ':', 1, true)
  if not at then return nil end
  return match(ended, '^[^:]+:(%u+)', at)
end

-- The machine's entry in `leases` (member: its id) is a lower bound of its records' until_ms; the
-- reaper looks at a machine when that bound has passed. A new record due sooner lowers it (one
-- ZADD); one due later needs nothing, so a machine running one job after another writes it once
-- per heartbeat, not twice per job. Ends leave it as it is: the reaper, finding nothing due,
-- moves it to the true minimum (or removes it), as every heartbeat does. Returns the new score
-- as text for the machine's `lease` field, or nil when it did not change.
local function lease_lower(mid, lease, until_ms, until_text)
  local current = tonumber(lease)
  if current and current <= until_ms then return nil end
  call('ZADD', K.leases, until_text, mid)
  return until_text
end

-- Sets the machine's entry to the soonest until_ms of `recs` (removed when there is none).
-- Returns the `lease` field's new value, or nil when it did not change.
local function lease_exact(mid, lease, recs)
  local soonest
  for i = 1, #recs do
    local u = tonumber(recs[i][7])
    if not soonest or u < soonest then soonest = u end
  end
  if not soonest then
    if not lease or lease == '' then return nil end
    call('ZREM', K.leases, mid)
    return ''
  end
  local text = int(soonest)
  if text == lease then return nil end
  call('ZADD', K.leases, text, mid)
  return text
end

-- Writes a machine's execution list, and whatever else changed, in one HSET: its status (with
-- its machine.status event) when `new` differs, `ended` and `lease` when given. `m` is the
-- machine's HMGET of MACHINE_FIELDS; it is brought up to date.
local machine_write = {} -- write_machine's HSET arguments (reused: each passes its first n)
local function write_machine(mid, m, execs, new, reason, ended, lease)
  local f, n = machine_write, 2
  f[1], f[2] = 'execs', execs
  if new ~= m[1] then f[3], f[4] = 'status', new; n = 4 end
  if ended then f[n + 1], f[n + 2] = 'ended', ended; n = n + 2; m[5] = ended end
  if lease then f[n + 1], f[n + 2] = 'lease', lease; n = n + 2; m[6] = lease end
  call('HSET', machine_key(mid), unpack(f, 1, n))
  local old = m[1]
  m[1], m[4] = new, execs
  if new ~= old then
    emit('machine.status', nil, nil, mid, status_json(new, old, reason))
  end
  return new
end

-- A machine the operator or the sweeper took out keeps that status whatever it runs.
local function machine_gone(status)
  return status == 'OFFLINE' or status == 'TERMINATED'
end

-- The status that follows from the list `execs` (drain flag, readiness and slots as `m` holds
-- them; a gone machine stays as it is).
local function status_after(m, execs)
  if machine_gone(m[1]) then return m[1] end
  return machine_status_for(m[3], m[1] ~= 'STARTING', execs_count(execs), tonumber(m[2]) or 1)
end

-- Writes a machine's execution list with the status that follows from it.
local function refresh_machine(mid, m, execs, ended, lease)
  return write_machine(mid, m, execs, status_after(m, execs), nil, ended, lease)
end

-- Writes a machine's new status, with its machine.status event, when it changed.
local function set_machine_status(mid, old, new, reason)
  if new ~= old then
    call('HSET', machine_key(mid), 'status', new)
    emit('machine.status', nil, nil, mid, status_json(new, old, reason))
  end
  return new
end

-- An execution also has a string key, `exec:<eid>` = "<job> <machine>", created by the
-- claim with SET NX (which proves the id unused anywhere) and never written again; it expires
-- finished_ttl after the execution's deadline. It tells a report about another machine's
-- execution (refused) from a late one about the caller's own (stale), and names the job of an
-- execution for the API.
local function exec_owner(eid)
  local v = call('GET', key('exec:', eid))
  if not v then return nil, nil end
  return sub(v, 1, 36), sub(v, 38, 73)
end
