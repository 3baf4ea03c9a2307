-- The fence check without a row lock. `FOR SHARE` on the lease row made
-- every fenced transaction (each saga transition, each relay batch) a
-- share-locker of one row: under load that means a MultiXact per
-- transaction and a lease renewal (an UPDATE of that row) queued behind
-- them, which can delay renewal past the lease and cost the leader its
-- term. The check does not need the lock: a write checked under the old
-- term that commits after a new term began is still caught by what it
-- writes — saga transitions carry the instance's expected revision (the new
-- leader's write of the same saga conflicts and is retried), and the relay's
-- deletes only remove rows already sent (delivery is at-least-once). The
-- epoch comparison itself is unchanged: a leader whose term is over is
-- refused.
CREATE OR REPLACE FUNCTION statefabric_check_epoch(p_name text, p_epoch bigint)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
  current_epoch bigint;
  valid boolean;
BEGIN
  SELECT epoch, expires_at > now() INTO current_epoch, valid
    FROM leader_leases WHERE name = p_name;
  IF current_epoch IS NULL OR current_epoch <> p_epoch OR NOT valid THEN
    RAISE EXCEPTION 'stale leader epoch % for %, current epoch %', p_epoch, p_name, current_epoch
      USING ERRCODE = 'SF001';
  END IF;
END;
$$;
