-- 0009 telemetry_dropped: what an agent's offline buffer had to drop (full, or samples
-- past its age bound), as the agent reports it in its registration (docs/agents.md,
-- "Offline buffer"); NULL until an agent that counts reports it.
ALTER TABLE agents ADD COLUMN telemetry_dropped bigint
    CONSTRAINT agents_telemetry_dropped_nonneg CHECK (telemetry_dropped >= 0);
