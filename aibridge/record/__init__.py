"""From a finished exchange to the audit log: how it ended (outcome), the rows it gives
(rows), and the writer that puts them in SQLite off the event loop (recorder, schema)."""
