-- Images known to the builder, one row per (image id, backend).
CREATE TABLE images (
    image_id    text        NOT NULL,
    backend     text        NOT NULL,
    spec        jsonb       NOT NULL,
    status      text        NOT NULL CHECK (status IN ('building', 'built', 'failed')),
    artifact    text        NOT NULL DEFAULT '',
    log_tail    text        NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    duration_ms bigint      NOT NULL DEFAULT 0,
    PRIMARY KEY (image_id, backend)
);
