-- A document is its snapshot plus the log rows appended after it.
CREATE TABLE document_snapshots (
    doc        TEXT PRIMARY KEY NOT NULL,
    data       BLOB NOT NULL,
    updated_at INTEGER NOT NULL DEFAULT (unixepoch())
);

CREATE TABLE document_updates (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    doc        TEXT NOT NULL,
    data       BLOB NOT NULL,
    created_at INTEGER NOT NULL DEFAULT (unixepoch())
);

CREATE INDEX document_updates_doc_id ON document_updates (doc, id);
