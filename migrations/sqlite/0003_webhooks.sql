-- Webhooks (src/webhooks). A document whose stored changes have not become
-- an event yet: written in the transaction that stores the changes, so no
-- crash falls between "stored" and "will be announced". Times are
-- milliseconds since the epoch; `authors` is newline-separated JSON strings.
CREATE TABLE webhook_changes (
    doc      TEXT PRIMARY KEY NOT NULL,
    first_at INTEGER NOT NULL,
    last_at  INTEGER NOT NULL,
    authors  TEXT NOT NULL
);

-- One row per event and URL, until the URL answers 2xx or the event is
-- given up. `id` is the event's (X-Concord-Delivery); a replica sending it
-- holds it until `lease_until`.
CREATE TABLE webhook_deliveries (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    id          TEXT NOT NULL,
    url         TEXT NOT NULL,
    body        TEXT NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    created_at  INTEGER NOT NULL,
    due_at      INTEGER NOT NULL,
    lease_until INTEGER NOT NULL DEFAULT 0,
    leased_by   TEXT
);

CREATE INDEX webhook_deliveries_due ON webhook_deliveries (due_at);
