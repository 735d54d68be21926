-- How a snapshot's data is encoded: NULL for a plain Yjs v1 update, 'lz4'
-- for one compressed by Concord (src/store/mod.rs), which every snapshot
-- written from now on is. Existing snapshots are rewritten at their next
-- compaction.
ALTER TABLE document_snapshots ADD COLUMN compression TEXT;
