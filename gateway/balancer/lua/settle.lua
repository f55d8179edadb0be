-- settle / release reservations, each once; with `ok`, also the deployment's good answer
-- (which closes its breaker: signal.lua's 'ok', folded in to save a round trip per request).
-- One or more (a batch: redis_state.settle_later); the same settlements also ride along an
-- acquire (acquire.lua). KEYS and ARGV: per settlement, as lib.lua's finish_batch reads them.
-- Returns per settlement 1 if this call finished the reservation, 0 if it was done.
return finish_batch(KEYS, 1, ARGV, 1)
