-- 0002 agents: ordering guards for registrations and inventories, and the stale sweep.
-- Documented in docs/agents.md.

-- The agent's own `ts` of the registration / inventory last applied: with several
-- bridges (shared subscriptions) an older message can be committed after a newer one,
-- and it must not roll the record back.
ALTER TABLE agents ADD COLUMN registration_ts timestamptz;
ALTER TABLE agents ADD COLUMN inventory_ts timestamptz;
-- When the stored software list last changed (not when it was last reported).
ALTER TABLE agents ADD COLUMN inventory_updated_at timestamptz;

-- The stale sweep looks only at agents that claim to be online and are not stale yet.
CREATE INDEX agents_online_last_seen_idx ON agents (last_seen)
    WHERE status = 'online' AND NOT stale;
