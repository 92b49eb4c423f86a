-- Secrets, sealed with AES-256-GCM by the router (key from DUANFLOW_ROUTER_SECRET_KEY). Only the names of the
-- env vars a secret sets are stored in clear; the values live only inside `ciphertext`.
CREATE TABLE secrets (
    env         text   NOT NULL,
    name        text   NOT NULL,
    keys        text[] NOT NULL DEFAULT '{}',
    key_id      text   NOT NULL,
    nonce       bytea  NOT NULL,
    ciphertext  bytea  NOT NULL,
    created_ms  bigint NOT NULL,
    updated_ms  bigint NOT NULL,
    PRIMARY KEY (env, name)
);
