-- History (src/history). Every stored update keeps who sent it (the token's
-- `sub`, NULL without auth); `created_at` already keeps when it was accepted.
ALTER TABLE document_updates ADD COLUMN author TEXT;

-- A document changed since its last version, and who changed it: written in
-- the transaction that stores the changes (one statement each per commit,
-- whatever it holds), taken (deleted) by the one replica that records the
-- next version. Times are milliseconds since the epoch.
CREATE TABLE history_changes (
    doc      TEXT PRIMARY KEY NOT NULL,
    first_at INTEGER NOT NULL,
    last_at  INTEGER NOT NULL
);

CREATE TABLE history_authors (
    doc    TEXT NOT NULL,
    author TEXT NOT NULL,
    PRIMARY KEY (doc, author)
);

-- A version: the changes since its parent version (`parent`, a `seq`), or
-- the whole state where `parent` is NULL; `data` is lz4-packed as snapshots
-- are. Reading one applies the chain from its nearest whole state; a whole
-- state is stored again once the chain outweighs it. `sv` is the version's
-- state vector, what the next version's changes are taken against.
-- `chain_bytes` is the packed size of the changes since the whole state.
-- Versions never depend on the update log, so compaction folds it freely.
-- `authors` is a JSON array.
CREATE TABLE document_versions (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    id          TEXT NOT NULL UNIQUE,
    doc         TEXT NOT NULL,
    at          INTEGER NOT NULL,
    name        TEXT,
    authors     TEXT NOT NULL,
    parent      INTEGER,
    data        BLOB NOT NULL,
    compression TEXT,
    sv          BLOB NOT NULL,
    chain_bytes INTEGER NOT NULL
);

CREATE INDEX document_versions_doc ON document_versions (doc, seq);
CREATE INDEX document_versions_at ON document_versions (at);
CREATE INDEX document_versions_parent ON document_versions (parent);
