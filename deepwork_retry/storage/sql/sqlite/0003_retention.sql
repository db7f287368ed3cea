-- Migration 0003: retention (see deepwork_retry/_core/retention.py).
--
-- Idempotency records expire: each row carries the moment its key becomes
-- free again. Rows written before this migration get the default life of
-- 24 hours from their creation.
ALTER TABLE idempotency ADD COLUMN expires_at INTEGER NOT NULL DEFAULT 0;
UPDATE idempotency SET expires_at = created_at + 86400000000;

-- Each prune batch is a range read of one of these indexes, oldest first:
-- expired idempotency records,
CREATE INDEX idempotency_by_expiry ON idempotency (expires_at);
-- delivered outbox entries by delivery time,
CREATE INDEX outbox_delivered ON outbox (delivered_at) WHERE state = 'delivered';
-- attempt records by dispatch time (the task's state is then a key lookup).
CREATE INDEX attempts_by_dispatch ON attempts (dispatched_at);
