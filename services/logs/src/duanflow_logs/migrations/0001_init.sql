-- Log lines taken from the DUANFLOW_LOGS stream. (seq, ts_ms) identifies one stream message: a redelivered line is
-- stored once, and a recreated stream (sequences restarting at 1) does not collide with what is already stored.
CREATE TABLE lines (
    seq         bigint NOT NULL,
    ts_ms       bigint NOT NULL,
    env         text   NOT NULL,
    app         text   NOT NULL,
    kind        text   NOT NULL,
    source      text   NOT NULL,
    level       text   NOT NULL DEFAULT 'info',
    stream      text   NOT NULL DEFAULT '',
    release     text   NOT NULL DEFAULT '',
    function    text   NOT NULL DEFAULT '',
    replica     text   NOT NULL DEFAULT '',
    invocation  text   NOT NULL DEFAULT '',
    message     text   NOT NULL,
    stored_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (seq, ts_ms)
);

CREATE INDEX lines_app_ts ON lines (env, app, ts_ms, seq);
CREATE INDEX lines_app_kind_ts ON lines (env, app, kind, ts_ms, seq);
