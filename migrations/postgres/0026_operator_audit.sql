-- Operators' actions on sagas go into audit_log too (who, tenant, what,
-- which saga, outcome). The saga engine's login writes them for any
-- tenant — only rows of that kind (`saga.operator.*`), and it still may
-- not read, change or delete any row of the log.

GRANT INSERT ON audit_log TO statefabric_saga_engine_role;

CREATE POLICY engine_operator_insert ON audit_log FOR INSERT
  WITH CHECK ((SELECT pg_has_role(current_user, 'statefabric_saga_engine_role', 'MEMBER'))
              AND action LIKE 'saga.operator.%');
