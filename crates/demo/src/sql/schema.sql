-- Demo source schema: a multi-tenant chatbot platform. Every tenant-owned row carries
-- organization_id; updated_at is kept by a trigger, as most ORMs (and Glific) do.
DO $$ BEGIN
    CREATE TYPE message_type AS ENUM ('text', 'image', 'audio', 'video', 'location');
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;

CREATE OR REPLACE FUNCTION set_updated_at() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END $$;

CREATE TABLE IF NOT EXISTS organizations (
    id          bigint PRIMARY KEY,
    name        text NOT NULL,
    shortcode   text NOT NULL UNIQUE,
    is_active   boolean NOT NULL DEFAULT true,
    settings    jsonb NOT NULL DEFAULT '{}',
    inserted_at timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS contacts (
    id              bigserial PRIMARY KEY,
    organization_id bigint NOT NULL REFERENCES organizations (id),
    name            text,
    phone           text NOT NULL,
    language        text NOT NULL DEFAULT 'en',
    optin_status    boolean NOT NULL DEFAULT false,
    optin_time      timestamptz,
    fields          jsonb NOT NULL DEFAULT '{}',
    tags            text[] NOT NULL DEFAULT '{}',
    balance         numeric(12, 2),
    last_message_at timestamptz,
    inserted_at     timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS flows (
    id              bigserial PRIMARY KEY,
    organization_id bigint NOT NULL REFERENCES organizations (id),
    uuid            uuid NOT NULL DEFAULT gen_random_uuid(),
    name            text NOT NULL,
    keywords        text[] NOT NULL DEFAULT '{}',
    version         integer NOT NULL DEFAULT 1,
    is_active       boolean NOT NULL DEFAULT true,
    definition      jsonb,
    inserted_at     timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS messages (
    id              bigserial PRIMARY KEY,
    organization_id bigint NOT NULL REFERENCES organizations (id),
    contact_id      bigint,
    flow_id         bigint,
    body            text,
    type            message_type NOT NULL DEFAULT 'text',
    direction       text NOT NULL CHECK (direction IN ('inbound', 'outbound')),
    is_read         boolean NOT NULL DEFAULT false,
    media_ids       bigint[],
    sent_at         timestamptz,
    inserted_at     timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS flow_results (
    id              bigserial PRIMARY KEY,
    organization_id bigint NOT NULL REFERENCES organizations (id),
    flow_id         bigint NOT NULL,
    contact_id      bigint NOT NULL,
    results         jsonb NOT NULL DEFAULT '{}',
    score           double precision,
    flow_version    integer NOT NULL DEFAULT 1,
    completed       boolean NOT NULL DEFAULT false,
    inserted_at     timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- The index a cursor-mode reader wants: tenant, then cursor, then key.
CREATE INDEX IF NOT EXISTS contacts_sync ON contacts (organization_id, updated_at, id);
CREATE INDEX IF NOT EXISTS flows_sync ON flows (organization_id, updated_at, id);
CREATE INDEX IF NOT EXISTS messages_sync ON messages (organization_id, updated_at, id);
CREATE INDEX IF NOT EXISTS flow_results_sync ON flow_results (organization_id, updated_at, id);
CREATE INDEX IF NOT EXISTS organizations_sync ON organizations (id, updated_at);

DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['organizations', 'contacts', 'flows', 'messages', 'flow_results'] LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS %I_updated_at ON %I', t, t);
        EXECUTE format('CREATE TRIGGER %I_updated_at BEFORE UPDATE ON %I
                        FOR EACH ROW EXECUTE FUNCTION set_updated_at()', t, t);
    END LOOP;
END $$;
