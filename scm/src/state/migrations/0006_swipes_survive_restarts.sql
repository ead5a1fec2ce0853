-- Queued swipes survive a restart: the absolute deadline (wall clock, Unix ms) of each
-- queued swipe, and its card in clear while (and only while) the row says `queued`; every
-- later state clears it. Rows written before have neither: they are never queued again.
ALTER TABLE swipes ADD COLUMN deadline_ms INTEGER;
ALTER TABLE swipes ADD COLUMN card TEXT;
