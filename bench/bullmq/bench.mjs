// The BullMQ side of `emp-bench versus-bullmq`: a worker with concurrency C waits, then a
// producer adds N no-op jobs (addBulk, batches of 100) carrying their add time; the worker
// records add -> start for each job. Prints one JSON line:
// {"jobs", "concurrency", "seconds", "jobs_per_sec", "p50_ms", "p99_ms"}.
//
//   node bench.mjs --redis-url redis://127.0.0.1:6379 --jobs 50000 --concurrency 50
import { performance } from 'node:perf_hooks';
import { Queue, Worker } from 'bullmq';
import IORedis from 'ioredis';

function arg(name, fallback) {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? process.argv[i + 1] : fallback;
}

const redisUrl = arg('redis-url', 'redis://127.0.0.1:6379');
const jobs = Number(arg('jobs', '50000'));
const concurrency = Number(arg('concurrency', '1'));
const name = arg('queue', `versus-${process.pid}-${Date.now()}`);
const now = () => performance.timeOrigin + performance.now(); // ms, sub-ms precision

const connection = () => new IORedis(redisUrl, { maxRetriesPerRequest: null });
const queue = new Queue(name, { connection: connection() });
const latencies = new Float64Array(jobs);
let started = 0;
let completed = 0;
let first = 0;
let resolveDone;
const done = new Promise((resolve) => { resolveDone = resolve; });

const worker = new Worker(
  name,
  async (job) => {
    latencies[started++] = now() - job.data.t;
  },
  {
    connection: connection(),
    concurrency,
    removeOnComplete: { count: 0 },
    removeOnFail: { count: 0 },
  },
);
worker.on('completed', () => {
  completed += 1;
  if (completed === jobs) resolveDone(now());
});
await worker.waitUntilReady();

first = now();
for (let sent = 0; sent < jobs; sent += 100) {
  const batch = [];
  for (let i = sent; i < Math.min(jobs, sent + 100); i += 1) {
    batch.push({ name: 'noop', data: { i, t: now() }, opts: { removeOnComplete: true } });
  }
  await queue.addBulk(batch);
}
const last = await done;
await worker.close();
await queue.obliterate({ force: true });
await queue.close();

const sorted = Array.from(latencies.subarray(0, started)).sort((a, b) => a - b);
const at = (q) => sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
const seconds = (last - first) / 1000;
console.log(JSON.stringify({
  jobs,
  concurrency,
  seconds,
  jobs_per_sec: jobs / seconds,
  p50_ms: at(0.5),
  p99_ms: at(0.99),
}));
process.exit(0);
