-- Changelog capture (issue 4): a table spec can read a trigger-filled change table instead of
-- keyset reads on its cursor column. `tenantsync source install-changelog` installs the change
-- table and triggers in the source database; the spec only records which capture it uses.
ALTER TABLE table_specs
    ADD COLUMN capture text NOT NULL DEFAULT 'cursor' CHECK (capture IN ('cursor', 'changelog'));
