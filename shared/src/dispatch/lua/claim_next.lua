-- claim_next.lua: the claim itself, shared by `claim` and `complete_claim` (Rust glues it in
-- front of their bodies). Finding the best head: with up to DIRECT_MAX classes, each class
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

-- The same execution id again from the same machine is a retry of a claim whose reply was lost:
-- the claim reply again (instead of leaving that job orphaned until its lease expires). nil for
-- an unused id; an argument error for one used elsewhere (raised before anything is written).
local function claim_again(mid, eid)
  local ex = redis.call('HMGET', key('exec:', eid), 'job', 'machine', 'status', 'started_ms',
    'deadline_ms')
  if not ex[1] then return nil end
  if ex[2] == mid and ex[3] == 'RUNNING' then
    local j = redis.call('HMGET', key('job:', ex[1]), 'attempts', 'max_attempts', 'class',
      'priority', 'timeout_ms', 'user_id', 'payload')
    return { 'claimed', ex[1], eid, j[1], j[2], j[3], j[4], j[5], j[6], ex[4], ex[5], j[7] or '' }
  end
  argerr('execution_id', 'already used')
end

-- Claims the best head for machine `mid` (its HMGET status, max_slots, drain in `m`) as
-- execution `eid`, from the classes in ARGV[first_class..]. Returns the reply and, unless the
-- machine is draining, how many executions the machine runs afterwards.
local function claim_next(mid, eid, execs_key, m, max_parks, first_class, direct)
  if m[3] == '1' then return { 'draining' } end
  local running = redis.call('SCARD', execs_key)
  local max_slots = tonumber(m[2]) or 1
  if running >= max_slots then return { 'at_capacity' }, running end
  local cfg = config()

  -- What this call knows of a class's queue: view[c] = {id1, score1, id2, score2, ...,
  -- whole = true when that is all the queue holds}. The index walk reads two entries, so taking
  -- the head still leaves the new head known (and its bound exact) without another read.
  local FETCH = direct and 1 or 2
  -- One class: ZPOPMIN reads and takes its head in one command. Whatever it pops is claimed,
  -- parked or dropped below, like a head read with ZRANGE and then removed.
  local pop = direct and #ARGV == first_class
  local view = {}
  local function head_of(c)
    local v = view[c]
    if not v or (v[1] == nil and not v.whole) then
      local r
      if pop then
        r = redis.call('ZPOPMIN', key('q:', c))
      else
        r = redis.call('ZRANGE', key('q:', c), 0, FETCH - 1, 'WITHSCORES')
      end
      v = { whole = #r < 2 * FETCH }
      for i = 1, #r, 2 do
        v[#v + 1] = r[i]
        v[#v + 1] = tonumber(r[i + 1])
      end
      view[c] = v
    end
    return v[1], v[2]
  end
  local function drop_head(c)
    local v = view[c]
    table.remove(v, 1)
    table.remove(v, 1)
  end

  local function best_direct()
    local bc, bid, bs
    for i = first_class, #ARGV do
      local id, s = head_of(ARGV[i])
      if id and (not bs or s < bs) then bc, bid, bs = ARGV[i], id, s end
    end
    return bc, bid, bs
  end

  local want = nil
  -- The index as read so far: batches of class ids as ZRANGE returned them, each twice as long as
  -- the one before, walked in place. Only the machine's own classes get their bound read (ZSCORE):
  -- scores for every entry (WITHSCORES) would make Redis format a double per entry, about 1 µs
  -- each, and another class costs one table lookup, which is what a walk past many classes the
  -- machine cannot run is made of (they pile up at the front when nothing else claims them).
  local batches, walked_all = {}, false
  local seen, seen_order = {}, {} -- class → its bound in the index, for the classes looked at
  local function best_indexed()
    if not want then
      want = {}
      for i = first_class, #ARGV do want[ARGV[i]] = true end
    end
    local bc, bid, bs
    local b, read = 1, 0
    while true do
      local batch = batches[b]
      if not batch then
        if walked_all then break end
        local n = read < 8 and 8 or read
        batch = redis.call('ZRANGE', K.heads, read, read + n - 1)
        batches[b] = batch
        if #batch < n then walked_all = true end
        if #batch == 0 then break end
      end
      for k = 1, #batch do
        local c = batch[k]
        if want[c] then
          local bound = seen[c] or tonumber(redis.call('ZSCORE', K.heads, c))
          -- Bounds only grow along the index: nothing further on can beat the best found.
          if bs and bound >= bs then return bc, bid, bs end
          if not seen[c] then
            seen[c] = bound
            seen_order[#seen_order + 1] = c
          end
          local id, s = head_of(c)
          if id and (not bs or s < bs) then bc, bid, bs = c, id, s end
        end
      end
      read = read + #batch
      b = b + 1
    end
    return bc, bid, bs
  end

  -- The index stays as it was during the walk (ranks must not move); bounds are tightened here.
  local function tighten_heads()
    for _, c in ipairs(seen_order) do
      local v = view[c]
      if v[1] then
        if v[2] ~= seen[c] then redis.call('ZADD', K.heads, int(v[2]), c) end
      elseif v.whole then
        redis.call('ZREM', K.heads, c)
      end
    end
  end

  local best = direct and best_direct or best_indexed
  local function done(reply)
    if not direct then tighten_heads() end
    return reply
  end

  local parks = 0
  while true do
    local c, id, score = best()
    if not c then return done({ 'empty' }), running end
    local jk = key('job:', id)
    local j = redis.call('HMGET', jk, 'status', 'user_id', 'attempts', 'max_attempts', 'priority',
      'timeout_ms', 'payload')
    if not pop then redis.call('ZREM', key('q:', c), id) end
    drop_head(c)
    -- (A queue entry without a queued job behind it should not happen; it is dropped so it cannot
    -- block the queue.)
    if j[1] == 'QUEUED' then
      local uid = j[2]
      local urk = key('user:', uid, ':running')
      if redis.call('INCR', urk) <= cfg.per_user then
        -- Take it. Every number is formatted once, then passed on as text.
        redis.call('DECR', K.queued)
        local now_s = now_text()
        local attempts = int((tonumber(j[3]) or 0) + 1)
        local deadline = now_ms() + tonumber(j[6])
        local deadline_s = int(deadline)
        local lease = now_ms() + cfg.lease_ms
        redis.call('HSET', jk, 'status', 'PROCESSING', 'attempts', attempts, 'execution_id', eid,
          'machine_id', mid, 'started_ms', now_s)
        redis.call('HSET', key('exec:', eid), 'job', id, 'machine', mid, 'user', uid, 'status',
          'RUNNING', 'started_ms', now_s, 'deadline_ms', deadline_s, 'attempts', attempts)
        redis.call('ZADD', K.leases, lease < deadline and int(lease) or deadline_s, eid)
        redis.call('SADD', execs_key, eid)
        set_machine_status(mid, m[1], machine_status_for(nil, true, running + 1, max_slots), nil)
        emit('job.claimed', id, eid, mid, '{"attempts":' .. attempts .. ',"user_id":"' .. uid
          .. '","deadline_ms":' .. deadline_s .. '}')
        return done({ 'claimed', id, eid, attempts, j[4], c, j[5], j[6], uid, now_s, deadline_s,
          j[7] or '' }), running + 1
      end
      -- The user is at their limit: park the job aside (same score) so it no longer blocks anyone;
      -- it comes back when one of the user's jobs ends.
      redis.call('DECR', urk)
      redis.call('ZADD', key('held:', uid), int(score), id)
    end
    parks = parks + 1
    if parks >= max_parks then return done({ 'again' }), running end
  end
end
