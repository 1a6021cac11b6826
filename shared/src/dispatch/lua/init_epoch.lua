-- init_epoch (control plane, after the reconciler restored state): opens the doors for agents.
-- Keeps an epoch that is already there. The epoch is a field of the config hash, so the scripts
-- read it with the settings in one command.
-- KEYS: config
-- ARGV: prefix, epoch (1-64 bytes of [A-Za-z0-9_-])
-- Reply: {created (0|1), epoch}
K = bind_keys(KEYS_CONFIG)
local epoch = str_arg(ARGV[2], 1, 64, 'epoch')
if not match(epoch, '^[%w_%-]+$') then argerr('epoch', 'must be [A-Za-z0-9_-]') end
if call('HSETNX', K.config, 'epoch', epoch) == 1 then return { 1, epoch } end
return { 0, call('HGET', K.config, 'epoch') }
