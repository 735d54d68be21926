-- A document is its snapshot plus the log rows appended after it.
CREATE TABLE document_snapshots (
    doc        TEXT PRIMARY KEY,
    data       BYTEA NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE document_updates (
    id         BIGSERIAL PRIMARY KEY,
    doc        TEXT NOT NULL,
    data       BYTEA NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX document_updates_doc_id ON document_updates (doc, id);
