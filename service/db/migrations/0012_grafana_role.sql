-- The read-only role Grafana connects as (docs/storage.md, "Grafana's role").
--
-- `eucora_grafana` may SELECT what the provisioned dashboards read, and nothing else:
-- not the agents table itself (password hashes live there; the dashboards read the
-- agent_health view, which runs with its owner's rights), no INSERT, UPDATE, DELETE,
-- and no CREATE in the schema. The role is created NOLOGIN here; `eucora stack up` (or
-- an administrator: ALTER ROLE eucora_grafana LOGIN PASSWORD '...') gives it a login
-- with a password that never is in the repository. Roles belong to the whole server:
-- a second database on it reuses the role and gets its own grants. An account that
-- may not create roles (a hosted database) gets the grants only if the role exists.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'eucora_grafana') THEN
        BEGIN
            CREATE ROLE eucora_grafana NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT;
        EXCEPTION
            WHEN duplicate_object OR unique_violation THEN NULL;  -- made meanwhile
            WHEN insufficient_privilege THEN
                RAISE NOTICE 'cannot create role eucora_grafana: create it as an administrator, then run eucora db upgrade again';
        END;
    END IF;
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'eucora_grafana') THEN
        GRANT USAGE ON SCHEMA public TO eucora_grafana;
        GRANT SELECT ON agent_health, telemetry, telemetry_1m, dead_letters, tasks,
            agent_status_events, deployments, deployment_status, deployment_status_events
            TO eucora_grafana;
    END IF;
END
$$;
