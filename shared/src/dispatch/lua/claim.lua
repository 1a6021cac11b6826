-- claim: the best job among the heads of the caller's classes, as one new execution (the work
-- is claim_next.lua's).
-- KEYS: config, leases, queued, events, heads, machine:<mid>
-- ARGV: prefix, machine_id, execution_id (caller's UUIDv7: the fence), max_parks, then the ids
--       of the classes the machine can run (at least one).
-- Reply: {'claimed', job_id, execution_id, attempts, max_attempts, class, priority, timeout_ms,
--         user_id, started_ms, deadline_ms, payload}
--      | {'empty'} | {'again'} (parked max_parks heads; call again) | {'at_capacity'}
--      | {'draining'} | {'unknown_machine'} | {'restoring'}
K = bind_keys(KEYS_AGENT)
local mid = uuid_arg(ARGV[2], 'machine_id')
local eid = uuid_arg(ARGV[3], 'execution_id')
local max_parks = int_arg(ARGV[4], 1, 10000, 'max_parks', true)
want_key(6, 'machine:', mid)
local direct = claim_classes(5)

if not load_epoch() then return { 'restoring' } end
local m = call('HMGET', KEYS[6], unpack(MACHINE_FIELDS))
if not m[1] or machine_gone(m[1]) then return { 'unknown_machine' } end
local again = claim_again(mid, eid, m[4])
if again then return again end
return (claim_next(mid, eid, m, max_parks, 5, direct, false))
