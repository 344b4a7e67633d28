-- Tenants' key-value buckets (wasi:keyvalue, /v1/kv) and the configuration
-- values a function is deployed with (wasi:config).
--
-- `kv_buckets` keeps each non-empty bucket's key and byte counts, changed
-- in the same transaction as its entries: the quota checks read it instead
-- of counting entries. Writers of one tenant take a transaction-scoped lock
-- on its `tenants` row (FOR NO KEY UPDATE, which other tables' foreign key
-- checks do not wait for), so counts and quotas hold across hosts.

CREATE TABLE kv (
    tenant TEXT NOT NULL REFERENCES tenants (name),
    bucket TEXT COLLATE "C" NOT NULL,
    key TEXT COLLATE "C" NOT NULL,
    value BYTEA NOT NULL,
    PRIMARY KEY (tenant, bucket, key)
);

CREATE TABLE kv_buckets (
    tenant TEXT NOT NULL REFERENCES tenants (name),
    bucket TEXT COLLATE "C" NOT NULL,
    keys BIGINT NOT NULL,
    bytes BIGINT NOT NULL,
    PRIMARY KEY (tenant, bucket)
);

ALTER TABLE functions ADD COLUMN config JSONB NOT NULL DEFAULT '{}';
