-- Where a tenant's dataset is (issue 16): `tenant add --location`, else the deployment's
-- TENANTSYNC_BQ_LOCATION. NULL for tenants onboarded before: their datasets are used wherever
-- they are, until `tenant update --location` records (and checks) one.
ALTER TABLE tenants ADD COLUMN bq_location text;
