-- No index on received_ms: every swipe's commit would write one more page to the WAL, and
-- the start-up load reads the newest rows by id instead (docs/benchmarks.md). Older
-- databases had one.
DROP INDEX IF EXISTS swipes_received;
