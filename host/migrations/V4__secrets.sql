-- Tenant secrets (sealed by the hosts' secrets key; the database never sees
-- a value) and the names a function is deployed with. Every change to
-- `secrets` notifies channel `gust_secrets`, so that hosts drop the values
-- they have opened and read them again at the next call.

CREATE TABLE secrets (
    tenant TEXT NOT NULL REFERENCES tenants (name),
    name TEXT NOT NULL,
    key_id TEXT NOT NULL,
    sealed BYTEA NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (tenant, name)
);

ALTER TABLE functions ADD COLUMN secrets TEXT[] NOT NULL DEFAULT '{}';

CREATE FUNCTION gust_secret_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('gust_secrets', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER secrets_changed
AFTER INSERT OR UPDATE OR DELETE ON secrets
FOR EACH ROW EXECUTE FUNCTION gust_secret_changed();
