-- History (src/history). Every stored update keeps who sent it (the token's
-- `sub`, NULL without auth); `created_at` already keeps when it was accepted.
ALTER TABLE document_updates ADD COLUMN author TEXT;

-- A document changed since its last version: written in the transaction
-- that stores the changes, taken (deleted) by the one replica that records
-- the next version. Times are milliseconds since the epoch; `authors` is
-- newline-separated JSON strings, as in webhook_changes.
CREATE TABLE history_changes (
    doc      TEXT PRIMARY KEY,
    first_at BIGINT NOT NULL,
    last_at  BIGINT NOT NULL,
    authors  TEXT NOT NULL
);

-- A version: the document's whole state at that point (lz4, as snapshots),
-- so reading or restoring one needs nothing else and compaction stays free
-- to fold the log. `authors` is a JSON array.
CREATE TABLE document_versions (
    seq         BIGSERIAL PRIMARY KEY,
    id          TEXT NOT NULL UNIQUE,
    doc         TEXT NOT NULL,
    at          BIGINT NOT NULL,
    name        TEXT,
    authors     TEXT NOT NULL,
    data        BYTEA NOT NULL,
    compression TEXT
);

CREATE INDEX document_versions_doc ON document_versions (doc, seq);
CREATE INDEX document_versions_at ON document_versions (at);
