-- Leader election for replicated services (the control plane's saga engine
-- and outbox relay): one row per role, held by one instance until its lease
-- runs out. Every new term gets a larger epoch; the leader's writes check
-- their epoch (statefabric_check_epoch) in the same transaction, so an old
-- leader that wakes up after a pause is refused instead of writing over its
-- successor. Times come from the database's clock, one clock for all
-- replicas. Not tenant data: no row-level security.

CREATE TABLE leader_leases (
  name       text PRIMARY KEY,
  holder     text NOT NULL,
  epoch      bigint NOT NULL CHECK (epoch >= 1),
  expires_at timestamptz NOT NULL,
  since      timestamptz NOT NULL DEFAULT now()
);

-- Takes the lease if it is free or lapsed (a new term: epoch + 1), or
-- extends it for its holder while it is still valid (same term). Returns the
-- epoch held, or NULL when another instance holds a valid lease.
CREATE FUNCTION statefabric_acquire_lease(p_name text, p_holder text, p_ttl interval)
RETURNS bigint LANGUAGE sql AS $$
  INSERT INTO leader_leases AS l (name, holder, epoch, expires_at)
  VALUES (p_name, p_holder, 1, now() + p_ttl)
  ON CONFLICT (name) DO UPDATE SET
    epoch = CASE WHEN l.holder = EXCLUDED.holder AND l.expires_at > now()
                 THEN l.epoch ELSE l.epoch + 1 END,
    since = CASE WHEN l.holder = EXCLUDED.holder AND l.expires_at > now()
                 THEN l.since ELSE now() END,
    holder = EXCLUDED.holder,
    expires_at = EXCLUDED.expires_at
  WHERE l.holder = EXCLUDED.holder OR l.expires_at <= now()
  RETURNING epoch;
$$;

-- Lets go at once (clean shutdown), if still the holder of that term.
CREATE FUNCTION statefabric_release_lease(p_name text, p_holder text, p_epoch bigint)
RETURNS boolean LANGUAGE sql AS $$
  UPDATE leader_leases SET expires_at = now()
   WHERE name = p_name AND holder = p_holder AND epoch = p_epoch
  RETURNING true;
$$;

-- The fence for a leader's writes: raises unless `p_epoch` is the current
-- term and its lease has not run out. Call it first in the transaction; the
-- row lock (FOR SHARE) keeps a new term from starting until it commits.
CREATE FUNCTION statefabric_check_epoch(p_name text, p_epoch bigint)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
  current_epoch bigint;
  valid boolean;
BEGIN
  SELECT epoch, expires_at > now() INTO current_epoch, valid
    FROM leader_leases WHERE name = p_name FOR SHARE;
  IF current_epoch IS NULL OR current_epoch <> p_epoch OR NOT valid THEN
    RAISE EXCEPTION 'stale leader epoch % for %, current epoch %', p_epoch, p_name, current_epoch
      USING ERRCODE = 'SF001';
  END IF;
END;
$$;

GRANT SELECT, INSERT, UPDATE ON leader_leases TO statefabric_app_role;
GRANT EXECUTE ON FUNCTION statefabric_acquire_lease(text, text, interval),
                          statefabric_release_lease(text, text, bigint),
                          statefabric_check_epoch(text, bigint) TO statefabric_app_role;
