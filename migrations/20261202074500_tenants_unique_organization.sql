-- One tenant per organization (issue 13, item 5). A second tenant for an organization id
-- already onboarded received the first one's rows in its own dataset. Onboarding checks this
-- first with a clear message; the index is what holds when two onboardings race.
--
-- Removed tenants are deleted (`tenant remove`), so they free their organization id; a tenant
-- whose removal failed stays, paused, and still owns it.
--
-- Ids are compared as stored: onboarding only stores the canonical text of the tenant
-- column's type (`42`, never `042`), so equal values have equal text.
DO $$
DECLARE
    dup text;
BEGIN
    SELECT string_agg(format('%s (tenants %s)', organization_id, slugs), '; ')
    INTO dup
    FROM (SELECT organization_id, string_agg(slug, ', ' ORDER BY slug) AS slugs
          FROM tenants GROUP BY organization_id HAVING count(*) > 1) d;
    IF dup IS NOT NULL THEN
        RAISE EXCEPTION 'several tenants share an organization id: %', dup
            USING HINT = 'each receives the same rows; remove all but one of each '
                         '(tenantsync tenant remove <slug> --keep-data), then migrate again';
    END IF;
END $$;

CREATE UNIQUE INDEX tenants_organization_id_key ON tenants (organization_id);
-- The unique index serves the coordinator's lookups of changed organization ids.
DROP INDEX tenants_by_organization;
