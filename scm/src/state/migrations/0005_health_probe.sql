-- One row the health probe rewrites at every metrics scrape: a real write, so that
-- scm_database_writable says whether the database takes writes now (read-only file, full
-- disk, a lock held elsewhere), not only whether it answers a query.
CREATE TABLE IF NOT EXISTS health_probe (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    written_ms INTEGER NOT NULL
);
