-- Index of the archive in S3: one row per gzip JSON-lines object holding the lines of one app and hour that aged
-- out of table lines (moved in one transaction with the upload: a line is in lines or in exactly one archive).
CREATE TABLE archives (
    env         text   NOT NULL,
    app         text   NOT NULL,
    hour_ms     bigint NOT NULL,
    key         text   NOT NULL,
    lines       integer NOT NULL,
    min_seq     bigint NOT NULL,
    max_seq     bigint NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (env, app, hour_ms, key)
);
