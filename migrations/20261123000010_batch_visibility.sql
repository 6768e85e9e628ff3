-- Batch visibility: a slice's rows carry `_batch_id` = '<tenant>-<table>-<fencing token>', and
-- the views show only batches listed in the tenant's `_sync_batches` table. A slice lists its
-- own batch, and every earlier batch of the task that was never listed (a crashed or fenced
-- slice's rows are correct versions and are covered by the listing slice), right before its
-- watermark commit. This column is the highest token listed so far.
ALTER TABLE sync_state ADD COLUMN batches_visible_through bigint NOT NULL DEFAULT 0;
