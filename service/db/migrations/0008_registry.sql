-- 0008 registry: operator labels, and the one definition of an agent's state,
-- connected, stale and healthy that the CLI, the dashboards and the stale sweep read
-- (docs/agents.md, "Connected, stale, healthy"). State names: schemas.states.AgentListState.

-- Set by `agents revoke` (0007 adds it too; either may run first).
ALTER TABLE agents ADD COLUMN IF NOT EXISTS revoked_at timestamptz;

-- Operator labels (`agents label`), kept apart from the tags agents report: a
-- registration rewrites `tags`, never `labels`. Targeting by --tag matches either.
ALTER TABLE agents ADD COLUMN IF NOT EXISTS labels jsonb NOT NULL DEFAULT '{}'
    CONSTRAINT agents_labels_object CHECK (jsonb_typeof(labels) = 'object');
CREATE INDEX IF NOT EXISTS agents_labels_idx ON agents USING gin (labels jsonb_path_ops);
-- `agents list --version V` pages in agent_id order within one version.
CREATE INDEX IF NOT EXISTS agents_version_id_idx ON agents (agent_version, agent_id);

-- The rules, as SQL functions of an agents row. Each is a single expression, so the
-- planner inlines it into the caller's query (filters still use the indexes); all
-- use the database's clock (now()), never the reader's.

-- never_connected: known (provisioned, or seen) but no status message yet.
CREATE OR REPLACE FUNCTION agent_state(a agents) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN a.revoked_at IS NOT NULL THEN 'revoked'
        WHEN a.status = 'online' THEN 'online'
        WHEN a.status = 'offline' THEN 'offline'
        ELSE 'never_connected'
    END
$$;

-- Stale: the bridge's flag (stale sweep: "online" but silent for offline_after). It
-- counts only while the agent claims to be online and is not revoked.
CREATE OR REPLACE FUNCTION agent_stale(a agents) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT a.revoked_at IS NULL AND a.status = 'online' AND a.stale
$$;

-- Connected: online, not stale, not revoked.
CREATE OR REPLACE FUNCTION agent_connected(a agents) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT a.revoked_at IS NULL AND a.status = 'online' AND NOT a.stale
$$;

-- Healthy: connected, and a heartbeat AND a telemetry sample within `within`
-- (default 180 s: three missed 60-s heartbeats). Never null.
CREATE OR REPLACE FUNCTION agent_healthy(a agents, within interval DEFAULT interval '180 seconds')
RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT (agent_connected(a)
            AND a.last_heartbeat_at > now() - within
            AND a.last_telemetry_at > now() - within) IS TRUE
$$;

-- The same, as a view with the default window: what Grafana and ad-hoc SQL count.
CREATE OR REPLACE VIEW agent_health AS
SELECT a.agent_id, agent_state(a) AS state, agent_connected(a) AS connected,
       agent_stale(a) AS stale, agent_healthy(a) AS healthy
  FROM agents a;

-- `tasks list` pages newest first in (created_at, task_id) order (--after TASK_ID);
-- this index serves every page at any depth, and the time filters the old one served.
CREATE INDEX IF NOT EXISTS tasks_created_id_idx ON tasks (created_at DESC, task_id DESC);
DROP INDEX IF EXISTS tasks_created_idx;
