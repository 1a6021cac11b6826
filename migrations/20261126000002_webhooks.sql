-- Webhooks (CONTRACT.md "Webhooks"): a signing secret per user and a durable outbox of
-- deliveries. Deliveries are created by triggers in the transaction that changes the job, so
-- every path that finishes a job (persister, reaper, cancel, reconciler) yields exactly one
-- delivery, and a crash can lose none.

CREATE TABLE webhook_secrets (
    user_id             uuid PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    -- `whsec_` + base64 of 32 random bytes. Kept in clear: it must be usable to sign.
    secret              text NOT NULL,
    -- The secret before the latest rotation, still signed with until previous_expires_at.
    previous_secret     text,
    previous_expires_at timestamptz,
    rotated_at          timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE webhook_deliveries (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    job_id           uuid NOT NULL REFERENCES job_requests (id) ON DELETE CASCADE,
    -- What the delivery is of, unique so that re-applying a change creates nothing:
    -- 'finished:<job id>' for the terminal status, 'event:<job_events.event_id>' otherwise.
    event_key        text NOT NULL UNIQUE,
    -- The payload's `type`: job.completed, job.failed, job.cancelled, job.claimed, job.progress.
    event_type       text NOT NULL,
    url              text NOT NULL,
    -- The payload's `timestamp`.
    occurred_at      timestamptz NOT NULL,
    -- The event's own data (progress), laid over the job object.
    event_data       jsonb,
    -- The exact bytes POSTed, fixed at the first try so every retry sends the same body.
    body             text,
    status           text NOT NULL DEFAULT 'PENDING' CHECK (status IN ('PENDING', 'DELIVERED', 'FAILED')),
    -- Tries in all, and tries since the delivery was (re)queued (the retry schedule's position).
    attempts         integer NOT NULL DEFAULT 0,
    round_attempts   integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    -- The sender replica holding the delivery while it sends, and until when.
    lease_owner      text,
    lease_until      timestamptz,
    last_status_code integer,
    last_error       text,
    delivered_at     timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_deliveries_due_idx ON webhook_deliveries (next_attempt_at) WHERE status = 'PENDING';
CREATE INDEX webhook_deliveries_job_idx ON webhook_deliveries (job_id, occurred_at, id);

-- One row per try.
CREATE TABLE webhook_delivery_attempts (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id  uuid NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempt      integer NOT NULL,
    sent_at      timestamptz NOT NULL,
    duration_ms  integer NOT NULL,
    status_code  integer,
    error        text
);
CREATE INDEX webhook_delivery_attempts_delivery_idx ON webhook_delivery_attempts (delivery_id, id);

-- A job reaching COMPLETED, FAILED or CANCELLED: one delivery (terminal rows never move again,
-- and the unique event_key makes a second transition a no-op anyway).
CREATE FUNCTION webhook_job_finished() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO webhook_deliveries (job_id, event_key, event_type, url, occurred_at)
    VALUES (NEW.id, 'finished:' || NEW.id, 'job.' || lower(NEW.status::text), NEW.webhook_url,
            COALESCE(NEW.completed_at, NEW.failed_at, NEW.cancelled_at, now()))
    ON CONFLICT (event_key) DO NOTHING;
    RETURN NULL;
END $$;

CREATE TRIGGER job_requests_webhook_finished
    AFTER UPDATE OF status ON job_requests
    FOR EACH ROW
    WHEN (NEW.webhook_url IS NOT NULL
          AND NEW.status IN ('COMPLETED', 'FAILED', 'CANCELLED')
          AND OLD.status NOT IN ('COMPLETED', 'FAILED', 'CANCELLED'))
    EXECUTE FUNCTION webhook_job_finished();

-- A recorded claim of a job that asked for `job.claimed`: one delivery per event (job_events'
-- unique event_id means an event is inserted once).
CREATE FUNCTION webhook_job_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO webhook_deliveries (job_id, event_key, event_type, url, occurred_at, event_data)
    SELECT j.id, 'event:' || NEW.event_id, NEW.event_type, j.webhook_url, NEW.occurred_at, NEW.payload
    FROM job_requests j
    WHERE j.id = NEW.job_id AND j.webhook_url IS NOT NULL AND NEW.event_type = ANY (j.webhook_events)
    ON CONFLICT (event_key) DO NOTHING;
    RETURN NULL;
END $$;

CREATE TRIGGER job_events_webhook
    AFTER INSERT ON job_events
    FOR EACH ROW
    WHEN (NEW.event_type = 'job.claimed' AND NEW.job_id IS NOT NULL)
    EXECUTE FUNCTION webhook_job_event();
