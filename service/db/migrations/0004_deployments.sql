-- 0004 deployments: what the rollout engine needs (docs/deployments.md).

-- The change-approval record a deployment implements, who created it, when the
-- percent threshold starts to apply, when the next agent may start (the rate, kept
-- here so a restarted or another bridge goes on at the same pace), and the DEPLOY
-- tasks' delivery deadline.
ALTER TABLE deployments ADD COLUMN intent_id text;
ALTER TABLE deployments ADD COLUMN created_by text;
ALTER TABLE deployments ADD COLUMN abort_min_finished integer NOT NULL DEFAULT 20
    CONSTRAINT deployments_abort_min_finished_positive CHECK (abort_min_finished > 0);
ALTER TABLE deployments ADD COLUMN next_start_at timestamptz;
ALTER TABLE deployments ADD COLUMN expires_in_s integer NOT NULL DEFAULT 604800
    CONSTRAINT deployments_expires_in_positive CHECK (expires_in_s > 0);
ALTER TABLE deployments ADD COLUMN targets integer NOT NULL DEFAULT 0;
CREATE INDEX deployments_active_idx ON deployments (status)
    WHERE status IN ('PENDING', 'RUNNING', 'ROLLING_BACK');
CREATE INDEX deployments_intent_idx ON deployments (intent_id) WHERE intent_id IS NOT NULL;

-- Per target: when its DEPLOY task was created (NULL: not started yet), when it
-- finished, whether its outcome counts as a failure, and its rollback task.
ALTER TABLE deployment_status ADD COLUMN started_at timestamptz;
ALTER TABLE deployment_status ADD COLUMN finished_at timestamptz;
ALTER TABLE deployment_status ADD COLUMN failed boolean NOT NULL DEFAULT false;
ALTER TABLE deployment_status ADD COLUMN rollback_task_id uuid;
ALTER TABLE deployment_status ADD COLUMN reason text;
CREATE INDEX deployment_status_open_idx ON deployment_status (deployment_id, status)
    WHERE finished_at IS NULL;

-- History rows: who set the state (agent report, server, operator) and the task.
ALTER TABLE deployment_status_events ADD COLUMN source text NOT NULL DEFAULT 'agent'
    CONSTRAINT deployment_status_events_source_valid
    CHECK (source IN ('agent', 'server', 'operator'));
ALTER TABLE deployment_status_events ADD COLUMN previous_status text;
ALTER TABLE deployment_status_events ADD COLUMN agent_ts timestamptz;

-- A deployment sends each target one DEPLOY task, and one rollback task at most.
CREATE UNIQUE INDEX tasks_one_deploy_per_target
    ON tasks (deployment_id, agent_id, ((payload->>'rollback') IS NOT NULL))
    WHERE deployment_id IS NOT NULL;
