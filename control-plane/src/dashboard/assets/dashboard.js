// emp dashboard: polls the admin API and redraws. No framework, no build step.
//
// Data: GET /api/v1/stats, /api/v1/machines, /api/v1/stats/queues, /api/v1/stats/jobs,
// /api/v1/stats/timeseries, and for the selected job /api/v1/jobs/{id},
// /api/v1/jobs/{id}/executions and its outputs. Every request carries the admin key kept in
// localStorage. Polling pauses while the tab is hidden.

const KEY_STORAGE = "emp.dashboard.key";
const POLL_MS = 1500;
const CHART_POLL_MS = 10000;


const $ = (selector) => document.querySelector(selector);

const state = {
  key: localStorage.getItem(KEY_STORAGE) || "",
  timer: null,
  lastChart: 0,
  lastEnded: null,
  selectedJob: null,
  detailUrls: [],
  running: false,
};

// ---------------------------------------------------------------- helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const svgNs = "http://www.w3.org/2000/svg";
function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(svgNs, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  for (const child of children.flat()) if (child) node.append(child);
  return node;
}

function shortId(id) {
  return id ? id.slice(-8) : "–";
}

function seconds(value) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  const s = Math.max(0, value);
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

function ageOf(timestamp) {
  if (!timestamp) return null;
  return (Date.now() - Date.parse(timestamp)) / 1000;
}

function clock(timestamp) {
  if (!timestamp) return "–";
  return new Date(timestamp).toLocaleTimeString([], { hour12: false });
}

function badge(status) {
  return el("span", { class: `badge s-${status.toLowerCase()}`, text: status });
}

function replaceRows(table, rows, empty) {
  const body = $(`${table} tbody`);
  const columns = $(`${table} thead tr`).children.length;
  body.replaceChildren(...(rows.length ? rows : [el("tr", { class: "empty" }, el("td", { colspan: columns, text: empty }))]));
}

// ---------------------------------------------------------------- API

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(path, { blob = false } = {}) {
  let response;
  try {
    response = await fetch(path, { headers: { Authorization: `Bearer ${state.key}` }, cache: "no-store" });
  } catch (error) {
    throw new ApiError(0, "network", "The control plane cannot be reached.");
  }
  if (!response.ok) {
    let code = "http", message = `HTTP ${response.status}`;
    try {
      const body = await response.json();
      code = body.error.code;
      message = body.error.message;
    } catch (_) { /* not the error envelope */ }
    throw new ApiError(response.status, code, message);
  }
  return blob ? response.blob() : response.json();
}

// ---------------------------------------------------------------- key

function showLogin(message) {
  stop();
  $("#board").hidden = true;
  $("#login").hidden = false;
  $("#forget-key").hidden = true;
  $("#key-error").textContent = message || "";
  setConnection("idle", "not connected");
  $("#key-input").focus();
}

function showBoard() {
  $("#login").hidden = true;
  $("#board").hidden = false;
  $("#forget-key").hidden = false;
}

function setConnection(kind, text) {
  const node = $("#connection");
  node.dataset.state = kind;
  node.textContent = text;
}

function refused(error) {
  if (error.status === 401) return "That key was refused (401 unauthorized): it is unknown or revoked.";
  if (error.status === 403) return "That key is valid but its user is not an admin (403 forbidden).";
  return null;
}

async function connect(key) {
  state.key = key;
  $("#key-submit").disabled = true;
  try {
    await api("/api/v1/stats");
    localStorage.setItem(KEY_STORAGE, key);
    showBoard();
    start();
  } catch (error) {
    const reason = refused(error);
    if (reason) {
      localStorage.removeItem(KEY_STORAGE);
      showLogin(reason);
    } else {
      // Not a refusal (the control plane is unreachable or failing): keep the key and keep
      // trying; the connection badge says what is wrong.
      showBoard();
      start();
    }
  } finally {
    $("#key-submit").disabled = false;
  }
}

// ---------------------------------------------------------------- polling

function start() {
  stop();
  state.running = true;
  tick();
}

function stop() {
  state.running = false;
  clearTimeout(state.timer);
  state.timer = null;
}

function schedule() {
  clearTimeout(state.timer);
  if (state.running && !document.hidden) state.timer = setTimeout(tick, POLL_MS);
}

async function tick() {
  if (!state.running) return;
  const filter = $("#job-filter").value;
  const jobsPath = `/api/v1/stats/jobs?limit=50${filter ? `&status=${filter}` : ""}`;
  try {
    const [stats, machines, queues, jobs, running] = await Promise.all([
      api("/api/v1/stats"),
      api("/api/v1/machines?limit=200"),
      api("/api/v1/stats/queues"),
      api(jobsPath),
      api("/api/v1/stats/jobs?status=PROCESSING&limit=200"),
    ]);
    // The charts change when jobs end, and at least every CHART_POLL_MS as minutes pass.
    const ended = stats.jobs.COMPLETED + stats.jobs.FAILED + stats.jobs.CANCELLED;
    const wantChart = ended !== state.lastEnded || Date.now() - state.lastChart > CHART_POLL_MS;
    state.lastEnded = ended;
    const series = wantChart ? await api("/api/v1/stats/timeseries?minutes=60") : null;
    renderTiles(stats, queues);
    renderFleet(machines.items, running.items);
    renderQueues(queues);
    renderJobs(jobs.items, machines.items);
    if (series) {
      state.lastChart = Date.now();
      renderCharts(series.points);
    }
    if (state.selectedJob) await renderDetail(state.selectedJob, machines.items);
    setConnection("live", "live");
    $("#updated").textContent = `updated ${clock(new Date().toISOString())}`;
  } catch (error) {
    const reason = refused(error);
    if (reason) {
      localStorage.removeItem(KEY_STORAGE);
      showLogin(reason);
      return;
    }
    setConnection("error", error.message);
  }
  schedule();
}

document.addEventListener("visibilitychange", () => {
  if (!state.running) return;
  if (document.hidden) clearTimeout(state.timer);
  else tick();
});

// ---------------------------------------------------------------- tiles

function renderTiles(stats, queues) {
  const tile = (label, value, kind = "") =>
    el("div", { class: `tile ${kind}` }, el("div", { class: "value", text: value }), el("div", { class: "label", text: label }));
  const m = stats.machines;
  const live = m.STARTING + m.AVAILABLE + m.BUSY + m.DRAINING;
  $("#tiles").replaceChildren(
    tile("machines online", live),
    tile("busy", m.BUSY, "busy"),
    tile("offline", m.OFFLINE, m.OFFLINE ? "warn" : ""),
    tile("queued", stats.jobs.QUEUED),
    tile("oldest wait", seconds(queues.oldest_wait_s), queues.oldest_wait_s > 300 ? "warn" : ""),
    tile("processing", stats.jobs.PROCESSING, "busy"),
    tile("completed 24 h", stats.jobs.COMPLETED, "ok"),
    tile("failed 24 h", stats.jobs.FAILED, stats.jobs.FAILED ? "bad" : ""),
    tile("users active 24 h", stats.users.active_today),
  );
}

// ---------------------------------------------------------------- fleet

function gpuOf(capabilities) {
  const gpus = Array.isArray(capabilities?.gpus) ? capabilities.gpus : [];
  if (!gpus.length) return capabilities?.gpu_error ? "none (no NVML)" : "none";
  const names = new Map();
  for (const gpu of gpus) names.set(gpu.name || "GPU", (names.get(gpu.name || "GPU") || 0) + 1);
  return [...names].map(([name, count]) => (count > 1 ? `${count}× ${name}` : name)).join(", ");
}

function vramOf(capabilities) {
  const gpus = Array.isArray(capabilities?.gpus) ? capabilities.gpus : [];
  let total = capabilities?.total_vram_gb;
  if (typeof total !== "number") {
    const mb = gpus.reduce((sum, gpu) => sum + (gpu.memory_total_mb || 0), 0);
    total = mb / 1024;
  }
  const free = gpus.reduce((sum, gpu) => sum + (gpu.memory_free_mb || 0), 0) / 1024;
  if (!total) return "–";
  return free ? `${free.toFixed(0)} / ${total.toFixed(0)} GB free` : `${total.toFixed(0)} GB`;
}

function renderFleet(machines, running) {
  const jobOf = new Map();
  for (const job of running) if (job.machine_id) {
    const list = jobOf.get(job.machine_id) || [];
    list.push(job);
    jobOf.set(job.machine_id, list);
  }
  const shown = machines.filter((m) => m.status !== "TERMINATED");
  const order = ["BUSY", "AVAILABLE", "STARTING", "DRAINING", "OFFLINE"];
  shown.sort((a, b) => order.indexOf(a.status) - order.indexOf(b.status) || a.external_id.localeCompare(b.external_id));
  const counts = {};
  for (const m of machines) counts[m.status] = (counts[m.status] || 0) + 1;
  $("#fleet-summary").textContent = Object.entries(counts).map(([s, n]) => `${n} ${s.toLowerCase()}`).join(" · ");
  const rows = shown.map((machine) => {
    const age = ageOf(machine.last_heartbeat);
    const jobs = jobOf.get(machine.id) || [];
    return el("tr", { dataset: { machineId: machine.id, externalId: machine.external_id, status: machine.status } },
      el("td", { title: machine.id }, el("code", { text: machine.external_id })),
      el("td", {}, badge(machine.status)),
      el("td", { text: gpuOf(machine.capabilities) }),
      el("td", { text: vramOf(machine.capabilities) }),
      el("td", { text: machine.provider }),
      el("td", { text: machine.region || "–" }),
      el("td", { class: age !== null && age > 60 ? "stale" : "", text: age === null ? "never" : `${seconds(age)} ago` }),
      el("td", {}, jobs.length
        ? jobs.map((job) => el("a", { href: "#", class: "job-link", text: shortId(job.id), onclick: (e) => { e.preventDefault(); select(job.id); } }))
        : (machine.running_jobs ? `${machine.running_jobs} running` : "idle")),
    );
  });
  replaceRows("#machines", rows, "No machines registered yet.");
}

// ---------------------------------------------------------------- queues

function needsOf(requirements) {
  if (!requirements || typeof requirements !== "object") return "–";
  const parts = [];
  if (requirements.gpu_model) parts.push(requirements.gpu_model);
  if (requirements.min_vram_gb) parts.push(`≥${requirements.min_vram_gb} GB`);
  if (Array.isArray(requirements.models) && requirements.models.length) parts.push(`${requirements.models.length} model(s)`);
  if (Array.isArray(requirements.node_types) && requirements.node_types.length) parts.push(`${requirements.node_types.length} node type(s)`);
  if (requirements.provider) parts.push(requirements.provider);
  if (requirements.region) parts.push(requirements.region);
  return parts.join(", ") || "any box";
}

function renderQueues(queues) {
  $("#queue-summary").textContent = `${queues.total} queued` + (queues.classes_known ? "" : " · class queues unavailable (Redis)");
  replaceRows("#class-queues", queues.classes.filter((c) => c.depth > 0).map((c) =>
    el("tr", { dataset: { classId: c.class_id } },
      el("td", { title: c.class_id }, el("code", { text: c.class_id.slice(0, 8) })),
      el("td", { title: JSON.stringify(c.requirements), text: needsOf(c.requirements) }),
      el("td", { class: "num", text: c.depth }),
      el("td", { text: seconds(c.head_wait_s) }),
    )), "No class has waiting jobs.");
  replaceRows("#priority-queues", queues.priorities.map((p) =>
    el("tr", {},
      el("td", { class: "num", text: p.priority }),
      el("td", { class: "num", text: p.depth }),
      el("td", { text: seconds(p.oldest_wait_s) }),
    )), "Nothing waits.");
}

// ---------------------------------------------------------------- jobs

function durationOf(job) {
  const end = job.completed_at || job.failed_at || job.cancelled_at;
  if (job.started_at) return ((end ? Date.parse(end) : Date.now()) - Date.parse(job.started_at)) / 1000;
  if (job.status === "QUEUED") return ageOf(job.created_at);
  return null;
}

function progressOf(job) {
  if (job.status === "COMPLETED") return el("progress", { max: 1, value: 1 });
  if (!job.progress || !job.progress.max) return job.status === "PROCESSING" ? el("progress", {}) : "–";
  return el("span", { class: "progress" },
    el("progress", { max: job.progress.max, value: job.progress.value }),
    ` ${job.progress.value}/${job.progress.max}`);
}

function machineName(machines, id) {
  if (!id) return "–";
  const machine = machines.find((m) => m.id === id);
  return machine ? machine.external_id : shortId(id);
}

function renderJobs(jobs, machines) {
  const rows = jobs.map((job) =>
    el("tr", { class: job.id === state.selectedJob ? "selected" : "", dataset: { jobId: job.id, status: job.status }, onclick: () => select(job.id) },
      el("td", { title: job.id }, el("code", { text: shortId(job.id) })),
      el("td", { class: "job-status" }, badge(job.status)),
      el("td", {}, progressOf(job)),
      el("td", { text: machineName(machines, job.machine_id) }),
      el("td", { class: "num", text: job.priority }),
      el("td", { text: clock(job.created_at) }),
      el("td", { text: seconds(durationOf(job)) + (job.status === "QUEUED" ? " waiting" : "") }),
    ));
  replaceRows("#jobs", rows, "No jobs yet.");
}

// ---------------------------------------------------------------- job detail

function select(id) {
  state.selectedJob = id;
  $("#detail").hidden = false;
  $("#detail-id").textContent = id;
  for (const row of document.querySelectorAll("#jobs tr.selected")) row.classList.remove("selected");
  document.querySelector(`#jobs tr[data-job-id="${id}"]`)?.classList.add("selected");
  $("#detail-body").replaceChildren(el("p", { class: "muted", text: "Loading…" }));
  renderDetail(id, []).catch(() => {});
  $("#detail").scrollIntoView({ behavior: "smooth", block: "nearest" });
}

function fieldRow(label, value) {
  return el("tr", {}, el("th", { text: label }), el("td", {}, value ?? "–"));
}

async function outputPreview(output) {
  const item = el("figure", { class: "output" });
  const caption = el("figcaption", {}, `${output.filename} · ${output.content_type} · ${(output.size / 1024).toFixed(1)} KiB`);
  if (output.content_type.startsWith("image/") && output.size <= 8 * 1024 * 1024) {
    try {
      const blob = await api(output.url, { blob: true });
      const url = URL.createObjectURL(blob);
      state.detailUrls.push(url);
      item.append(el("img", { src: url, alt: output.filename }));
    } catch (error) {
      item.append(el("p", { class: "error", text: `preview failed: ${error.message}` }));
    }
  }
  item.append(caption);
  return item;
}

async function renderDetail(id, machines) {
  const [job, executions] = await Promise.all([
    api(`/api/v1/jobs/${id}`),
    api(`/api/v1/jobs/${id}/executions`),
  ]);
  if (state.selectedJob !== id) return;
  const body = $("#detail-body");
  const outputsKey = job.outputs.map((o) => o.id).join(",");
  const keep = body.dataset.outputs === outputsKey && body.dataset.job === id;
  const previews = keep ? body.querySelector(".outputs") : null;
  const fields = el("table", { class: "fields" },
    fieldRow("Status", badge(job.status)),
    fieldRow("User", el("code", { text: job.user_id })),
    fieldRow("Priority", job.priority),
    fieldRow("Attempts", `${job.attempts} of ${job.max_attempts}`),
    fieldRow("Submitted", new Date(job.created_at).toLocaleString()),
    fieldRow("Started", job.started_at && new Date(job.started_at).toLocaleString()),
    fieldRow("Ended", (job.completed_at || job.failed_at || job.cancelled_at) && new Date(job.completed_at || job.failed_at || job.cancelled_at).toLocaleString()),
    fieldRow("Duration", seconds(durationOf(job))),
    fieldRow("Machine", machineName(machines, job.machine_id)),
    fieldRow("Progress", progressOf(job)),
    fieldRow("Nodes", Object.values(job.workflow || {}).map((n) => n.class_type).join(" → ")),
  );
  const error = job.error
    ? el("div", { class: "error-box" }, el("strong", { text: job.error.code || "error" }), " ", job.error.message || "",
      job.error.node_type ? ` (node ${job.error.node_id} ${job.error.node_type})` : "")
    : null;
  const execRows = executions.items.map((e) =>
    el("tr", {},
      el("td", {}, el("code", { text: shortId(e.id) })),
      el("td", {}, badge(e.status)),
      el("td", { text: machineName(machines, e.machine_id) }),
      el("td", { text: clock(e.started_at) }),
      el("td", { text: seconds(((Date.parse(e.completed_at || e.failed_at) || Date.now()) - Date.parse(e.started_at)) / 1000) }),
      el("td", { class: "error", text: e.error ? `${e.error.code}: ${e.error.message}` : "" }),
    ));
  const execTable = el("table", { class: "executions" },
    el("thead", {}, el("tr", {}, ["Execution", "Status", "Machine", "Started", "Took", "Error"].map((h) => el("th", { text: h })))),
    el("tbody", {}, execRows.length ? execRows : el("tr", { class: "empty" }, el("td", { colspan: 6, text: "Not started yet." }))));
  let outputs = previews;
  if (!outputs) {
    for (const url of state.detailUrls) URL.revokeObjectURL(url);
    state.detailUrls = [];
    outputs = el("div", { class: "outputs" },
      job.outputs.length ? await Promise.all(job.outputs.map(outputPreview)) : el("p", { class: "muted", text: "No outputs." }));
    if (state.selectedJob !== id) return;
  }
  body.dataset.outputs = outputsKey;
  body.dataset.job = id;
  body.replaceChildren(...[
    el("div", { class: "two" }, fields, el("div", {}, el("h3", { text: "Outputs" }), outputs)),
    error,
    el("h3", { text: "Executions" }),
    execTable,
  ].filter(Boolean));
}

// ---------------------------------------------------------------- charts

const CHART = { width: 560, height: 180, left: 36, right: 8, top: 8, bottom: 22 };

function axes(maxY, points, format) {
  const { width, height, left, right, top, bottom } = CHART;
  const plotH = height - top - bottom;
  const nodes = [];
  for (let i = 0; i <= 4; i++) {
    const y = top + plotH - (plotH * i) / 4;
    nodes.push(svg("line", { x1: left, x2: width - right, y1: y, y2: y, class: "grid" }));
    const label = svg("text", { x: left - 4, y: y + 3, class: "tick", "text-anchor": "end" });
    label.textContent = format((maxY * i) / 4);
    nodes.push(label);
  }
  const stepX = (width - left - right) / Math.max(points.length, 1);
  for (let i = 0; i < points.length; i += 15) {
    const label = svg("text", { x: left + i * stepX, y: height - 6, class: "tick" });
    label.textContent = clock(points[i].minute).slice(0, 5);
    nodes.push(label);
  }
  return nodes;
}

function niceMax(value) {
  if (value <= 0) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 4, 5, 10]) if (step * power >= value) return step * power;
  return 10 * power;
}

function renderThroughput(points) {
  const { width, height, left, right, top, bottom } = CHART;
  const plotH = height - top - bottom;
  const maxY = niceMax(Math.max(...points.map((p) => p.completed + p.failed + p.cancelled), 0));
  const stepX = (width - left - right) / points.length;
  const bars = [];
  points.forEach((p, i) => {
    let y = top + plotH;
    for (const [count, kind] of [[p.completed, "ok"], [p.failed, "bad"], [p.cancelled, "cancel"]]) {
      if (!count) continue;
      const h = (count / maxY) * plotH;
      y -= h;
      const bar = svg("rect", { x: left + i * stepX + 1, y, width: Math.max(stepX - 2, 1), height: h, class: `bar ${kind}` });
      const title = svg("title");
      title.textContent = `${clock(p.minute).slice(0, 5)}: ${p.completed} completed, ${p.failed} failed, ${p.cancelled} cancelled`;
      bar.append(title);
      bars.push(bar);
    }
  });
  $("#throughput-chart").replaceChildren(svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img" },
    axes(maxY, points, (v) => String(Number(v.toFixed(2)))), bars));
}

function renderLatency(points) {
  const { width, height, left, right, top, bottom } = CHART;
  const plotH = height - top - bottom;
  const series = [["wait_p50_s", "wait"], ["wait_p95_s", "wait p95"], ["run_p50_s", "run"], ["run_p95_s", "run p95"]];
  const values = points.flatMap((p) => series.map(([field]) => p[field]).filter((v) => v !== null));
  const maxY = niceMax(Math.max(...values, 0));
  const stepX = (width - left - right) / points.length;
  const lines = series.map(([field, kind]) => {
    let d = "";
    let pen = false;
    points.forEach((p, i) => {
      const v = p[field];
      if (v === null) { pen = false; return; }
      const x = left + i * stepX + stepX / 2;
      const y = top + plotH - (v / maxY) * plotH;
      d += `${pen ? "L" : "M"}${x.toFixed(1)},${y.toFixed(1)}`;
      pen = true;
    });
    const dots = points.filter((p) => p[field] !== null).length === 1;
    return svg("path", { d: d ? d + (dots ? "l0.1,0" : "") : "M0,0", class: `line ${kind.replace(" ", "-")}${dots ? " dots" : ""}` });
  });
  $("#latency-chart").replaceChildren(svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img" },
    axes(maxY, points, (v) => String(Number(v.toFixed(2)))), lines));
}

function renderCharts(points) {
  renderThroughput(points);
  renderLatency(points);
}

// ---------------------------------------------------------------- start

$("#key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("#key-input").value.trim();
  if (key) connect(key);
});
$("#forget-key").addEventListener("click", () => {
  localStorage.removeItem(KEY_STORAGE);
  state.key = "";
  $("#key-input").value = "";
  showLogin("");
});
$("#detail-close").addEventListener("click", () => {
  state.selectedJob = null;
  $("#detail").hidden = true;
  for (const row of document.querySelectorAll("#jobs tr.selected")) row.classList.remove("selected");
});
$("#job-filter").addEventListener("change", () => start());

if (state.key) connect(state.key);
else showLogin("");

