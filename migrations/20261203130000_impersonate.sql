-- Keyless tenants (issue 16, `tenant add --impersonate SA_EMAIL`): the service account the
-- deployment's own account impersonates for this tenant. Such a tenant has no stored key.
ALTER TABLE tenants ADD COLUMN impersonate text;
