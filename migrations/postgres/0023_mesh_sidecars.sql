-- Which sidecars each control-plane replica serves mesh configuration to,
-- and how they took it: every replica writes its own row (the whole list,
-- rewritten when it changes, otherwise only seen_at), and the leader reads
-- the rows of live replicas to write each mesh resource's status, so the
-- counts cover the sidecars of every replica, not only the leader's.
-- A replica that stops writing drops out after a few intervals. Rows are
-- keyed by the control planes' lease name too: control planes of different
-- clusters (or tests) sharing one database do not count each other's
-- sidecars. Not tenant data: no row-level security.

CREATE TABLE mesh_sidecars (
  lease    text NOT NULL,
  replica  text NOT NULL,
  seen_at  timestamptz NOT NULL DEFAULT now(),
  sidecars jsonb NOT NULL,
  PRIMARY KEY (lease, replica)
);

GRANT SELECT, INSERT, UPDATE, DELETE ON mesh_sidecars TO statefabric_app_role;
