-- 0009 offline buffer: what an agent's bounded offline telemetry buffer holds and has
-- dropped (full, or past its age bound), as its heartbeats last said
-- (`buffered_samples`, `dropped_samples`; docs/agents.md, "Offline buffer"). NULL until
-- an agent that counts reports it.
ALTER TABLE agents
    ADD COLUMN buffered_samples bigint
        CONSTRAINT agents_buffered_samples_nonneg CHECK (buffered_samples >= 0),
    ADD COLUMN dropped_samples bigint
        CONSTRAINT agents_dropped_samples_nonneg CHECK (dropped_samples >= 0);
