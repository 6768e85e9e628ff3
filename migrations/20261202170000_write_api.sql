-- A table's write method (issue 15): 'insert-all' or 'storage'; NULL follows the deployment's
-- default (TENANTSYNC_WRITE_API).
ALTER TABLE table_specs ADD COLUMN write_api text
    CHECK (write_api IN ('insert-all', 'storage'));
