-- blocked_tasks(): the blocked tasks across projects in (project, id) order, a
-- page at a time, without reading the tasks of any other status.
CREATE INDEX tasks_blocked ON tasks (project_id, id)
    WHERE status = 'blocked';
