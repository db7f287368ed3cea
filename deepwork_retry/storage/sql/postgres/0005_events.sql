-- Migration 0005: lifecycle events (see deepwork_retry/_core/events.py) and
-- the outbox entry's trace context.
--
-- Every move writes its events in the same transaction, numbered per project
-- 1, 2, 3 ... in commit order without gaps: the last number is kept on the
-- project's row (not on the progress stripes, 0003), bumped by the move's
-- own statement. The row's lock, held from the bump to the commit, is what
-- orders the numbers: a second writer of the project waits for the first
-- one's commit before it takes the next number.
ALTER TABLE projects ADD COLUMN event_seq bigint NOT NULL DEFAULT 0;

CREATE TABLE events (
    project_id    text COLLATE "C" NOT NULL REFERENCES projects (id),
    seq           bigint      NOT NULL,
    type          text        NOT NULL,
    task_id       text COLLATE "C",
    attempt       bigint,
    at            timestamptz NOT NULL,
    data          jsonb       NOT NULL,
    -- NULL: pending (not yet delivered to every subscriber).
    delivered_at  timestamptz,
    claimed_until timestamptz,
    PRIMARY KEY (project_id, seq)
);

-- claim_events(): the pending events in (project_id, seq) order.
CREATE INDEX events_pending ON events (project_id, seq) WHERE delivered_at IS NULL;
-- claim_events(): an earlier pending event of the same task, claimed by another caller.
CREATE INDEX events_pending_by_task ON events (project_id, task_id, seq)
    WHERE delivered_at IS NULL;
-- Retention: delivered events by delivery time.
CREATE INDEX events_delivered ON events (delivered_at) WHERE delivered_at IS NOT NULL;

-- A subscriber's failed delivery of an event: retried at retry_at, parked after its limit.
CREATE TABLE event_retries (
    project_id    text COLLATE "C" NOT NULL,
    seq           bigint      NOT NULL,
    subscriber    text COLLATE "C" NOT NULL,
    tries         bigint      NOT NULL,
    retry_at      timestamptz NOT NULL,
    last_error    text,
    parked        boolean     NOT NULL DEFAULT false,
    claimed_until timestamptz,
    PRIMARY KEY (project_id, seq, subscriber),
    FOREIGN KEY (project_id, seq) REFERENCES events (project_id, seq)
);

-- claim_event_retries(): the due deliveries, earliest first.
CREATE INDEX event_retries_due ON event_retries (retry_at) WHERE NOT parked;

-- The W3C trace context of the request that made the attempt (NULL without telemetry).
ALTER TABLE outbox ADD COLUMN trace text;
