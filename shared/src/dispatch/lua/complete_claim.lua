-- complete_claim: `complete` for the execution that finished, then `claim` for the next one, in
-- one call (the agent's usual path when it wants another job): one script call per job instead
-- of two; the settings and the time read once; the machine read once and written once, so a
-- one-slot machine stays BUSY instead of going AVAILABLE and BUSY again.
-- KEYS: config, leases, queued, events, heads, machine:<mid>
-- ARGV: prefix, machine_id, execution_id (finished), outputs_json, next_execution_id (caller's
--       UUIDv7), max_parks, then the ids of the classes the machine can run (at least one).
-- Reply: {complete, claim...}: `complete` is complete's tag (ok, stale, not_owner), `claim...`
--        is claim's whole reply; or {'restoring'} alone (nothing done).
-- Every argument is checked before anything is written, so a refused call changes nothing;
-- except a next execution id used before, which is found only when the claim would create it:
-- refused then, with the completion kept (a retry answers it ok).
-- A retry after a lost reply gets both answers again.
K = bind_keys(KEYS_AGENT)
local mid = id_arg(ARGV[2], 'machine_id')
local eid = id_arg(ARGV[3], 'execution_id')
local outputs = json_arg(ARGV[4], 1048576, 'outputs')
local next_eid = uuid_arg(ARGV[5], 'next_execution_id')
if next_eid == eid then argerr('next_execution_id', 'must differ from execution_id') end
local max_parks = int_arg(ARGV[6], 1, 10000, 'max_parks', true)
want_key(6, 'machine:', mid)
local direct = claim_classes(7)

if not load_epoch() then return { 'restoring' } end
local m = call('HMGET', KEYS[6], unpack(MACHINE_FIELDS))
known_machine_arg(mid, m)
local again = claim_again(mid, next_eid, m[4])

-- complete.lua's work, in memory for the machine (written once, at the end or by the claim).
-- The user's slot is freed first, so a job of theirs it unparks competes for this claim.
local done
local freed = false
local id, job, rec = fence(mid, eid, m, 'complete', 'COMPLETED', true)
if job == 'again' then
  done = 'ok'
elseif not id then
  done = job
else
  end_execution_later(m, rec, 'COMPLETED')
  -- Held back: the claim's event (or the machine's) goes into the same stream entry, whose time
  -- is the call's; the job's end is written once it is known.
  ON_EMITTED, ON_EMITTED_ARG = finish_completed, id
  hold_event('job.completed', id, eid, mid, '{"attempts":' .. rec[4]
    .. ',"exec_status":"COMPLETED","outputs":' .. outputs .. '}')
  done = 'ok'
  freed = true
end

local claim, wrote = again, false
if not again then
  if m[1] and not machine_gone(m[1]) then
    claim, wrote = claim_next(mid, next_eid, m, max_parks, 7, direct, freed)
  else
    claim = { 'unknown_machine' }
  end
end
-- The finished execution leaves the machine's list (a claim that took a job wrote it already).
if freed and not wrote then refresh_machine(mid, m, m[4], m[5], nil) end
flush_event()
tinsert(claim, 1, done)
return claim
