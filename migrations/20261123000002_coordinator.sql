-- The coordinator maps changed tenant ids (from the source) to tasks.
CREATE INDEX tenants_by_organization ON tenants (organization_id);
