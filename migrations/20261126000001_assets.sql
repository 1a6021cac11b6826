-- Input assets: files a user uploads once and names in workflows as "asset://<id>". The bytes
-- live in the artifact store under storage_key (assets/<user_id>/<id>).
CREATE TABLE assets (
    id           uuid PRIMARY KEY,
    user_id      uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    filename     text NOT NULL CHECK (length(filename) BETWEEN 1 AND 255),
    content_type text NOT NULL CHECK (length(content_type) BETWEEN 1 AND 255),
    size         bigint NOT NULL CHECK (size >= 0),
    sha256       text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    storage_key  text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    -- Set by DELETE while a queued or running job still names the asset: it is gone for its
    -- owner, but agents can still fetch it until those jobs end and it is purged.
    deleted_at   timestamptz
);
-- One live asset per user and content: an upload of the same bytes answers the existing one.
CREATE UNIQUE INDEX assets_user_sha256_live_idx ON assets (user_id, sha256) WHERE deleted_at IS NULL;
CREATE INDEX assets_user_created_idx ON assets (user_id, created_at DESC, id DESC) WHERE deleted_at IS NULL;
CREATE INDEX assets_deleted_idx ON assets (deleted_at) WHERE deleted_at IS NOT NULL;

-- Output uploads an agent makes straight into an S3 store with a presigned PUT: what the
-- control plane promised, until the agent reports the upload complete.
CREATE TABLE output_uploads (
    id           uuid PRIMARY KEY,
    job_id       uuid NOT NULL REFERENCES job_requests (id) ON DELETE CASCADE,
    -- No foreign key: the persister may not have recorded the execution yet.
    execution_id uuid NOT NULL,
    node_id      text NOT NULL,
    filename     text NOT NULL CHECK (length(filename) BETWEEN 1 AND 255),
    content_type text NOT NULL,
    storage_key  text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX output_uploads_execution_idx ON output_uploads (execution_id);
