-- Machines, every configuration generation per machine, every push attempt, the operator
-- audit log and the swipe journal. IF NOT EXISTS: databases made before migrations were
-- numbered (user_version 0 to 2) already have these tables.
CREATE TABLE IF NOT EXISTS machines (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL DEFAULT '',
    protocol_version INTEGER NOT NULL DEFAULT 1,
    last_peer TEXT,
    last_hello_ms INTEGER,
    desired_generation INTEGER NOT NULL DEFAULT 0,
    applied_generation INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE TABLE IF NOT EXISTS configs (
    machine_id INTEGER NOT NULL REFERENCES machines(id),
    generation INTEGER NOT NULL,
    content BLOB NOT NULL,
    sha256 TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    created_by TEXT NOT NULL,
    PRIMARY KEY (machine_id, generation)
);
CREATE TABLE IF NOT EXISTS push_attempts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    machine_id INTEGER NOT NULL,
    generation INTEGER NOT NULL,
    at_ms INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS push_attempts_machine ON push_attempts(machine_id, generation);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    actor TEXT NOT NULL,
    source TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS swipes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL,
    machine_id INTEGER NOT NULL,
    reader TEXT NOT NULL,
    card_masked TEXT NOT NULL,
    swiped_at_ms INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS swipes_event ON swipes(event_id);
