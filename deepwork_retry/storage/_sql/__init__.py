"""The SQL layer the SQL storages share (:mod:`.common`); each dialect's own part lives
with its storage."""
