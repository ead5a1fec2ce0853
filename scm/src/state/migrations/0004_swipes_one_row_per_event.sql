-- One journal row per swipe: an agent's retries (after BUSY) and the bridges' outcomes
-- update it. Databases written before kept a row per retry: keep each event's newest.
DELETE FROM swipes WHERE id NOT IN (SELECT MAX(id) FROM swipes GROUP BY event_id);
DROP INDEX IF EXISTS swipes_event;
CREATE UNIQUE INDEX swipes_event ON swipes(event_id);
-- How many times the SCM was sent this swipe (retries after BUSY count).
ALTER TABLE swipes ADD COLUMN attempts INTEGER NOT NULL DEFAULT 1;
