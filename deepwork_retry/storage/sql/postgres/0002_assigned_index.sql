-- redeliver_stale(): start from the few tasks waiting to be started, then
-- look up each one's current outbox entry by key, instead of scanning every
-- task or every delivered entry.
CREATE INDEX tasks_assigned ON tasks (project_id, id, attempt)
    WHERE status = 'assigned';
