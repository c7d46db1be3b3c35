-- 0013 certificates: agents whose broker identity is an X.509 client certificate
-- (CN = agent_id, signed by the fleet's CA) instead of a password (docs/broker.md,
-- "Certificate identities"). Adding such an agent changes no file the brokers read:
-- the certificate listener trusts the CA, and refuses what the CRL lists.

-- The URL agents with a certificate are given (mqtts://, the broker's certificate
-- listener), no credentials; NULL: this broker has no certificate listener.
ALTER TABLE brokers ADD COLUMN IF NOT EXISTS cert_agent_url text UNIQUE;

-- An agent's current certificate: its serial (lowercase hex, as `openssl x509 -serial`
-- prints it, up to 160 bits) and expiry. NULL: no certificate identity (a password
-- one, or none). An agent has at most one identity: a password hash or a serial.
ALTER TABLE agents ADD COLUMN IF NOT EXISTS cert_serial text
    CONSTRAINT agents_cert_serial_hex CHECK (cert_serial ~ '^[0-9a-f]{1,40}$');
ALTER TABLE agents ADD COLUMN IF NOT EXISTS cert_not_after timestamptz;
ALTER TABLE agents ADD CONSTRAINT agents_one_identity
    CHECK (password_hash IS NULL OR cert_serial IS NULL);

-- Revoked certificates, what the CRL is rebuilt from. No foreign key to agents: a
-- deleted agent's certificate stays revoked until it expires (then the handshake
-- refuses it anyway, and the CRL leaves it out).
CREATE TABLE IF NOT EXISTS revoked_certificates (
    serial     text PRIMARY KEY CONSTRAINT revoked_certificates_serial_hex
                   CHECK (serial ~ '^[0-9a-f]{1,40}$'),
    agent_id   text NOT NULL,
    revoked_at timestamptz NOT NULL DEFAULT now(),
    not_after  timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS revoked_certificates_not_after_idx ON revoked_certificates (not_after);
