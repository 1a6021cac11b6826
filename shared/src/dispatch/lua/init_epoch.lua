-- init_epoch (control plane, after the reconciler restored state): opens the doors for agents.
-- Keeps an epoch that is already there.
-- KEYS: epoch
-- ARGV: prefix, epoch (1-64 bytes of [A-Za-z0-9_-])
-- Reply: {created (0|1), epoch}
K = bind_keys({ 'epoch' })
local epoch = str_arg(ARGV[2], 1, 64, 'epoch')
if not string.match(epoch, '^[%w_%-]+$') then argerr('epoch', 'must be [A-Za-z0-9_-]') end
local current = redis.call('GET', K.epoch)
if current then return { 0, current } end
redis.call('SET', K.epoch, epoch)
return { 1, epoch }
