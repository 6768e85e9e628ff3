-- When superseded versions of a task's table were last compacted (latest mode): a worker that
-- finishes a caught-up slice compacts when this is older than TENANTSYNC_COMPACT_EVERY_S.
ALTER TABLE sync_state ADD COLUMN compacted_at timestamptz;
