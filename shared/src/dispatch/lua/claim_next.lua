-- claim_next.lua: the claim itself, shared by `claim` and `complete_claim` (in the library
-- after lifecycle.lua). Finding the best head: with up to DIRECT_MAX classes, each class
-- queue's head is read (ZRANGE 0 0: one command per class; with a single class ZPOPMIN, which
-- also takes it). With more, the heads index (class → a lower bound of its queue's head score,
-- every non-empty class present) is walked best first, in growing batches: a class of the
-- machine's is looked at (its true head read) only while its bound could still beat the best
-- head found, so the walk stops after a few entries whatever the number of classes, and classes
-- the machine cannot run cost one table lookup each. Bounds found stale on the way (the class
-- was claimed from, or emptied) are tightened at the end of the call; the machine's class ids
-- are only compared with the index's members, never used to build keys.

local DIRECT_MAX = 4

-- Checks the class ids from ARGV[first_class] on (at least one). Returns whether the claim
-- reads each queue directly (few classes: their ids build keys, so they are checked here).
local function claim_classes(first_class)
  if #ARGV < first_class then argerr('classes', 'at least one class') end
  local direct = #ARGV - first_class + 1 <= DIRECT_MAX
  if direct then
    for i = first_class, #ARGV do class_arg(ARGV[i], 'class') end
  end
  return direct
end

-- The same execution id again from the same machine, which still runs it, is a retry of a claim
-- whose reply was lost: the claim reply again (instead of leaving that job orphaned until its
-- lease expires). `execs`: the machine's list, where a running execution is found without a
-- read; nil when the id is not running there (an id used anywhere else is refused when the
-- claim tries to create its exec key: see claim_next).
local function claim_again(mid, eid, execs)
  local r = record_find(execs, eid)
  if not r then return nil end
  local j = call('HMGET', key('job:', r[2]), 'max_attempts', 'class', 'priority',
    'timeout_ms', 'payload')
  return { 'claimed', r[2], eid, r[4], j[1], j[2], j[3], j[4], r[3], r[5], r[6], j[5] or '' }
end

-- The search state of one claim (a table, not closures over locals: a closure and each local it
-- captures are built again on every call).
--   first: where the classes start in ARGV.
--   view[c]: what the claim knows of class c's queue: {id1, score1, id2, score2, ..., whole =
--     true when that is all the queue holds}, read with ZRANGE. The index walk reads two entries
--     (fetch = 2), so taking the head still leaves the new head known (and its bound exact)
--     without another read.
--   batches, walked_all, seen, seen_order, want: the index walk's (best_indexed).
-- With one class there is no view: pop_only takes its head at once.
local function head_of(s, c)
  local view = s.view
  if not view then
    view = {}
    s.view = view
  end
  local v = view[c]
  if not v or (v[1] == nil and not v.whole) then
    local r = call('ZRANGE', key('q:', c), 0, s.fetch - 1, 'WITHSCORES')
    v = { whole = #r < 2 * s.fetch }
    for i = 1, #r, 2 do
      v[#v + 1] = r[i]
      v[#v + 1] = tonumber(r[i + 1])
    end
    view[c] = v
  end
  return v[1], v[2]
end

local function drop_head(s, c)
  local v = s.view[c]
  tremove(v, 1)
  tremove(v, 1)
end

-- The head of the one class ARGV[first], read and taken in one command (ZPOPMIN): nothing to
-- compare, nothing to keep. Whatever it pops is claimed, parked or dropped, like a head read with
-- ZRANGE and then removed.
local function pop_only(s)
  local c = ARGV[s.first]
  local r = call('ZPOPMIN', key('q:', c))
  if not r[1] then return nil end
  return c, r[1], tonumber(r[2])
end

-- The best head among the classes ARGV[first..], each queue read directly.
local function best_direct(s)
  local bc, bid, bs
  for i = s.first, #ARGV do
    local id, sc = head_of(s, ARGV[i])
    if id and (not bs or sc < bs) then bc, bid, bs = ARGV[i], id, sc end
  end
  return bc, bid, bs
end

-- The best head found walking the heads index. The index as read so far: batches of class ids
-- as ZRANGE returned them, each twice as long as the one before, walked in place. Only the
-- machine's own classes get their bound read (ZSCORE): scores for every entry (WITHSCORES) would
-- make Redis format a double per entry, about 1 µs each, and another class costs one table
-- lookup, which is what a walk past many classes the machine cannot run is made of (they pile up
-- at the front when nothing else claims them).
local function best_indexed(s)
  local want = s.want
  if not want then
    want = {}
    for i = s.first, #ARGV do want[ARGV[i]] = true end
    s.want, s.batches, s.walked_all, s.seen, s.seen_order = want, {}, false, {}, {}
  end
  local batches, seen, seen_order = s.batches, s.seen, s.seen_order
  local bc, bid, bs
  local b, read = 1, 0
  while true do
    local batch = batches[b]
    if not batch then
      if s.walked_all then break end
      local n = read < 8 and 8 or read
      batch = call('ZRANGE', K.heads, read, read + n - 1)
      batches[b] = batch
      if #batch < n then s.walked_all = true end
      if #batch == 0 then break end
    end
    for k = 1, #batch do
      local c = batch[k]
      if want[c] then
        local bound = seen[c] or tonumber(call('ZSCORE', K.heads, c))
        -- Bounds only grow along the index: nothing further on can beat the best found.
        if bs and bound >= bs then return bc, bid, bs end
        if not seen[c] then
          seen[c] = bound
          seen_order[#seen_order + 1] = c
        end
        local id, sc = head_of(s, c)
        if id and (not bs or sc < bs) then bc, bid, bs = c, id, sc end
      end
    end
    read = read + #batch
    b = b + 1
  end
  return bc, bid, bs
end

-- After an index walk: the index stayed as it was during the walk (ranks must not move); the
-- bounds it found stale are tightened now.
local function tighten_heads(s)
  local seen = s.seen
  if not seen then return end
  for _, c in ipairs(s.seen_order) do
    local v = s.view[c]
    if v[1] then
      if v[2] ~= seen[c] then call('ZADD', K.heads, int(v[2]), c) end
    elseif v.whole then
      call('ZREM', K.heads, c)
    end
  end
end

-- A claim's reply, once the bounds its walk found stale are tightened.
local function claim_done(s, reply)
  tighten_heads(s)
  return reply
end

-- Claims the best head for machine `mid` (its HMGET of MACHINE_FIELDS in `m`, whose list and
-- `ended` the caller may have changed already, in memory) as execution `eid`, from the classes in
-- ARGV[first_class..]. Returns the reply and whether it wrote the machine (a claim writes the
-- new list and status itself, with `ended` when `ended_changed`; otherwise the caller still has
-- to).
local function claim_next(mid, eid, m, max_parks, first_class, direct, ended_changed)
  if m[3] == '1' then return { 'draining' }, false end
  local execs = m[4]
  local running = execs_count(execs)
  local max_slots = tonumber(m[2]) or 1
  if running >= max_slots then return { 'at_capacity' }, false end
  local cfg = config()

  local pop = direct and #ARGV == first_class
  local s = { first = first_class, fetch = direct and 1 or 2 }
  local best = pop and pop_only or (direct and best_direct or best_indexed)

  local parks = 0
  while true do
    local c, id, score = best(s)
    if not c then return claim_done(s, { 'empty' }), false end
    local jk = key('job:', id)
    local j = call('HMGET', jk, 'status', 'user_id', 'attempts', 'max_attempts', 'priority',
      'timeout_ms', 'payload')
    if not pop then
      call('ZREM', key('q:', c), id)
      drop_head(s, c)
    end
    -- (A queue entry without a queued job behind it should not happen; it is dropped so it cannot
    -- block the queue.)
    if j[1] == 'QUEUED' then
      local uid = j[2]
      local urk = key('user:', uid, ':running')
      if call('INCR', urk) % HELD_UNIT <= cfg.per_user then
        -- Take it. Every number is formatted once, then passed on as text.
        local attempts = int((tonumber(j[3]) or 0) + 1)
        local timeout = tonumber(j[6])
        -- The execution's key, created only if its id was never used (SET NX): a retry of a lost
        -- claim was answered before (claim_again); any other reuse is refused here, with the job
        -- put back where it was and the user's count as it was.
        if not call('SET', key('exec:', eid), id .. ' ' .. mid, 'NX', 'PX',
          int(timeout + cfg.finished_ttl)) then
          call('DECR', urk)
          local score_s = int(score)
          call('ZADD', key('q:', c), score_s, id)
          call('ZADD', K.heads, 'LT', score_s, c)
          -- What the caller ended stays ended: its machine written, its event too.
          if ended_changed then refresh_machine(mid, m, m[4], m[5], nil) end
          flush_event()
          argerr('execution_id', 'already used')
        end
        call('DECR', K.queued)
        -- The event first: when the call has not read the time yet, its entry's time is the
        -- claim's (see xadd), so no TIME call.
        emit('job.claimed', id, eid, mid, '{"attempts":' .. attempts .. ',"user_id":"' .. uid
          .. '","timeout_ms":' .. j[6] .. '}')
        local now_s = now_text()
        local deadline = now_ms() + timeout
        local deadline_s = int(deadline)
        local due = now_ms() + cfg.lease_ms
        if deadline < due then due = deadline end
        local due_s = due == deadline and deadline_s or int(due)
        call('HSET', jk, 'status', 'PROCESSING', 'attempts', attempts, 'execution_id', eid,
          'machine_id', mid, 'started_ms', now_s)
        local list = execs_add(execs, eid .. ',' .. id .. ',' .. uid .. ',' .. attempts .. ','
          .. now_s .. ',' .. deadline_s .. ',' .. due_s)
        write_machine(mid, m, list, machine_status_for(nil, true, running + 1, max_slots), nil,
          ended_changed and m[5] or nil, lease_lower(mid, m[6], due, due_s))
        return claim_done(s, { 'claimed', id, eid, attempts, j[4], c, j[5], j[6], uid, now_s,
          deadline_s, j[7] or '' }), true
      end
      -- The user is at their limit: park the job aside (same score) so it no longer blocks anyone;
      -- it comes back when one of the user's jobs ends. The INCR becomes one more held job.
      call('INCRBY', urk, HELD_UNIT - 1)
      call('ZADD', key('held:', uid), int(score), id)
    end
    parks = parks + 1
    if parks >= max_parks then return claim_done(s, { 'again' }), false end
  end
end
