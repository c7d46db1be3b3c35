-- 0001 initial schema, common to plain PostgreSQL and TimescaleDB.
-- Time-series tables are created as ordinary tables here; 0001_initial.timescale.sql
-- turns them into hypertables, 0001_initial.plain.sql adds what plain PostgreSQL needs.
-- Documented for Grafana users in docs/storage.md.

-- Agents ---------------------------------------------------------------------------

CREATE TABLE agents (
    agent_id          text PRIMARY KEY
                      CONSTRAINT agents_agent_id_format
                      CHECK (agent_id ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'),
    hostname          text,
    platform          text CONSTRAINT agents_platform_valid
                      CHECK (platform IN ('windows', 'macos', 'linux')),
    os_version        text,
    agent_version     text,
    hardware          jsonb NOT NULL DEFAULT '{}',
    -- As reported: text, so an unusual address (IPv6 zone id...) never loses a registration.
    ip_address        text,
    mac_address       text,
    tags              jsonb NOT NULL DEFAULT '{}'
                      CONSTRAINT agents_tags_object CHECK (jsonb_typeof(tags) = 'object'),
    first_seen        timestamptz NOT NULL DEFAULT now(),
    registered_at     timestamptz,
    last_seen         timestamptz,
    -- "Connected": the retained status topic, epoch-ordered.
    status            text NOT NULL DEFAULT 'unknown'
                      CONSTRAINT agents_status_valid
                      CHECK (status IN ('online', 'offline', 'unknown')),
    status_epoch      bigint,
    status_changed_at timestamptz,
    status_reason     text,
    session_present   boolean,
    -- "Healthy": recent heartbeat and telemetry, judged against these at read time.
    last_heartbeat_at timestamptz,
    last_telemetry_at timestamptz,
    -- Set by the bridge when status is online but nothing arrived for offline_after.
    stale             boolean NOT NULL DEFAULT false,
    updated_at        timestamptz NOT NULL DEFAULT now()
);
-- Targeting by tag: WHERE tags @> '{"site": "paris"}'.
CREATE INDEX agents_tags_idx ON agents USING gin (tags jsonb_path_ops);
CREATE INDEX agents_platform_idx ON agents (platform);

CREATE TABLE agent_changes (
    time      timestamptz NOT NULL DEFAULT now(),
    agent_id  text NOT NULL REFERENCES agents ON DELETE CASCADE,
    field     text NOT NULL,
    old_value jsonb,
    new_value jsonb
);
CREATE INDEX agent_changes_agent_time_idx ON agent_changes (agent_id, time DESC);

CREATE TABLE agent_status_events (
    time     timestamptz NOT NULL,
    agent_id text NOT NULL,
    state    text NOT NULL CONSTRAINT agent_status_events_state_valid
             CHECK (state IN ('online', 'offline', 'stale')),
    epoch    bigint,
    reason   text,
    -- e.g. 'agent', 'last_will', 'bridge' (stale detection)
    source   text NOT NULL,
    session_present boolean,
    -- false: recorded but ignored (an offline older than the current online epoch)
    accepted boolean NOT NULL DEFAULT true
);
CREATE INDEX agent_status_events_agent_time_idx ON agent_status_events (agent_id, time DESC);

-- Telemetry: the high-volume table. Only the key's index, for COPY speed; the key makes
-- a redelivered sample a no-op with INSERT ... ON CONFLICT DO NOTHING.
CREATE TABLE telemetry (
    time           timestamptz NOT NULL,
    agent_id       text NOT NULL,
    cpu_percent    double precision,
    memory_percent double precision,
    disk_percent   double precision,
    net_rx_bytes   bigint,
    net_tx_bytes   bigint,
    correlation_id text,
    received_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT telemetry_pkey PRIMARY KEY (agent_id, time)
);

-- Inventory ------------------------------------------------------------------------

CREATE TABLE inventory (
    agent_id   text NOT NULL REFERENCES agents ON DELETE CASCADE,
    name       text NOT NULL,
    version    text,
    publisher  text,
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT inventory_pkey PRIMARY KEY (agent_id, name)
);
-- Fleet questions: which agents run software X (at version Y)?
CREATE INDEX inventory_name_version_idx ON inventory (name, version);

CREATE TABLE inventory_changes (
    time        timestamptz NOT NULL DEFAULT now(),
    agent_id    text NOT NULL REFERENCES agents ON DELETE CASCADE,
    name        text NOT NULL,
    change      text NOT NULL CONSTRAINT inventory_changes_change_valid
                CHECK (change IN ('added', 'removed', 'changed')),
    old_version text,
    new_version text,
    publisher   text
);
CREATE INDEX inventory_changes_agent_time_idx ON inventory_changes (agent_id, time DESC);
CREATE INDEX inventory_changes_time_idx ON inventory_changes (time DESC);

-- Deployments (before tasks, which reference them) ---------------------------------

CREATE TABLE deployments (
    deployment_id       uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    payload             jsonb NOT NULL DEFAULT '{}',
    -- the selector, e.g. {"tags": {"site": "paris"}} or {"platform": "linux"}
    target              jsonb NOT NULL,
    rate_per_minute     integer CONSTRAINT deployments_rate_positive CHECK (rate_per_minute > 0),
    max_in_flight       integer CONSTRAINT deployments_max_in_flight_positive
                        CHECK (max_in_flight > 0),
    abort_after_count   integer CONSTRAINT deployments_abort_count_positive
                        CHECK (abort_after_count > 0),
    abort_after_percent double precision CONSTRAINT deployments_abort_percent_range
                        CHECK (abort_after_percent > 0 AND abort_after_percent <= 100),
    status              text NOT NULL DEFAULT 'PENDING'
                        CONSTRAINT deployments_status_valid
                        CHECK (status IN ('PENDING', 'RUNNING', 'COMPLETED', 'ABORTED')),
    status_reason       text,
    correlation_id      text NOT NULL DEFAULT gen_random_uuid()::text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    started_at          timestamptz,
    finished_at         timestamptz
);
CREATE INDEX deployments_created_idx ON deployments (created_at DESC);

CREATE TABLE deployment_status (
    deployment_id uuid NOT NULL REFERENCES deployments ON DELETE CASCADE,
    agent_id      text NOT NULL REFERENCES agents ON DELETE CASCADE,
    status        text NOT NULL CONSTRAINT deployment_status_status_valid
                  CHECK (status IN ('PENDING', 'IN_PROGRESS', 'SUCCESS', 'FAILED', 'ROLLBACK')),
    progress      smallint NOT NULL DEFAULT 0
                  CONSTRAINT deployment_status_progress_range CHECK (progress BETWEEN 0 AND 100),
    message       text,
    task_id       uuid,
    reported_at   timestamptz,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT deployment_status_pkey PRIMARY KEY (deployment_id, agent_id)
);
CREATE INDEX deployment_status_agent_idx ON deployment_status (agent_id);

CREATE TABLE deployment_status_events (
    time          timestamptz NOT NULL,
    deployment_id uuid NOT NULL,
    agent_id      text NOT NULL,
    status        text NOT NULL CONSTRAINT deployment_status_events_status_valid
                  CHECK (status IN ('PENDING', 'IN_PROGRESS', 'SUCCESS', 'FAILED', 'ROLLBACK')),
    progress      smallint,
    message       text,
    accepted      boolean NOT NULL DEFAULT true,
    reason        text
);
CREATE INDEX deployment_status_events_deployment_time_idx
    ON deployment_status_events (deployment_id, time DESC);

-- Tasks -----------------------------------------------------------------------------

CREATE TABLE tasks (
    task_id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    agent_id         text NOT NULL REFERENCES agents,
    type             text NOT NULL CONSTRAINT tasks_type_valid
                     CHECK (type IN ('DEPLOY', 'REMEDIATE', 'COLLECT', 'UPDATE', 'HEALTHCHECK')),
    payload          jsonb NOT NULL DEFAULT '{}'
                     CONSTRAINT tasks_payload_object CHECK (jsonb_typeof(payload) = 'object'),
    status           text NOT NULL DEFAULT 'PENDING' CONSTRAINT tasks_status_valid
                     CHECK (status IN ('PENDING', 'ASSIGNED', 'IN_PROGRESS', 'COMPLETED', 'FAILED',
                                       'REJECTED', 'TIMEOUT', 'EXPIRED', 'CANCELLED')),
    progress         smallint CONSTRAINT tasks_progress_range CHECK (progress BETWEEN 0 AND 100),
    result           jsonb,
    error            text,
    timeout_seconds  integer NOT NULL DEFAULT 3600
                     CONSTRAINT tasks_timeout_positive CHECK (timeout_seconds > 0),
    expires_at       timestamptz,
    correlation_id   text NOT NULL DEFAULT gen_random_uuid()::text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    published_at     timestamptz,
    assigned_at      timestamptz,
    started_at       timestamptz,
    finished_at      timestamptz,
    attempts         integer NOT NULL DEFAULT 0 CONSTRAINT tasks_attempts_nonnegative
                     CHECK (attempts >= 0),
    -- Transactional outbox: non-NULL = a message (the task, or its cancel when
    -- cancel_requested) is owed to the agent from this time on. The bridge claims rows
    -- with FOR UPDATE SKIP LOCKED, publishes, then sets it back to NULL.
    next_publish_at  timestamptz DEFAULT now(),
    deployment_id    uuid REFERENCES deployments ON DELETE SET NULL,
    cancel_requested boolean NOT NULL DEFAULT false,
    created_by       text
);
-- Small partial index: only rows waiting to be published, so the outbox poll is cheap.
CREATE INDEX tasks_outbox_idx ON tasks (next_publish_at) WHERE next_publish_at IS NOT NULL;
-- Unfinished tasks: what is owed to an agent on reconnect, expiry and timeout sweeps.
CREATE INDEX tasks_open_idx ON tasks (agent_id)
    WHERE status IN ('PENDING', 'ASSIGNED', 'IN_PROGRESS');
CREATE INDEX tasks_agent_created_idx ON tasks (agent_id, created_at DESC);
CREATE INDEX tasks_created_idx ON tasks (created_at DESC);
CREATE INDEX tasks_deployment_idx ON tasks (deployment_id, status) WHERE deployment_id IS NOT NULL;

CREATE TABLE task_events (
    time            timestamptz NOT NULL,
    task_id         uuid NOT NULL,
    agent_id        text NOT NULL,
    -- the status reported or set; previous_status what the task had before
    status          text NOT NULL,
    previous_status text,
    source          text NOT NULL CONSTRAINT task_events_source_valid
                    CHECK (source IN ('agent', 'server', 'operator')),
    correlation_id  text,
    progress        smallint,
    detail          jsonb,
    -- false: recorded but changed nothing (duplicate, out of order, illegal); see reason
    accepted        boolean NOT NULL DEFAULT true,
    reason          text
);
CREATE INDEX task_events_task_time_idx ON task_events (task_id, time);

-- Dead letters and security ------------------------------------------------------------

CREATE TABLE dead_letters (
    id           bigint GENERATED BY DEFAULT AS IDENTITY,
    time         timestamptz NOT NULL DEFAULT now(),
    topic        text NOT NULL,
    agent_id     text,
    kind         text,
    reason       text NOT NULL,
    detail       text,
    -- bounded copy: the first 4 KiB; payload_size is the size received
    payload      bytea CONSTRAINT dead_letters_payload_bounded CHECK (octet_length(payload) <= 4096),
    payload_size integer NOT NULL CONSTRAINT dead_letters_size_nonnegative CHECK (payload_size >= 0),
    -- includes time: a hypertable's unique keys must
    CONSTRAINT dead_letters_pkey PRIMARY KEY (id, time)
);
CREATE INDEX dead_letters_agent_time_idx ON dead_letters (agent_id, time DESC)
    WHERE agent_id IS NOT NULL;

CREATE TABLE security_events (
    time     timestamptz NOT NULL DEFAULT now(),
    agent_id text,
    -- e.g. 'identity_mismatch', 're_registration', 'credentials_revoked'
    event    text NOT NULL,
    detail   jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX security_events_agent_time_idx ON security_events (agent_id, time DESC);
