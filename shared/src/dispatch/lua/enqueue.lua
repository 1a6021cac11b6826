-- enqueue: a new job into its class queue (control plane; also the reconciler's restore path).
-- Idempotent on the job id: a job that exists in any state is left as it is.
-- KEYS: config, seq, queued, classes, classes:ver, events, heads, machines, job:<id>,
--       q:<class>, wake:<class>
-- ARGV: prefix, job_id, user_id, class, requirements_json, priority (0-100), max_attempts,
--       timeout_ms, payload, check_queue_size (0|1)
-- Reply: {'queued', seq, parked (0|1)} | {'exists', status} | {'queue_full', queued}
K = bind_keys(KEYS_ENQUEUE)
local id = uuid_arg(ARGV[2], 'job_id')
local uid = user_arg(ARGV[3], 'user_id')
local class = class_arg(ARGV[4], 'class')
local requirements = json_arg(ARGV[5], 65536, 'requirements', true)
local priority = int_arg(ARGV[6], 0, 100, 'priority', true)
int_arg(ARGV[7], 1, 100, 'max_attempts', true)
int_arg(ARGV[8], 1, 30 * 86400 * 1000, 'timeout_ms', true)
local payload = ARGV[9]
if not payload then argerr('payload', 'missing') end
local check = int_arg(ARGV[10], 0, 1, 'check_queue_size', true) == 1
local jk = want_key(9, 'job:', id)
local qk = want_key(10, 'q:', class)
local wk = want_key(11, 'wake:', class)

load_epoch()
local existing = call('HGET', jk, 'status')
if existing then return { 'exists', existing } end
local cfg = config()
-- Counted first, so the limit costs no extra read; a refusal takes it back (nothing else has
-- been written yet).
local queued = call('INCR', K.queued)
if check and queued > cfg.max_queue then
  call('DECR', K.queued)
  return { 'queue_full', queued - 1 }
end

local seq = call('INCR', K.seq)
-- (100 - priority) * 2^40 + seq: ZRANGE 0 0 is the highest priority, then the oldest.
-- Below 2^53, so exact as a double and as a sorted-set score.
local score = int((100 - priority) * 1099511627776 + seq)
local seq_s = int(seq)
-- The integer arguments are canonical digits (int_arg): stored as they came. `attempts` and
-- `cancel_requested` start missing, which every reader takes as 0 (two fields fewer to write).
call('HSET', jk, 'user_id', uid, 'class', class, 'priority', ARGV[6], 'seq', seq_s,
  'score', score, 'status', 'QUEUED', 'max_attempts', ARGV[7], 'timeout_ms', ARGV[8],
  'payload', payload)
-- A user already at their limit: straight to the held set, so claims never have to look at it.
local urk = key('user:', uid, ':running')
local parked = tonumber(call('GET', urk) or '0') % HELD_UNIT >= cfg.per_user
local maybe_new_class = true
if parked then
  call('ZADD', key('held:', uid), score, id)
  call('INCRBY', urk, HELD_UNIT)
else
  -- A class already in the heads index is a known one: no HSETNX for it.
  maybe_new_class = place(class, id, score, qk, wk)
end
if maybe_new_class and call('HSETNX', K.classes, class, requirements) == 1 then
  call('INCR', K['classes:ver'])
  -- A class nobody has seen: every machine's idle claimer is told at once (a token on its own
  -- machine:<mid>:wake list, which it blocks on with its classes' lists), so the first job of a
  -- new kind does not wait for the next heartbeat. One token is enough (cut back to one); the
  -- list goes after an hour with nobody to take it. Costs 2-3 commands per live machine, once
  -- per class.
  local mids = call('ZRANGE', K.machines, 0, -1)
  for i = 1, #mids do
    local mw = key('machine:', mids[i], ':wake')
    if call('LPUSH', mw, '1') > 1 then call('LTRIM', mw, 0, 0) end
    call('PEXPIRE', mw, '3600000')
  end
end
-- Nothing here needs the time but the event, which takes its entry id's: no TIME call.
emit_untimed('job.submitted', id, nil, nil, '{"user_id":"' .. uid .. '","class":"' .. class
  .. '","priority":' .. ARGV[6] .. ',"seq":' .. seq_s .. ',"parked":'
  .. (parked and 'true' or 'false') .. '}')
return { 'queued', seq, parked and 1 or 0 }
