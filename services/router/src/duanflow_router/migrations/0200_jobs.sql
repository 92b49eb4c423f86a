-- Long GPU jobs (@app.job): one row per run, queued → running → succeeded | failed | timed_out | cancelled.
CREATE TABLE jobs (
    job_id      text PRIMARY KEY,
    env         text NOT NULL,
    app         text NOT NULL,
    function    text NOT NULL,
    release_id  text NOT NULL,
    state       text NOT NULL,
    replica_id  text NOT NULL DEFAULT '',
    agent_id    text NOT NULL DEFAULT '',
    gpu_indices integer[] NOT NULL DEFAULT '{}',
    gpu_type    text NOT NULL DEFAULT '',
    timeout_s   double precision NOT NULL,
    grace_s     double precision NOT NULL DEFAULT 30,
    created_ms  bigint NOT NULL,
    started_ms  bigint NOT NULL DEFAULT 0,
    finished_ms bigint NOT NULL DEFAULT 0,
    error       text NOT NULL DEFAULT '',
    traceback   text NOT NULL DEFAULT '',
    message     text NOT NULL DEFAULT ''
);
CREATE INDEX jobs_newest ON jobs (env, app, created_ms DESC);
CREATE INDEX jobs_live ON jobs (created_ms) WHERE state IN ('queued', 'running');
