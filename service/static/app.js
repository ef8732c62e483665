"use strict";
// scaletune web page: studies list and a live study page. Plain JS, no dependencies (the server may be offline).

const PAGE = 20;
const FINISHED = ["completed", "failed", "cancelled"];
const DONE_STATES = ["complete", "pruned", "diverged", "failed"];
const TRIALS_PER_REQUEST = 1000;
const MAX_TRIALS_LOADED = 5000;
const $ = (selector) => document.querySelector(selector);

const state = { studiesOffset: 0, studyId: null, study: null, trials: [], trialsOffset: 0, sortKey: "number", sortAsc: true,
                source: null, refreshTimer: null, listTimer: null, plotsDrawnAt: null };

// ---- HTTP ----
function token() { return localStorage.getItem("scaletune_token") || ""; }

function saveToken(value) {
  localStorage.setItem("scaletune_token", value);
  // EventSource and <img> cannot send headers; the server also reads the token from this cookie.
  document.cookie = `scaletune_token=${encodeURIComponent(value)}; path=/; SameSite=Strict`;
}

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (token()) headers.Authorization = `Bearer ${token()}`;
  const response = await fetch(path, { ...options, headers });
  if (!response.ok) {
    let detail = response.statusText;
    try {
      detail = (await response.json()).detail || detail;  // a problem document (RFC 9457): detail is for people
    } catch (_) { /* not JSON */ }
    const error = new Error(detail);
    error.status = response.status;
    throw error;
  }
  return response;
}

function showError(message) {
  const box = $("#error");
  box.textContent = message || "";
  box.hidden = !message;
}

function fmt(value) { return value === null || value === undefined ? "–" : Number(value).toPrecision(4); }

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

// ---- studies list ----
async function showStudies() {
  try {
    const page = await (await api(`/v1/studies?limit=${PAGE}&offset=${state.studiesOffset}`)).json();
    const body = $("#studies-table tbody");
    body.replaceChildren();
    for (const s of page.items) {
      const row = body.insertRow();
      const link = document.createElement("a");
      link.href = `#/study/${s.id}`;
      link.textContent = s.name;
      row.insertCell().append(link);
      cell(row, s.kind);
      cell(row, s.status, `state-${s.status}`);
      cell(row, s.n_trials);
      cell(row, fmt(s.best_value));
      cell(row, new Date(s.created_at).toLocaleString());
    }
    $("#studies-range").textContent = page.total
      ? `${page.offset + 1}–${page.offset + page.items.length} of ${page.total}` : "no studies yet";
    $("#studies-prev").disabled = page.offset === 0;
    $("#studies-next").disabled = page.offset + page.items.length >= page.total;
    showError("");
  } catch (error) { showError(error.message); }
}

// ---- study page ----
function renderStudy(study) {
  const total = study.spec.n_trials;
  const done = Math.min(total, DONE_STATES.reduce((n, s) => n + (study.trial_counts[s] || 0), 0));
  $("#study-name").textContent = `${study.name} (${study.kind})`;
  $("#study-id").textContent = study.id;
  const status = $("#study-status");
  status.textContent = study.status;
  status.className = `state-${study.status}`;
  $("#progress-text").textContent = `${done}/${total}`;
  $("#progress").max = total;
  $("#progress").value = done;
  $("#best-value").textContent = fmt(study.best_value);
  $("#best-params").textContent = study.best_params ? JSON.stringify(study.best_params) : "–";
  if (study.error) showError(study.error);
  if (FINISHED.includes(study.status)) stopFollowing();  // a finished study has no live stream to wait for
}

async function loadTrials(studyId) {
  const loaded = [];
  for (let offset = 0; offset < MAX_TRIALS_LOADED; offset += TRIALS_PER_REQUEST) {
    const page = await (await api(`/v1/studies/${studyId}/trials?limit=${TRIALS_PER_REQUEST}&offset=${offset}`))
      .json();
    loaded.push(...page.items);
    if (offset + page.items.length >= page.total) break;
  }
  state.trials = loaded;
  renderTrials();
}

function sortValue(trial, key) {
  if (key === "step") return trial.intermediate.length ? trial.intermediate.at(-1).step : null;
  if (key === "params") return JSON.stringify(trial.params || {});
  return trial[key];
}

function renderTrials() {
  const { sortKey, sortAsc } = state;
  const sorted = [...state.trials].sort((a, b) => {
    const x = sortValue(a, sortKey), y = sortValue(b, sortKey);
    if (x === y) return 0;
    if (x === null || x === undefined) return 1;  // missing values last either way
    if (y === null || y === undefined) return -1;
    return (x < y ? -1 : 1) * (sortAsc ? 1 : -1);
  });
  const start = Math.min(state.trialsOffset, Math.max(0, sorted.length - 1));
  const body = $("#trials-table tbody");
  body.replaceChildren();
  for (const t of sorted.slice(start, start + PAGE)) {
    const row = body.insertRow();
    cell(row, t.number ?? "–");
    cell(row, t.attempt);
    cell(row, t.state, `state-${t.state}`).title = t.failure_reason || "";
    cell(row, fmt(t.value));
    cell(row, t.params ? JSON.stringify(t.params) : "–", "params");
    cell(row, sortValue(t, "step") ?? "–");
    cell(row, t.duration_s === null ? "–" : t.duration_s.toFixed(1));
  }
  for (const th of document.querySelectorAll("#trials-table th")) {
    th.classList.toggle("sorted-asc", th.dataset.sort === sortKey && sortAsc);
    th.classList.toggle("sorted-desc", th.dataset.sort === sortKey && !sortAsc);
  }
  $("#trials-range").textContent = sorted.length
    ? `${start + 1}–${Math.min(start + PAGE, sorted.length)} of ${sorted.length}` : "no trials yet";
  $("#trials-prev").disabled = start === 0;
  $("#trials-next").disabled = start + PAGE >= sorted.length;
}

function clearPlot(img) {
  if (img.src) URL.revokeObjectURL(img.src);
  img.removeAttribute("src");
}

function studyPlots(study, fixed) {
  // The plots of this study's kind; `fixed` ones (the coordinate check) do not change as trials end.
  const figures = [...document.querySelectorAll(".plots figure")];
  for (const figure of figures) figure.hidden = !figure.dataset.studyKind.split(" ").includes(study.kind);
  return figures.filter((f) => !f.hidden && ("fixed" in f.dataset) === fixed);
}

async function loadPlots(studyId, figures) {
  for (const figure of figures) {
    const img = figure.querySelector("img"), caption = figure.querySelector("figcaption");
    try {
      const blob = await (await api(`/v1/studies/${studyId}/plots/${figure.dataset.kind}.png`)).blob();
      clearPlot(img);
      img.src = URL.createObjectURL(blob);
      caption.textContent = "";
    } catch (error) {
      clearPlot(img);
      caption.textContent = error.message;
    }
  }
}

async function refreshStudy(studyId) {
  try {
    const study = await (await api(`/v1/studies/${studyId}`)).json();
    if (state.studyId !== studyId) return null;  // the user moved on while this was in flight
    state.study = study;
    renderStudy(study);
    await loadTrials(studyId);
    const done = DONE_STATES.map((s) => study.trial_counts[s] || 0).join(",");
    if (done !== state.plotsDrawnAt) {  // plots change only when a trial ends
      const first = state.plotsDrawnAt === null;
      state.plotsDrawnAt = done;
      if (first) for (const img of document.querySelectorAll(".plots img")) clearPlot(img);  // the last study's
      await loadPlots(studyId, studyPlots(study, false));
      if (first) await loadPlots(studyId, studyPlots(study, true));
    }
    return study;
  } catch (error) { showError(error.message); return null; }
}

function scheduleRefresh(studyId) {
  // Events can arrive in bursts; refresh at most every second.
  if (state.refreshTimer) return;
  state.refreshTimer = setTimeout(() => { state.refreshTimer = null; refreshStudy(studyId); }, 1000);
}

function renderRunning(running) {
  const list = $("#running");
  list.replaceChildren();
  for (const [id, info] of Object.entries(running)) {
    const item = document.createElement("li");
    // A worker's trial reports its eval loss; an external trial's own code reports a value.
    const [label, value] = "value" in info ? ["value", info.value] : ["eval loss", info.eval_loss];
    item.textContent = `running ${id.slice(0, 8)}: step ${info.step ?? 0}, ${label} ${fmt(value)}`;
    list.append(item);
  }
}

function stopFollowing() {
  if (state.source) { state.source.close(); state.source = null; }
  $("#live-state").textContent = "finished";
  renderRunning({});
}

function follow(studyId) {
  const running = {};
  const source = new EventSource(`/v1/studies/${studyId}/events`);
  state.source = source;
  $("#live-state").textContent = "connecting";
  source.onopen = () => { $("#live-state").textContent = "live"; };
  source.onerror = () => { $("#live-state").textContent = "reconnecting"; };
  const handle = (event) => {
    const data = JSON.parse(event.data);
    if (data.type === "trial_started") running[data.trial_id] = { step: 0 };
    if (data.type === "trial_reported") running[data.trial_id] = data.payload;
    if (data.type === "trial_finished") delete running[data.trial_id];
    renderRunning(running);
    if (data.type === "study_finished") {
      stopFollowing();  // the server ends the stream; without close() EventSource would reconnect forever
      refreshStudy(studyId);
    } else {
      scheduleRefresh(studyId);
    }
  };
  for (const type of ["trial_started", "trial_reported", "trial_finished", "study_finished"]) {
    source.addEventListener(type, handle);
  }
}

async function showStudy(studyId) {
  state.studyId = studyId;
  state.trials = [];
  state.trialsOffset = 0;
  state.plotsDrawnAt = null;
  $("#live-state").textContent = "–";  // until the study says whether there is anything to follow
  const study = await refreshStudy(studyId);
  if (study && !FINISHED.includes(study.status) && state.studyId === studyId) follow(studyId);
}

async function submitTransfer(event) {
  event.preventDefault();
  const form = new FormData(event.target);
  const target = { width: Number(form.get("width")), depth: Number(form.get("depth")) };
  if (form.get("patch_size")) target.patch_size = Number(form.get("patch_size"));
  const body = { target };
  for (const key of ["batch_size", "steps"]) if (form.get(key)) body[key] = Number(form.get(key));
  if (form.get("batch_rule")) body.batch_rule = form.get("batch_rule");
  const result = $("#transfer-result");
  try {
    const plan = await (await api(`/v1/studies/${state.study.id}/transfer`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) })).json();
    const link = document.createElement("a");
    link.href = URL.createObjectURL(new Blob([JSON.stringify(plan, null, 2)], { type: "application/json" }));
    link.download = `transfer-plan-${state.study.id}-w${target.width}-d${target.depth}.json`;
    link.click();
    result.textContent = `plan downloaded: ${(plan.groups || []).length} parameter groups` +
      ((plan.warnings || []).length ? `; warnings: ${plan.warnings.join(" ")}` : "");
  } catch (error) {
    result.textContent = error.status === 404 && error.message === "Not Found"
      ? "this server has no transfer endpoint" : error.message;
  }
}

// ---- routing ----
function route() {
  if (state.source) { state.source.close(); state.source = null; }
  state.studyId = null;
  clearInterval(state.listTimer);
  showError("");
  const match = location.hash.match(/^#\/study\/([^/]+)$/);
  $("#studies-view").hidden = Boolean(match);
  $("#study-view").hidden = !match;
  if (match) {
    showStudy(decodeURIComponent(match[1]));
  } else {
    showStudies();
    state.listTimer = setInterval(showStudies, 5000);
  }
}

function init() {
  $("#token").value = token();
  $("#token").addEventListener("change", (event) => { saveToken(event.target.value.trim()); route(); });
  $("#studies-prev").onclick = () => { state.studiesOffset = Math.max(0, state.studiesOffset - PAGE); showStudies(); };
  $("#studies-next").onclick = () => { state.studiesOffset += PAGE; showStudies(); };
  $("#trials-prev").onclick = () => { state.trialsOffset = Math.max(0, state.trialsOffset - PAGE); renderTrials(); };
  $("#trials-next").onclick = () => { state.trialsOffset += PAGE; renderTrials(); };
  for (const th of document.querySelectorAll("#trials-table th[data-sort]")) {
    th.onclick = () => {
      state.sortAsc = state.sortKey === th.dataset.sort ? !state.sortAsc : true;
      state.sortKey = th.dataset.sort;
      state.trialsOffset = 0;
      renderTrials();
    };
  }
  $("#transfer-form").addEventListener("submit", submitTransfer);
  window.addEventListener("hashchange", route);
  route();
}

init();
