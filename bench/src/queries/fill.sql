-- The data of `emp-bench queries`, generated inside PostgreSQL (set-based, no row leaves the
-- server). fill.rs runs the steps below in order, each `-- step: NAME` block as one simple
-- query, on one connection (the job plan is a TEMP table), after it has created the `bench`
-- schema and written the sizes to `bench.params`. Everything is relative to `as_of`, the
-- fill's "now", so that a reused database is measured against the time it was filled for.
--
-- Sizes come from bench.params (users, machines, templates, jobs, exec_extra). The session
-- calls setseed() first, so two fills for the same as_of are the same data.

-- step: helpers
-- UUIDv7 for a timestamp: 48 bits of Unix milliseconds, version 7, 12 random bits, the
-- variant, 62 random bits. Made of random() rather than gen_random_uuid(): the ids must be
-- unique, not unguessable, and this is twice as fast (and follows setseed).
CREATE FUNCTION bench.uuid7(at timestamptz) RETURNS uuid LANGUAGE sql VOLATILE AS $$
    SELECT (lpad(to_hex((floor(date_part('epoch', at) * 1000)::bigint << 16)
                        | 28672 -- 0x7000: the version
                        | floor(random() * 4096)::bigint), 16, '0')
            || to_hex(-9223372036854775808 -- the variant bits 10, as the sign of a bigint
                      | (floor(random() * 2147483648)::bigint << 31)
                      | floor(random() * 2147483648)::bigint))::uuid
$$;

-- A txt2img graph in ComfyUI's API format (SDXL-style, seven nodes).
CREATE FUNCTION bench.workflow(prompt text, seed bigint, ckpt text, side int, steps int)
RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object(
        '3', jsonb_build_object('class_type', 'KSampler', 'inputs', jsonb_build_object(
            'seed', seed, 'steps', steps, 'cfg', 7, 'sampler_name', 'euler', 'scheduler', 'normal',
            'denoise', 1, 'model', jsonb_build_array('4', 0), 'positive', jsonb_build_array('6', 0),
            'negative', jsonb_build_array('7', 0), 'latent_image', jsonb_build_array('5', 0))),
        '4', jsonb_build_object('class_type', 'CheckpointLoaderSimple',
            'inputs', jsonb_build_object('ckpt_name', ckpt)),
        '5', jsonb_build_object('class_type', 'EmptyLatentImage',
            'inputs', jsonb_build_object('width', side, 'height', side, 'batch_size', 1)),
        '6', jsonb_build_object('class_type', 'CLIPTextEncode',
            'inputs', jsonb_build_object('text', prompt, 'clip', jsonb_build_array('4', 1))),
        '7', jsonb_build_object('class_type', 'CLIPTextEncode',
            'inputs', jsonb_build_object('text', 'blurry, low quality, watermark, text',
                                         'clip', jsonb_build_array('4', 1))),
        '8', jsonb_build_object('class_type', 'VAEDecode',
            'inputs', jsonb_build_object('samples', jsonb_build_array('3', 0), 'vae', jsonb_build_array('4', 2))),
        '9', jsonb_build_object('class_type', 'SaveImage',
            'inputs', jsonb_build_object('filename_prefix', 'emp', 'images', jsonb_build_array('8', 0))))
$$;

-- step: users
-- A few admins (the first 0.5 %), about 1 % deleted; all created before the jobs' 90 days.
CREATE TABLE bench.users (n int PRIMARY KEY, id uuid NOT NULL, created_at timestamptz NOT NULL, deleted boolean NOT NULL);
INSERT INTO bench.users (n, id, created_at, deleted)
SELECT n, bench.uuid7(created_at), created_at, n > admins AND n % 97 = 0
FROM (SELECT n, greatest(1, p.users / 200) AS admins,
             p.as_of - interval '90 days' - interval '300 days' * random() AS created_at
      FROM bench.params p, generate_series(1, p.users) n) s;

INSERT INTO users (id, email, name, role, created_at, updated_at, deleted_at)
SELECT u.id, 'user' || u.n || '@bench.emp.dev', 'Bench User ' || u.n,
       CASE WHEN u.n <= greatest(1, p.users / 200) THEN 'admin' ELSE 'user' END::user_role,
       u.created_at, u.created_at,
       CASE WHEN u.deleted THEN p.as_of - interval '7 days' END
FROM bench.users u, bench.params p
ORDER BY u.n;

-- step: api_keys
-- One to five keys a user, about 15 % revoked (and all of a deleted user's). The plaintext is
-- kept in bench.api_keys so that `validate` can be measured; emp itself stores only the hash.
CREATE TABLE bench.api_keys (id uuid PRIMARY KEY, plaintext text NOT NULL);
WITH k AS (
    SELECT bench.uuid7(created_at) AS id, user_id, k, deleted, plaintext, created_at, r_revoked, r_used
    FROM (SELECT u.id AS user_id, k, u.deleted,
                 'emp_' || encode(sha256(convert_to('bench-key-' || u.n || '-' || k, 'UTF8')), 'hex') AS plaintext,
                 p.as_of - (p.as_of - u.created_at) * random() AS created_at,
                 random() AS r_revoked, random() AS r_used
          FROM bench.users u, bench.params p,
               generate_series(1, 1 + (hashint4(u.n) & 2147483647) % 5) k) s
), ins AS (
    INSERT INTO api_keys (id, name, key_hash, user_id, is_active, created_at, last_used, revoked_at)
    SELECT k.id, (ARRAY['ci', 'laptop', 'batch worker', 'staging', 'prod'])[k.k] || ' key',
           encode(sha256(convert_to(k.plaintext, 'UTF8')), 'hex'), k.user_id,
           NOT (k.deleted OR k.r_revoked < 0.15), k.created_at,
           CASE WHEN k.r_used < 0.7 THEN k.created_at + (p.as_of - k.created_at) * (k.r_used / 0.7) END,
           CASE WHEN k.deleted OR k.r_revoked < 0.15 THEN k.created_at + (p.as_of - k.created_at) * k.r_revoked END
    FROM k, bench.params p
    ORDER BY k.created_at
)
INSERT INTO bench.api_keys (id, plaintext) SELECT id, plaintext FROM k;

-- step: machines
-- Status mix of a live fleet; live boxes beat within the last 20 minutes, OFFLINE and
-- TERMINATED ones long ago. `busy_n` numbers the BUSY boxes, which run the PROCESSING jobs.
CREATE TABLE bench.machines (n int PRIMARY KEY, id uuid NOT NULL, busy_n int UNIQUE);
CREATE TEMP TABLE machine_plan AS
SELECT n, id, status, provider, region, registered_at, last_heartbeat, gpu, gpu_count, r_models,
       CASE WHEN status = 'TERMINATED' THEN last_heartbeat + interval '5 minutes' END AS terminated_at
FROM (
    SELECT n, bench.uuid7(registered_at) AS id, status, provider, registered_at, gpu, gpu_count, r_models,
           CASE provider
               WHEN 'salad' THEN (ARRAY['us-east', 'us-west', 'us-central', 'eu-west', 'eu-central', 'ap-southeast'])[1 + (n % 6)]
               WHEN 'vastai' THEN (ARRAY['US', 'CA', 'DE', 'NL', 'JP', 'KR', 'BR'])[1 + (n % 7)]
               ELSE 'unknown' END AS region,
           CASE WHEN status IN ('OFFLINE', 'TERMINATED')
                THEN as_of - interval '10 minutes' - interval '20 days' * r_beat
                WHEN status = 'STARTING' THEN as_of - interval '2 minutes' * r_beat
                ELSE as_of - interval '20 minutes' * r_beat END AS last_heartbeat
    FROM (
        SELECT n, p.as_of, random() AS r_beat, random() AS r_models,
               p.as_of - interval '90 days' - interval '60 days' * random() AS registered_at,
               CASE WHEN r_status < 0.35 THEN 'AVAILABLE' WHEN r_status < 0.80 THEN 'BUSY'
                    WHEN r_status < 0.85 THEN 'DRAINING' WHEN r_status < 0.88 THEN 'STARTING'
                    WHEN r_status < 0.95 THEN 'OFFLINE' ELSE 'TERMINATED' END::machine_status AS status,
               CASE WHEN r_provider < 0.70 THEN 'salad' WHEN r_provider < 0.95 THEN 'vastai' ELSE 'local' END AS provider,
               CASE WHEN r_gpu < 0.35 THEN 1 WHEN r_gpu < 0.55 THEN 2 WHEN r_gpu < 0.67 THEN 3
                    WHEN r_gpu < 0.77 THEN 4 WHEN r_gpu < 0.85 THEN 5 WHEN r_gpu < 0.93 THEN 6
                    WHEN r_gpu < 0.98 THEN 7 ELSE 8 END AS gpu,
               CASE WHEN r_count < 0.90 THEN 1 WHEN r_count < 0.97 THEN 2 WHEN r_count < 0.99 THEN 4 ELSE 8 END AS gpu_count
        FROM (SELECT n, random() AS r_status, random() AS r_provider, random() AS r_gpu, random() AS r_count
              FROM bench.params p, generate_series(1, p.machines) n) r, bench.params p
    ) s
) t;

INSERT INTO machines (id, external_id, provider, region, capabilities, status, last_heartbeat,
                      registered_at, terminated_at, updated_at)
SELECT m.id,
       CASE m.provider WHEN 'salad' THEN md5('salad-' || m.n)::uuid::text
                       WHEN 'vastai' THEN 'C.' || (10000000 + m.n)
                       ELSE 'local-' || m.n END,
       m.provider, m.region,
       jsonb_build_object(
           'machine_id', CASE m.provider WHEN 'salad' THEN md5('salad-' || m.n)::uuid::text
                                         WHEN 'vastai' THEN 'C.' || (10000000 + m.n)
                                         ELSE 'local-' || m.n END,
           'provider', m.provider, 'region', m.region,
           'agent_version', (ARRAY['0.4.2', '0.5.0', '0.5.1'])[1 + m.n % 3],
           'gpus', (SELECT jsonb_agg(jsonb_build_object(
                        'index', i, 'uuid', 'GPU-' || md5(m.n || '/' || i)::uuid, 'name', g.name,
                        'memory_total_mb', g.mem, 'memory_free_mb', g.mem - 600 - (m.n * 37 + i) % 2000,
                        'compute_capability', g.cc, 'driver_version', '550.54.15', 'cuda_version', '12.4',
                        'pcie_gen', 4, 'pcie_width', 16, 'temperature_c', 35 + (m.n + i) % 40,
                        'power_limit_w', g.watts, 'mig_enabled', false) ORDER BY i)
                    FROM generate_series(0, m.gpu_count - 1) i),
           'gpu_count', m.gpu_count,
           'total_vram_gb', round(m.gpu_count * g.mem / 1024.0, 1),
           'cpu', jsonb_build_object('model', (ARRAY['AMD EPYC 7B13', 'AMD Ryzen 9 7950X', 'Intel(R) Xeon(R) Gold 6338', 'Intel(R) Core(TM) i9-13900K'])[1 + m.n % 4],
                                     'cores', (ARRAY[16, 32, 64, 24])[1 + m.n % 4]),
           'memory_total_mb', (ARRAY[32768, 65536, 131072, 262144])[1 + m.n % 4],
           'disk_free_gb', round((50 + (m.n * 7919) % 900)::numeric, 1),
           'comfyui', jsonb_build_object(
               'url', 'http://127.0.0.1:8188', 'reachable', m.status NOT IN ('OFFLINE', 'TERMINATED'),
               'version', '0.3.' || (20 + m.n % 10), 'node_types_count', 600 + m.n % 900,
               'models', jsonb_build_object(
                   'checkpoints', (SELECT jsonb_agg(c ORDER BY c) FROM unnest(ARRAY[
                        'sd_xl_base_1.0.safetensors', 'sd_xl_refiner_1.0.safetensors', 'juggernautXL_v9.safetensors',
                        'dreamshaperXL_lightning.safetensors', 'flux1-dev-fp8.safetensors', 'sd3.5_medium.safetensors',
                        'realvisxlV40.safetensors', 'v1-5-pruned-emaonly.safetensors']) WITH ORDINALITY a(c, o)
                        WHERE o = 1 OR (floor(m.r_models * 256)::int >> (o::int - 2)) & 1 = 1),
                   'loras', (SELECT coalesce(jsonb_agg('sdxl/' || l ORDER BY l), '[]') FROM unnest(ARRAY[
                        'detail_tweaker.safetensors', 'add_more_details.safetensors', 'pixel_art.safetensors',
                        'watercolor.safetensors', 'film_grain.safetensors', 'lcm_lora_sdxl.safetensors']) WITH ORDINALITY a(l, o)
                        WHERE (floor(m.r_models * 4096)::int >> (o::int + 4)) & 1 = 1),
                   'vae', jsonb_build_array('sdxl_vae.safetensors'),
                   'upscale_models', jsonb_build_array('4x-UltraSharp.pth', 'RealESRGAN_x4plus.pth')))),
       m.status, m.last_heartbeat, m.registered_at, m.terminated_at, m.last_heartbeat
FROM machine_plan m
JOIN (VALUES (1, 'NVIDIA GeForce RTX 4090', 24564, '8.9', 450), (2, 'NVIDIA GeForce RTX 3090', 24576, '8.6', 350),
             (3, 'NVIDIA GeForce RTX 4080', 16376, '8.9', 320), (4, 'NVIDIA GeForce RTX 3060', 12288, '8.6', 170),
             (5, 'NVIDIA RTX A5000', 24564, '8.6', 230), (6, 'NVIDIA L40S', 46068, '8.9', 350),
             (7, 'NVIDIA A100-SXM4-80GB', 81920, '8.0', 400), (8, 'NVIDIA H100 80GB HBM3', 81559, '9.0', 700))
     AS g (gpu, name, mem, cc, watts) USING (gpu)
ORDER BY m.registered_at;

INSERT INTO bench.machines (n, id, busy_n)
SELECT n, id, CASE WHEN status = 'BUSY' THEN row_number() OVER (PARTITION BY status = 'BUSY' ORDER BY n) END
FROM machine_plan;
DROP TABLE machine_plan;

-- step: templates
-- One template for every five users, owned by random users, 30 % public.
CREATE TABLE bench.templates (n int PRIMARY KEY, id uuid NOT NULL);
WITH t AS (
    SELECT n, bench.uuid7(created_at) AS id, created_at, owner_n, r_public
    FROM (SELECT n, p.as_of - interval '90 days' - interval '60 days' * random() AS created_at,
                 1 + floor(random() * p.users)::int AS owner_n, random() AS r_public
          FROM bench.params p, generate_series(1, greatest(1, p.users / 5)) n) s
), ins AS (
    INSERT INTO job_templates (id, name, description, schema, category, is_public, created_at, updated_at, user_id)
    SELECT t.id, 'Template ' || t.n, 'A bench txt2img template',
           jsonb_set(bench.workflow('{{prompt}}', 0,
                                    (ARRAY['sd_xl_base_1.0.safetensors', 'juggernautXL_v9.safetensors', 'flux1-dev-fp8.safetensors'])[1 + t.n % 3],
                                    1024, 25),
                     '{3,inputs,seed}', '"{{seed}}"'),
           (ARRAY['portrait', 'landscape', 'product', 'anime', NULL])[1 + t.n % 5], t.r_public < 0.3,
           t.created_at, t.created_at, u.id
    FROM t JOIN bench.users u ON u.n = t.owner_n
    ORDER BY t.created_at
)
INSERT INTO bench.templates (n, id) SELECT n, id FROM t;

-- step: workflows
-- Jobs draw their graph from a pool of distinct ones: building a ~1.2 kB jsonb per row would
-- dominate the fill, and repeating graphs changes nothing for the queries measured.
CREATE TABLE bench.workflows (n int PRIMARY KEY, workflow jsonb NOT NULL, parameters jsonb NOT NULL);
INSERT INTO bench.workflows (n, workflow, parameters)
SELECT n, bench.workflow(prompt, seed,
                         (ARRAY['sd_xl_base_1.0.safetensors', 'juggernautXL_v9.safetensors', 'flux1-dev-fp8.safetensors'])[1 + n % 3],
                         (ARRAY[1024, 1024, 1024, 768, 512])[1 + n % 5], (ARRAY[20, 25, 30])[1 + n % 3]),
       jsonb_build_object('prompt', prompt, 'seed', seed)
FROM (SELECT n, (ARRAY['a lighthouse on a cliff at dusk, volumetric light', 'portrait of an astronaut, studio lighting, 85mm',
                       'isometric cozy cabin in the snow, octane render', 'a red fox in a misty forest, morning light',
                       'cyberpunk street market at night, neon, rain', 'product shot of a ceramic mug on marble',
                       'watercolor map of an imaginary island', 'macro photo of a dew-covered leaf',
                       'art deco poster of a zeppelin over a city', 'a bowl of ramen, top-down, food photography',
                       'ancient library with floating books, fantasy', 'minimalist logo of a mountain and sun',
                       'a corgi astronaut on the moon, digital art', 'brutalist concrete house in a pine forest',
                       'koi pond in a japanese garden, autumn', 'vintage sports car on a coastal road'])[1 + n % 16]
                    || ', variation ' || n AS prompt,
             floor(random() * 4294967295)::bigint AS seed
      FROM generate_series(1, 2000) n) s;

-- step: job_plan
-- The skeleton of every job, sorted by creation time so that job_requests is written in the
-- order production writes it (UUIDv7 ids ascending, heap in time order). Status mix: ~90 %
-- COMPLETED, 5 % FAILED, 1 % CANCELLED (half of them before they ran), 2 % QUEUED (a backlog
-- of the last 3 hours, a tenth requeued after a lost execution), 2 % PROCESSING (started in
-- the last 20 minutes). Users are skewed (user n's share falls like 1/sqrt(n)), priorities
-- mostly 10, and a started job has 1 + exec_extra executions on average (at most 10).
CREATE TEMP TABLE job_plan AS
SELECT bench.uuid7(t.created_at) AS id, u.id AS user_id, tpl.id AS template_id, t.*
FROM (
    SELECT g, user_n, template_n, status, attempts, r_content, r_detail, created_at,
           greatest(3, attempts) AS max_attempts,
           CASE WHEN r_priority < 0.80 THEN 10 WHEN r_priority < 0.92 THEN floor(r_detail * 101)::int
                WHEN r_priority < 0.97 THEN 50 ELSE 100 END AS priority,
           started_at, finished_at,
           CASE WHEN status = 'PROCESSING' THEN as_of
                WHEN status = 'QUEUED' THEN least(started_at + run, as_of)
                ELSE finished_at END AS span_end
    FROM (
        SELECT *,
               CASE WHEN attempts > 0 THEN least(created_at + wait, as_of) END AS started_at,
               CASE WHEN status IN ('COMPLETED', 'FAILED', 'CANCELLED')
                    THEN created_at + wait + run * attempts END AS finished_at
        FROM (
            SELECT *,
                   CASE WHEN status = 'QUEUED' THEN as_of - interval '3 hours' * r_age
                        WHEN status = 'PROCESSING' THEN as_of - wait - run * (attempts - 1) - interval '20 minutes' * r_age
                        ELSE as_of - wait - run * attempts - (interval '90 days' - interval '3 hours') * r_age
                   END AS created_at
            FROM (
                SELECT g, p.as_of, status, r_age, r_priority, r_content, r_detail,
                       least(p.users, 1 + floor(p.users * r_user ^ 2)::int) AS user_n,
                       CASE WHEN r_template < 0.4 THEN least(p.templates, 1 + floor(p.templates * r_template / 0.4)::int) END AS template_n,
                       interval '1 second' * (1 + 90 * r_wait ^ 3) AS wait,
                       interval '1 second' * (8 + 240 * r_run ^ 2) AS run,
                       CASE WHEN status = 'QUEUED' THEN CASE WHEN r_branch < 0.1 THEN 1 ELSE 0 END
                            WHEN status = 'CANCELLED' AND r_branch < 0.5 THEN 0
                            -- 1 + a stochastic rounding of U[0, 2 extra): exec_extra more on average
                            ELSE least(10, 1 + floor(2 * p.exec_extra * r_attempts + r_round)::int)
                       END AS attempts
                FROM (
                    SELECT g, random() AS r_user, random() AS r_age, random() AS r_wait, random() AS r_run,
                           random() AS r_priority, random() AS r_attempts, random() AS r_round, random() AS r_branch,
                           random() AS r_template, random() AS r_content, random() AS r_detail,
                           CASE WHEN r_status < 0.90 THEN 'COMPLETED' WHEN r_status < 0.95 THEN 'FAILED'
                                WHEN r_status < 0.96 THEN 'CANCELLED' WHEN r_status < 0.98 THEN 'QUEUED'
                                ELSE 'PROCESSING' END::job_status AS status
                    FROM (SELECT g, random() AS r_status FROM bench.params p, generate_series(1, p.jobs) g) r
                ) s, bench.params p
            ) a
        ) b
    ) c
) t
JOIN bench.users u ON u.n = t.user_n
LEFT JOIN bench.templates tpl ON tpl.n = t.template_n
ORDER BY t.created_at;

-- step: jobs
-- A temp table is never scanned in parallel, so job_plan is read back in the order written
-- (the join with the small pool is a hash join probed in that order).
INSERT INTO job_requests (id, template_id, custom_workflow, rendered_workflow, parameters, status, priority,
                          requirements, attempts, max_attempts, timeout_seconds, cancel_requested,
                          include_temp_outputs, created_at, updated_at, started_at, completed_at, failed_at,
                          cancelled_at, error_message, error, metadata, webhook_url, webhook_events, user_id)
SELECT id, template_id,
       CASE WHEN template_id IS NULL THEN workflow END,
       CASE WHEN template_id IS NOT NULL THEN workflow END,
       CASE WHEN template_id IS NOT NULL THEN parameters ELSE '{}' END,
       status, priority,
       CASE WHEN r_detail < 0.70 THEN '{}'
            WHEN r_detail < 0.90 THEN jsonb_build_object('min_vram_gb', CASE WHEN g % 2 = 0 THEN 16 ELSE 24 END)
            WHEN r_detail < 0.98 THEN '{"gpu_model": "RTX 4090"}'
            ELSE '{"provider": "salad", "region": "us-east"}' END::jsonb,
       attempts, max_attempts, (ARRAY[1800, 1800, 1800, 600, 3600])[1 + g % 5],
       status = 'PROCESSING' AND r_content < 0.01, r_content > 0.98,
       created_at, coalesce(finished_at, started_at, created_at), started_at,
       CASE WHEN status = 'COMPLETED' THEN finished_at END,
       CASE WHEN status = 'FAILED' THEN finished_at END,
       CASE WHEN status = 'CANCELLED' THEN finished_at END,
       error->>'message', error,
       CASE WHEN r_content < 0.5 THEN '{}' ELSE jsonb_build_object('client', 'bench', 'batch', 'b-' || (g / 500)) END,
       CASE WHEN r_content < 0.25 THEN 'https://hooks.example.com/emp/' || user_n END,
       CASE WHEN r_content < 0.05 THEN ARRAY['job.progress'] ELSE '{}' END,
       user_id
FROM (
    SELECT j.*, wf.workflow, wf.parameters,
           CASE WHEN status <> 'FAILED' THEN NULL
                WHEN r_detail < 0.55 THEN '{"code": "comfyui_execution_error", "message": "Error occurred when executing KSampler: CUDA out of memory. Tried to allocate 2.50 GiB", "node_id": "3", "node_type": "KSampler"}'
                WHEN r_detail < 0.75 THEN '{"code": "timeout", "message": "the job ran longer than its timeout"}'
                WHEN r_detail < 0.90 THEN '{"code": "attempts_exhausted", "message": "every execution of the job failed"}'
                ELSE '{"code": "comfyui_validation_error", "message": "Value not in list: ckpt_name", "node_id": "4", "node_type": "CheckpointLoaderSimple"}'
           END::jsonb AS error
    FROM job_plan j JOIN bench.workflows wf ON wf.n = 1 + j.g % 2000
) w;

-- step: executions
-- A started job has `attempts` executions spread over its running time: the earlier ones
-- FAILED, LOST or STALE, the last one ending as the job did (RUNNING for a PROCESSING job, on a
-- BUSY box).
INSERT INTO job_executions (id, job_request_id, machine_id, status, started_at, completed_at, failed_at,
                            error_message, error, outputs)
SELECT bench.uuid7(e.started_at), e.job_id, m.id, e.status, e.started_at,
       CASE WHEN e.status = 'COMPLETED' THEN e.ended_at END,
       CASE WHEN e.status NOT IN ('COMPLETED', 'RUNNING') THEN e.ended_at END,
       e.error->>'message', e.error,
       CASE WHEN e.status = 'COMPLETED' THEN jsonb_build_array(jsonb_build_object(
           'node_id', '9', 'filename', 'emp_' || lpad(e.k::text, 5, '0') || '_.png', 'content_type', 'image/png',
           'size', 900000 + floor(e.r_machine * 1500000)::int)) END
FROM (
    SELECT job_id, k, started_at, ended_at, status, r_machine, busy_pick, any_pick,
           CASE status WHEN 'FAILED' THEN '{"code": "comfyui_execution_error", "message": "Error occurred when executing KSampler: CUDA out of memory"}'::jsonb
                       WHEN 'LOST' THEN '{"code": "lease_expired", "message": "the machine stopped renewing its lease"}'::jsonb
                       WHEN 'STALE' THEN '{"code": "superseded", "message": "another execution had replaced this one"}'::jsonb
           END AS error
    FROM (
        SELECT j.id AS job_id, k,
               j.started_at + (j.span_end - j.started_at) * ((k - 1)::float8 / j.attempts) AS started_at,
               j.started_at + (j.span_end - j.started_at) * (k::float8 / j.attempts) AS ended_at,
               CASE WHEN k < j.attempts OR j.status = 'QUEUED' THEN
                        CASE WHEN r_status < 0.6 THEN 'FAILED' WHEN r_status < 0.9 THEN 'LOST' ELSE 'STALE' END
                    ELSE CASE j.status WHEN 'COMPLETED' THEN 'COMPLETED' WHEN 'FAILED' THEN 'FAILED'
                                       WHEN 'CANCELLED' THEN 'CANCELLED' ELSE 'RUNNING' END
               END::execution_status AS status,
               r_machine,
               CASE WHEN k = j.attempts AND j.status = 'PROCESSING' AND c.busy > 0
                    THEN 1 + floor(r_machine * c.busy)::int END AS busy_pick,
               1 + floor(r_machine * c.total)::int AS any_pick
        FROM (SELECT job_plan.*, k, random() AS r_status, random() AS r_machine
              FROM job_plan, generate_series(1, job_plan.attempts) k) j,
             (SELECT count(busy_n) AS busy, count(*) AS total FROM bench.machines) c
    ) s
) e
LEFT JOIN bench.machines b ON b.busy_n = e.busy_pick
JOIN bench.machines m ON m.n = coalesce(b.n, e.any_pick);
DROP TABLE job_plan;
