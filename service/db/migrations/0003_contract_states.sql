-- 0003: the deployment states as the contract defines them (schemas/states.py:
-- DeploymentState, DeploymentAgentStatus). 0001 had an older, shorter list.
-- tests/test_contract.py compares every CHECK on a state column with schemas/.

ALTER TABLE deployments DROP CONSTRAINT deployments_status_valid;
ALTER TABLE deployments ADD CONSTRAINT deployments_status_valid
    CHECK (status IN ('PENDING', 'RUNNING', 'COMPLETED', 'ABORTED', 'ROLLING_BACK',
                      'ROLLED_BACK'));

-- SKIPPED: set by the server for an agent that was never started.
ALTER TABLE deployment_status DROP CONSTRAINT deployment_status_status_valid;
ALTER TABLE deployment_status ADD CONSTRAINT deployment_status_status_valid
    CHECK (status IN ('PENDING', 'IN_PROGRESS', 'SUCCESS', 'FAILED', 'ROLLBACK', 'SKIPPED'));

ALTER TABLE deployment_status_events DROP CONSTRAINT deployment_status_events_status_valid;
ALTER TABLE deployment_status_events ADD CONSTRAINT deployment_status_events_status_valid
    CHECK (status IN ('PENDING', 'IN_PROGRESS', 'SUCCESS', 'FAILED', 'ROLLBACK', 'SKIPPED'));
