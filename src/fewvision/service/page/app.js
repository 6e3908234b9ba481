// fewvision inspection page: plain JavaScript over the /v1 API. The token lives in sessionStorage and goes in the
// Authorization header only - never in a URL (images are fetched with the header and shown as blob URLs).
"use strict";

const state = { token: sessionStorage.getItem("fewvision-token"), project: null, projects: [], review: [], at: 0,
                model: null, recent: [] };
const $ = (sel) => document.querySelector(sel);

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {}, { Authorization: `Bearer ${state.token}` });
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (!response.ok) {
    let message = `${response.status}`;
    try { message = (await response.json()).error.message; } catch (e) { /* not JSON */ }
    const err = new Error(message);
    err.status = response.status;
    throw err;
  }
  const type = response.headers.get("content-type") || "";
  return type.includes("json") ? response.json() : response.blob();
}

async function imageUrl(path) { return URL.createObjectURL(await api(path)); }

// --- sign in ------------------------------------------------------------------------------------------------------
async function signIn(token) {
  state.token = token;
  try {
    state.projects = await api("/v1/projects");
  } catch (err) {
    state.token = null;
    sessionStorage.removeItem("fewvision-token");
    $("#signin-error").textContent = err.status === 401 ? "That token is not valid." : err.message;
    return;
  }
  sessionStorage.setItem("fewvision-token", token);
  $("#signin-view").hidden = true;
  $("#app-view").hidden = false;
  $("#sign-out").hidden = false;
  $("#who").textContent = "signed in";
  renderProjects();
}

$("#signin-form").addEventListener("submit", (e) => { e.preventDefault(); signIn($("#token").value.trim()); });
$("#sign-out").addEventListener("click", () => { sessionStorage.removeItem("fewvision-token"); location.reload(); });

// --- projects -----------------------------------------------------------------------------------------------------
function renderProjects() {
  const list = $("#project-list");
  list.innerHTML = "";
  for (const p of state.projects) {
    const li = document.createElement("li");
    li.textContent = `${p.name} (${p.task})`;
    li.dataset.id = p.id;
    if (state.project && state.project.id === p.id) li.classList.add("active");
    li.addEventListener("click", () => openProject(p.id));
    list.appendChild(li);
  }
}

$("#new-project").addEventListener("submit", async (e) => {
  e.preventDefault();
  const form = new FormData(e.target);
  const classes = String(form.get("classes") || "").split("\n").map((l) => l.trim()).filter(Boolean).map((l) => {
    const [name, ...rest] = l.split(":");
    return { name: name.trim(), description: rest.join(":").trim() };
  });
  const body = { name: form.get("name"), task: form.get("task"), classes };
  if (form.get("backbone")) body.backbone = form.get("backbone");
  if (form.get("method")) body.method = form.get("method");
  try {
    const p = await api("/v1/projects", { method: "POST", headers: { "Content-Type": "application/json" },
                                          body: JSON.stringify(body) });
    $("#project-error").textContent = "";
    state.projects = await api("/v1/projects");
    e.target.reset();
    $("#new-project-box").open = false;
    await openProject(p.id);
  } catch (err) { $("#project-error").textContent = err.message; }
});

async function openProject(id) {
  state.project = await api(`/v1/projects/${id}`);
  renderProjects();
  const p = state.project;
  $("#project-view").hidden = false;
  $("#project-title").textContent = p.name;
  $("#project-info").textContent = `${p.task} · ${p.method} on ${p.backbone} · model ` +
    (p.active_version ? `v${p.active_version}` : "not fitted yet") + (p.needs_refit ? " · new images since the last fit" : "");
  const labels = p.task === "anomaly" ? ["good"] : p.classes.map((c) => c.name);
  $("#exemplar-label").innerHTML = labels.map((l) => `<option>${escapeHtml(l)}</option>`).join("");
  $("#exemplar-counts").textContent = Object.entries(p.exemplars).map(([k, v]) => `${k}: ${v}`).join(", ") || "no exemplars yet";
  await Promise.all([loadVersions(), loadThreshold(), loadReview()]);
}

function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

document.querySelectorAll(".tabs button").forEach((b) => b.addEventListener("click", () => showTab(b.dataset.tab)));
function showTab(name) {
  document.querySelectorAll(".tabs button").forEach((b) => b.classList.toggle("active", b.dataset.tab === name));
  document.querySelectorAll(".tab").forEach((t) => { t.hidden = t.id !== `tab-${name}`; });
  if (name === "review") loadReview().then(renderReview);
  if (name === "threshold") loadThreshold();  // the latest predictions and reviews
  if (name === "monitor") loadMonitor();
}

// --- exemplars: drag and drop -------------------------------------------------------------------------------------
async function upload(files) {
  const label = $("#exemplar-label").value;
  let done = 0, failed = 0;
  for (const file of files) {
    const form = new FormData();
    form.append("file", file, file.name);
    form.append("label", label);
    try { await api(`/v1/projects/${state.project.id}/exemplars`, { method: "POST", body: form }); done += 1; }
    catch (err) { failed += 1; $("#upload-status").textContent = `${file.name}: ${err.message}`; }
    $("#upload-status").textContent = `uploaded ${done} of ${files.length}` + (failed ? `, ${failed} refused` : "");
  }
  await openProject(state.project.id);
}
const drop = $("#drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); upload([...e.dataTransfer.files]); });
$("#exemplar-files").addEventListener("change", (e) => upload([...e.target.files]));

// --- fit and versions -----------------------------------------------------------------------------------------------
$("#fit").addEventListener("click", async () => {
  try {
    const job = await api(`/v1/projects/${state.project.id}/fit`, { method: "POST" });
    watchJob(job.job_id);
  } catch (err) { $("#job-progress").textContent = err.message; }
});

async function watchJob(id) {
  const bar = $("#job-bar");
  bar.hidden = false;
  for (;;) {
    const job = await api(`/v1/jobs/${id}`);
    bar.value = job.progress;
    $("#job-progress").textContent = `${job.state} ${Math.round(job.progress * 100)}%` + (job.error ? `: ${job.error}` : "");
    if (job.state === "done" || job.state === "failed") break;
    await new Promise((r) => setTimeout(r, 500));
  }
  await openProject(state.project.id);
}

async function loadVersions() {
  const versions = await api(`/v1/projects/${state.project.id}/models`);
  $("#versions tbody").innerHTML = versions.map((v) =>
    `<tr><td>v${v.version}${v.active ? " (active)" : ""}</td><td>${escapeHtml(v.origin)}</td>` +
    `<td>${escapeHtml(v.summary.guarantee || `${v.summary.n_images || "?"} images`)}</td>` +
    `<td>${v.active ? "" : `<button data-activate="${v.version}">activate</button>`}</td></tr>`).join("");
  document.querySelectorAll("[data-activate]").forEach((b) => b.addEventListener("click", async () => {
    await api(`/v1/projects/${state.project.id}/models/${b.dataset.activate}/activate`, { method: "POST" });
    await openProject(state.project.id);
  }));
}

// --- threshold view: computed in the page ------------------------------------------------------------------------------
async function loadThreshold() {
  state.model = null;
  if (!state.project.active_version) { $("#guarantee").textContent = "Fit a model first."; return; }
  state.model = await api(`/v1/projects/${state.project.id}/models/${state.project.active_version}`);
  state.recent = (await api(`/v1/projects/${state.project.id}/predictions?limit=500`)).items;
  const slider = $("#threshold");
  const good = state.model.calibration_scores || [];
  const all = good.concat(state.recent.map((r) => r.score).filter((s) => s !== null));
  const nDefects = state.recent.filter((r) => r.reviewed_label === "defect").length;
  $("#threshold-counts").textContent = `${good.length} good calibration images, ${state.recent.length} recent predictions, ${nDefects} reviewed defects`;
  if (!all.length || state.model.threshold === null) return;
  slider.min = Math.min(...all); slider.max = Math.max(...all) * 1.05;
  slider.value = state.model.threshold;
  $("#guarantee").textContent = state.model.guarantee ? `The model's threshold is ${state.model.threshold.toPrecision(4)}: ${state.model.guarantee}.` : "";
  updateRates();
}

function rates(t) {
  const good = state.model.calibration_scores || [];
  const defects = state.recent.filter((r) => r.reviewed_label === "defect").map((r) => r.score);
  const frr = good.length ? good.filter((s) => s > t).length / good.length : null;
  const miss = defects.length ? defects.filter((s) => s <= t).length / defects.length : null;
  return { frr, miss, nGood: good.length, nDefects: defects.length };
}

function updateRates() {
  const t = Number($("#threshold").value);
  const r = rates(t);
  $("#threshold-value").textContent = t.toPrecision(4);
  $("#frr").textContent = r.frr === null ? "-" : `${(100 * r.frr).toFixed(1)}% of ${r.nGood}`;
  $("#miss").textContent = r.miss === null ? "no reviewed defects yet" : `${(100 * r.miss).toFixed(1)}% of ${r.nDefects}`;
  drawHistogram();
}
$("#threshold").addEventListener("input", updateRates);

function drawHistogram() {
  const canvas = $("#histogram"), ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!state.model || !(state.model.calibration_scores || []).length) return;
  const good = state.model.calibration_scores;
  const recent = state.recent.map((r) => r.score).filter((s) => s !== null);
  const defects = state.recent.filter((r) => r.reviewed_label === "defect").map((r) => r.score);
  const lo = Number($("#threshold").min), hi = Number($("#threshold").max), bins = 40;
  const count = (xs) => { const c = new Array(bins).fill(0); for (const x of xs) c[Math.min(bins - 1, Math.max(0, Math.floor((x - lo) / (hi - lo) * bins)))] += 1; return c; };
  const series = [[count(recent), "rgba(120,120,120,.45)"], [count(good), "rgba(40,150,60,.6)"], [count(defects), "rgba(190,40,40,.7)"]];
  const top = Math.max(1, ...series.flatMap(([c]) => c)), w = canvas.width / bins, h = canvas.height - 20;
  for (const [c, colour] of series) {
    ctx.fillStyle = colour;
    c.forEach((v, i) => ctx.fillRect(i * w, h - (v / top) * h, w - 1, (v / top) * h));
  }
  const x = (Number($("#threshold").value) - lo) / (hi - lo) * canvas.width;
  ctx.strokeStyle = "#000"; ctx.setLineDash([5, 4]); ctx.beginPath(); ctx.moveTo(x, 0); ctx.lineTo(x, h); ctx.stroke();
  ctx.setLineDash([]); ctx.fillStyle = "#000"; ctx.fillText(lo.toPrecision(3), 2, canvas.height - 4);
  ctx.fillText(hi.toPrecision(3), canvas.width - 40, canvas.height - 4);
}

// --- inspect ------------------------------------------------------------------------------------------------------------
$("#inspect-file").addEventListener("change", async (e) => {
  const file = e.target.files[0];
  if (!file) return;
  const form = new FormData();
  form.append("file", file, file.name);
  try {
    const r = await api(`/v1/projects/${state.project.id}/predict`, { method: "POST", body: form });
    const score = r.threshold !== null && r.threshold !== undefined ? `score ${r.score.toPrecision(4)} / threshold ${r.threshold.toPrecision(4)}`
      : `probability ${r.score.toFixed(3)}`;
    $("#result").innerHTML = `<span class="decision-${r.decision}" id="decision">${escapeHtml(r.decision)}</span> · ` +
      `<span id="label">${escapeHtml(r.label)}</span> · ${score}` + (r.reason ? ` · ${escapeHtml(r.reason)}` : "") + regionsText(r);
    $("#inspect-image").src = await imageUrl(r.heatmap_url || r.image_url);
    resetZoom();
    await loadThreshold();
    await loadReview();
  } catch (err) { $("#result").textContent = err.message; }
});

// An anomaly prediction's defect regions (their boxes are outlined in magenta on the heat map itself).
function regionsText(r) {
  if (!r.regions) return "";
  if (!r.regions.length) return ' · <span id="regions">no region above the threshold</span>';
  const big = r.regions[0];
  return ` · <span id="regions">${r.regions.length} region${r.regions.length > 1 ? "s" : ""} (outlined), largest ${big.area_px} px ` +
    `(${big.area_pct.toPrecision(3)} % of the image) at x ${big.x}, y ${big.y}, ${big.width} × ${big.height} px</span>`;
}

const zoom = { scale: 1, x: 0, y: 0, drag: null };
function applyZoom() { $("#inspect-image").style.transform = `translate(${zoom.x}px,${zoom.y}px) scale(${zoom.scale})`; }
function resetZoom() { Object.assign(zoom, { scale: 1, x: 0, y: 0 }); applyZoom(); }
$("#viewer").addEventListener("wheel", (e) => { e.preventDefault(); zoom.scale = Math.min(8, Math.max(1, zoom.scale * (e.deltaY < 0 ? 1.2 : 1 / 1.2))); applyZoom(); });
$("#viewer").addEventListener("mousedown", (e) => { zoom.drag = [e.clientX - zoom.x, e.clientY - zoom.y]; });
window.addEventListener("mouseup", () => { zoom.drag = null; });
window.addEventListener("mousemove", (e) => { if (zoom.drag) { zoom.x = e.clientX - zoom.drag[0]; zoom.y = e.clientY - zoom.drag[1]; applyZoom(); } });
$("#viewer").addEventListener("dblclick", resetZoom);

// --- review queue, from the keyboard --------------------------------------------------------------------------------------
function reviewLabels() { return state.project.task === "anomaly" ? ["good", "defect"] : state.project.classes.map((c) => c.name); }

function guess(item) {
  if (state.project.task === "anomaly") return item.score > item.threshold ? "defect" : "good";
  const probs = item.probabilities || {};
  return Object.keys(probs).sort((a, b) => probs[b] - probs[a])[0];
}

async function loadReview() {
  state.review = await api(`/v1/projects/${state.project.id}/review`);
  state.at = Math.min(state.at, Math.max(0, state.review.length - 1));
  $("#review-count").textContent = state.review.length ? `(${state.review.length})` : "";
  if (!$("#tab-review").hidden) renderReview();
}

async function renderReview() {
  const box = $("#review-item");
  $("#review-keys").innerHTML = reviewLabels().map((l) => `<li>${escapeHtml(l)}</li>`).join("");
  if (!state.review.length) { box.innerHTML = "<p>Nothing to review.</p>"; return; }
  const item = state.review[state.at];
  box.innerHTML = `<p id="review-position">${state.at + 1} of ${state.review.length}: ${escapeHtml(item.filename || item.image_sha256.slice(0, 12))}</p>` +
    `<p>The model's guess: <b id="review-guess">${escapeHtml(guess(item))}</b>` + (item.reason ? ` (${escapeHtml(item.reason)})` : "") + "</p><img alt='image to review'>";
  box.querySelector("img").src = await imageUrl(item.heatmap_url || item.image_url);
}

async function answer(label) {
  const item = state.review[state.at];
  if (!item) return;
  try {
    const r = await api(`/v1/predictions/${item.prediction_id}/review`, { method: "POST", headers: { "Content-Type": "application/json" },
                                                                           body: JSON.stringify({ label }) });
    const said = `${item.filename || item.prediction_id}: ${label}`;
    $("#review-status").textContent = said + (r.update_job ? " - updating the model" : r.needs_refit ? " - refit to learn from it" : "");
    if (r.update_job) reportUpdate(r.update_job.job_id, said);
  } catch (err) { $("#review-status").textContent = err.message; }
  await loadReview();
  renderReview();
}

// The model takes a reviewed image in the background (an update job); the queue never waits for it.
async function reportUpdate(jobId, said) {
  for (;;) {
    const job = await api(`/v1/jobs/${jobId}`);
    if (job.state === "done" || job.state === "failed") {
      $("#review-status").textContent = said + (job.state === "done" ? ` - model updated to v${job.model_version}` : ` - update failed: ${job.error}`);
      return;
    }
    await new Promise((r) => setTimeout(r, 300));
  }
}

document.addEventListener("keydown", (e) => {
  if ($("#tab-review").hidden || e.target.tagName === "INPUT" || e.target.tagName === "TEXTAREA") return;
  const item = state.review[state.at];
  if (e.key === "a" && item) answer(guess(item));
  else if (/^[1-9]$/.test(e.key) && reviewLabels()[Number(e.key) - 1]) answer(reviewLabels()[Number(e.key) - 1]);
  else if (e.key === "j") { state.at = Math.min(state.at + 1, state.review.length - 1); renderReview(); }
  else if (e.key === "k") { state.at = Math.max(state.at - 1, 0); renderReview(); }
});

if (state.token) signIn(state.token);

// --- monitor: yield per hour, the score chart with its control limits, the alarms --------------------------------
$("#monitor-since").addEventListener("change", () => loadMonitor());
$("#monitor-reset").addEventListener("click", async () => {
  await api(`/v1/projects/${state.project.id}/monitor/reset`, { method: "POST" });
  loadMonitor();
});
$("#shift-report").addEventListener("click", async () => {  // fetched with the token, saved as one HTML file
  const since = $("#monitor-since").value || "all";
  const html = await api(`/v1/projects/${state.project.id}/report?since=${encodeURIComponent(since)}`);
  const a = document.createElement("a");
  a.href = URL.createObjectURL(html);
  a.download = `shift-report-${state.project.name.replace(/[^A-Za-z0-9_-]+/g, "_")}.html`;
  document.body.appendChild(a); a.click(); a.remove();
});

async function loadMonitor() {
  const since = $("#monitor-since").value;
  const m = await api(`/v1/projects/${state.project.id}/monitor` + (since ? `?since=${encodeURIComponent(since)}` : ""));
  state.monitor = m;
  const n = Object.values(m.counts).reduce((a, b) => a + b, 0);
  const yieldText = m.yield === null ? "no yield yet" : `yield ${(100 * m.yield).toFixed(1)}%`;
  const latency = m.latency_ms ? `, latency p50 ${m.latency_ms.p50.toFixed(0)} ms / p95 ${m.latency_ms.p95.toFixed(0)} ms` : "";
  const open = m.alarms.filter((a) => !a.acknowledged_at).length;
  $("#monitor-summary").textContent = `${n} predictions, ${yieldText}${latency}; ${m.alarms.length} alarms (${open} open)`;
  drawYield(m.per_hour);
  drawScores(m);
  $("#alarm-list").innerHTML = m.alarms.map((a) => `<li data-alarm="${a.id}"><b>${escapeHtml(a.kind)}</b> ` +
    `${escapeHtml(a.created_at)} (prediction ${a.prediction_id}): ${escapeHtml(a.message)} ` +
    (a.acknowledged_at ? `<span class="muted">acknowledged ${escapeHtml(a.acknowledged_at)}</span>`
                       : `<button class="ack" data-alarm="${a.id}">Acknowledge</button>`) + "</li>").join("");
  document.querySelectorAll("#alarm-list button.ack").forEach((b) => b.addEventListener("click", async () => {
    b.disabled = true;
    await api(`/v1/alarms/${b.dataset.alarm}/acknowledge`, { method: "POST" });
    loadMonitor();
  }));
}

function drawYield(hours) {
  const canvas = $("#yield-chart"), ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!hours.length) return;
  const w = canvas.width / Math.max(hours.length, 1), h = canvas.height - 16;
  hours.forEach((hour, i) => {
    ctx.fillStyle = hour.yield >= 0.95 ? "#3a3" : hour.yield >= 0.8 ? "#ca3" : "#c33";
    ctx.fillRect(i * w + 1, h - hour.yield * h, w - 2, hour.yield * h);
  });
  ctx.fillStyle = "#000";
  ctx.fillText(hours[0].hour.slice(0, 16), 2, canvas.height - 3);
}

function drawScores(m) {
  const canvas = $("#score-chart"), ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!m.monitor || !m.monitor.series.score.length) return;
  const s = m.monitor.series, n = s.score.length;
  const values = s.score.concat(s.ewma_upper, s.ewma_lower, m.monitor.threshold === null ? [] : [m.monitor.threshold]);
  const lo = Math.min(...values), hi = Math.max(...values), span = hi - lo || 1;
  const x = (i) => (n === 1 ? 0.5 : i / (n - 1)) * (canvas.width - 10) + 5;
  const y = (v) => canvas.height - 5 - (v - lo) / span * (canvas.height - 10);
  ctx.fillStyle = "#555";
  s.score.forEach((v, i) => ctx.fillRect(x(i) - 1, y(v) - 1, 3, 3));
  const line = (key, dash) => {
    ctx.setLineDash(dash); ctx.strokeStyle = "#8e44ad"; ctx.beginPath();
    s[key].forEach((v, i) => (i ? ctx.lineTo(x(i), y(v)) : ctx.moveTo(x(i), y(v)))); ctx.stroke();
  };
  line("ewma", []); line("ewma_upper", [4, 3]); line("ewma_lower", [4, 3]);
  ctx.setLineDash([]);
  if (m.monitor.threshold !== null) {
    ctx.strokeStyle = "#c0392b"; ctx.beginPath();
    ctx.moveTo(0, y(m.monitor.threshold)); ctx.lineTo(canvas.width, y(m.monitor.threshold)); ctx.stroke();
  }
  const index = new Map(s.prediction_id.map((id, i) => [id, i]));
  ctx.strokeStyle = "rgba(192,57,43,0.7)";
  m.alarms.filter((a) => index.has(a.prediction_id)).forEach((a) => {
    const i = index.get(a.prediction_id);
    ctx.beginPath(); ctx.moveTo(x(i), 0); ctx.lineTo(x(i), canvas.height); ctx.stroke();
  });
}
