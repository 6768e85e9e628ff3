-- CDC mode (issue 15): BigQuery keeps one row per primary key from UPSERT/DELETE rows written
-- to the table's default stream. `max_staleness_s` is the table's max_staleness option (how
-- stale BigQuery may serve the applied state); it applies to CDC tables only.
ALTER TABLE table_specs DROP CONSTRAINT IF EXISTS table_specs_mode_check;
ALTER TABLE table_specs ADD CONSTRAINT table_specs_mode_check
    CHECK (mode IN ('latest', 'history', 'merge', 'cdc'));
ALTER TABLE table_specs ADD COLUMN max_staleness_s integer NOT NULL DEFAULT 900
    CHECK (max_staleness_s > 0);
