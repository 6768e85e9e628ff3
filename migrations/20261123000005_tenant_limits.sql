-- Per-tenant insertAll budgets (NULL: the deployment's default for tenants).
ALTER TABLE tenants ADD COLUMN max_requests_per_s double precision CHECK (max_requests_per_s > 0),
                    ADD COLUMN max_rows_per_s double precision CHECK (max_rows_per_s > 0);
