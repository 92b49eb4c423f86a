-- Router schema: apps, immutable releases (only the active flag changes), their functions, placed replicas.
CREATE TABLE apps (
    env         text NOT NULL,
    name        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (env, name)
);

CREATE TABLE releases (
    env           text NOT NULL,
    app           text NOT NULL,
    release_id    text NOT NULL,
    created_ms    bigint NOT NULL,
    bundle_key    text NOT NULL,
    bundle_digest text NOT NULL,
    image_id      text NOT NULL DEFAULT '',
    spec          bytea NOT NULL,          -- msgpack of the AppSpec (duanflow_proto.codec)
    active        boolean NOT NULL DEFAULT false,
    PRIMARY KEY (env, app, release_id),
    FOREIGN KEY (env, app) REFERENCES apps (env, name)
);
CREATE UNIQUE INDEX releases_one_active ON releases (env, app) WHERE active;
CREATE INDEX releases_newest ON releases (env, app, created_ms DESC);

CREATE TABLE functions (
    env         text NOT NULL,
    app         text NOT NULL,
    release_id  text NOT NULL,
    name        text NOT NULL,
    kind        text NOT NULL,
    subject     text NOT NULL,
    consumer    text NOT NULL,
    spec        bytea NOT NULL,            -- msgpack of the FunctionSpec
    PRIMARY KEY (env, app, release_id, name),
    FOREIGN KEY (env, app, release_id) REFERENCES releases (env, app, release_id)
);

CREATE TABLE replicas (
    replica_id  text PRIMARY KEY,
    env         text NOT NULL,
    app         text NOT NULL,
    release_id  text NOT NULL,
    function    text NOT NULL,
    agent_id    text NOT NULL,
    gpu_indices integer[] NOT NULL DEFAULT '{}',
    state       text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX replicas_running ON replicas (env, app) WHERE state IN ('starting', 'running');
