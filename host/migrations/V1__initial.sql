-- The first layout of Gust's shared store. Applied once by refinery at a
-- host's start (`refinery_schema_history` records it); later changes come as
-- new files, never edits of this one.

CREATE TABLE tenants (
    name TEXT PRIMARY KEY,
    created_at BIGINT NOT NULL
);

CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL REFERENCES tenants (name),
    hash BYTEA NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);
CREATE INDEX api_keys_by_tenant ON api_keys (tenant, id);

-- Incarnations: drawn at a function's first deploy and kept across its
-- versions, so that the records of a deleted function never show under a
-- new one of the same name.
CREATE SEQUENCE incarnations;

CREATE TABLE functions (
    tenant TEXT NOT NULL REFERENCES tenants (name),
    name TEXT NOT NULL,
    incarnation BIGINT NOT NULL,
    version BIGINT NOT NULL,
    digest TEXT NOT NULL,
    size BIGINT NOT NULL,
    world TEXT NOT NULL,
    public BOOLEAN NOT NULL,
    retryable BOOLEAN NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (tenant, name)
);
CREATE INDEX functions_by_digest ON functions (digest);

-- `seq` orders a function's records and is the logs' page cursor.
CREATE TABLE invocations (
    seq BIGSERIAL PRIMARY KEY,
    tenant TEXT NOT NULL,
    function TEXT NOT NULL,
    incarnation BIGINT NOT NULL,
    id TEXT NOT NULL,
    record JSONB NOT NULL,
    UNIQUE (tenant, id)
);
CREATE INDEX invocations_by_function ON invocations (tenant, function, incarnation, seq);

CREATE TABLE jobs (
    tenant TEXT NOT NULL,
    id TEXT NOT NULL,
    record JSONB NOT NULL,
    PRIMARY KEY (tenant, id)
);

CREATE TABLE schedules (
    tenant TEXT NOT NULL,
    function TEXT NOT NULL,
    record JSONB NOT NULL,
    PRIMARY KEY (tenant, function)
);

CREATE TABLE blobs (
    digest TEXT PRIMARY KEY,
    bytes BYTEA NOT NULL
);
