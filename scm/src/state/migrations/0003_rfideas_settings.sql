-- Settings that print servers store on RFIDeas 241 devices (`GET /config`), per device.
-- IF NOT EXISTS: the bridge created this table itself before it was a migration.
CREATE TABLE IF NOT EXISTS rfideas_settings (
    machine_id INTEGER NOT NULL,
    reader TEXT NOT NULL,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    updated_ms INTEGER NOT NULL,
    updated_by TEXT NOT NULL,
    PRIMARY KEY (machine_id, reader, name)
);
