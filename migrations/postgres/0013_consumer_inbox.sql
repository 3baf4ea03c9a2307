-- Exactly-once effects for Kafka consumers that write to Postgres: the
-- message's position is recorded in the same transaction as its effect, so
-- a message delivered again (the consumer died after the effect, before it
-- committed its offset) finds its row and has no second effect.

CREATE TABLE consumer_inbox (
  consumer_group text NOT NULL,
  topic          text NOT NULL,
  partition      integer NOT NULL,
  "offset"       bigint NOT NULL,
  processed_at   timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (consumer_group, topic, partition, "offset")
);

GRANT SELECT, INSERT, DELETE ON consumer_inbox TO statefabric_app_role;
