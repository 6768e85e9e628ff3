-- Hash of the BigQuery schema (fields, key columns) last ensured for a task, so workers skip the
-- dataset/table/view calls for tables that are already right, across processes and restarts.
ALTER TABLE sync_state ADD COLUMN schema_hash text;
