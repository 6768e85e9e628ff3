-- Column policies (issue 16): source columns never sent to BigQuery (a PII column an operator
-- keeps out of every tenant's dataset). `tables add --exclude-column`.
ALTER TABLE table_specs ADD COLUMN exclude_columns text[] NOT NULL DEFAULT '{}';
