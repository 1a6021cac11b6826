-- complete_claim: `complete` for the execution that finished, then `claim` for the next one, in
-- one call (the agent's usual path when it wants another job): one script call per job instead
-- of two, the settings, the time and the machine read once, and a one-slot machine stays BUSY
-- instead of going AVAILABLE and BUSY again (two status writes and two events fewer).
-- KEYS: epoch, config, leases, queued, events, heads, machine:<mid>, machine:<mid>:execs
-- ARGV: prefix, machine_id, execution_id (finished), outputs_json, next_execution_id (caller's
--       UUIDv7), max_parks, then the ids of the classes the machine can run (at least one).
-- Reply: {complete, claim...}: `complete` is complete's tag (ok, stale, not_owner), `claim...`
--        is claim's whole reply; or {'restoring'} alone (nothing done).
-- Every argument, the next execution id's freshness included, is checked before anything is
-- written, so a refused call changes nothing.
K = bind_keys({ 'epoch', 'config', 'leases', 'queued', 'events', 'heads' })
local mid = uuid_arg(ARGV[2], 'machine_id')
local eid = uuid_arg(ARGV[3], 'execution_id')
local outputs = json_arg(ARGV[4], 1048576, 'outputs')
local next_eid = uuid_arg(ARGV[5], 'next_execution_id')
if next_eid == eid then argerr('next_execution_id', 'must differ from execution_id') end
local max_parks = int_arg(ARGV[6], 1, 10000, 'max_parks')
local mk = want_key(7, 'machine:' .. mid)
local execs_key = want_key(8, 'machine:' .. mid .. ':execs')
local direct = claim_classes(7)

if not load_epoch() then return { 'restoring' } end
local again = claim_again(mid, next_eid)

-- complete.lua's work, the machine's status left for the end.
local done
local id, job = fence(mid, eid, 'complete', 'COMPLETED', true)
if job == 'again' then
  done = 'ok'
elseif not id then
  done = job
else
  end_execution(eid, mid, job.user, 'COMPLETED', true)
  finish(id, 'COMPLETED', false)
  emit('job.completed', id, eid, mid, '{"attempts":' .. job.attempts_text
    .. ',"exec_status":"COMPLETED","outputs":' .. outputs .. '}')
  done = 'ok'
end

local function answer(claim)
  table.insert(claim, 1, done)
  return claim
end
if again then return answer(again) end
local m = redis.call('HMGET', mk, 'status', 'max_slots', 'drain')
if not m[1] or m[1] == 'OFFLINE' or m[1] == 'TERMINATED' then
  return answer({ 'unknown_machine' })
end
local claim, running = claim_next(mid, next_eid, execs_key, m, max_parks, 7, direct)
-- A claim sets the status itself; otherwise the machine may have a free slot now.
if claim[1] ~= 'claimed' and done == 'ok' and id then
  local max_slots = tonumber(m[2]) or 1
  if m[3] ~= '1' and not running then running = redis.call('SCARD', execs_key) end
  set_machine_status(mid, m[1], machine_status_for(m[3], m[1] ~= 'STARTING', running or 0,
    max_slots), nil)
end
return answer(claim)
