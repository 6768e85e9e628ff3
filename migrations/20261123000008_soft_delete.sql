-- Cursor mode cannot see a row that is deleted; many applications mark rows deleted instead
-- (`deleted_at`, `is_deleted`). A table spec can name that column: a marked row is sent as a
-- delete (tombstone) version and leaves `<table>_latest`.
ALTER TABLE table_specs ADD COLUMN soft_delete_column text;
