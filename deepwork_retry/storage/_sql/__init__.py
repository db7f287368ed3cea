"""The SQL layer the SQL storages share: columns and effect rendering (:mod:`.common`),
stored encodings (:mod:`.codec`), statements (:mod:`.statements`), the operations
(:mod:`.engine`) and what a dialect spells its own way (:mod:`.dialect`)."""
