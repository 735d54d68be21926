-- Webhooks (src/webhooks). A document whose stored changes have not become
-- an event yet: written in the transaction that stores the changes, so no
-- crash falls between "stored" and "will be announced". Times are
-- milliseconds since the epoch; `authors` is newline-separated JSON strings.
CREATE TABLE webhook_changes (
    doc      TEXT PRIMARY KEY,
    first_at BIGINT NOT NULL,
    last_at  BIGINT NOT NULL,
    authors  TEXT NOT NULL
);

-- One row per event and URL, until the URL answers 2xx or the event is
-- given up. `id` is the event's (X-Concord-Delivery); a replica sending it
-- holds it until `lease_until`.
CREATE TABLE webhook_deliveries (
    seq         BIGSERIAL PRIMARY KEY,
    id          TEXT NOT NULL,
    url         TEXT NOT NULL,
    body        TEXT NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    created_at  BIGINT NOT NULL,
    due_at      BIGINT NOT NULL,
    lease_until BIGINT NOT NULL DEFAULT 0,
    leased_by   TEXT
);

CREATE INDEX webhook_deliveries_due ON webhook_deliveries (due_at);
