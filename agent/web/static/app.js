// Coilsight's page: the live coil over Server-Sent Events, past coils, image upload.
// Plain DOM, no build step; every text goes in through textContent (never innerHTML).
"use strict";

// Same colours, same order as the overlays of `coilsight inspect` (agent/tools/inspect.py PALETTE).
const PALETTE = ["#e6194b", "#3cb44b", "#ffe119", "#0082c8", "#f58230", "#911eb4", "#46f0f0", "#f032e6",
                 "#d2f53c", "#fabed4"];
const SVG_NS = "http://www.w3.org/2000/svg";
const MAP_W = 1000, MAP_H = 220, LATEST = 50;

const live = { config: null, coil: null, defects: [], seqs: new Set(), summary: null, progress: null,
               periodic: [], classes: [] };
let drawPending = false;

const $ = (id) => document.getElementById(id);

function el(tag, text, attrs) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}

function colour(d) {
  let k = typeof d.class_id === "number" ? d.class_id : live.classes.indexOf(d.class);
  if (k < 0) k = 0;
  return PALETTE[k % PALETTE.length];
}

function fmt(x, digits) {
  return typeof x === "number" && isFinite(x) ? x.toFixed(digits) : "–";
}

// -- live coil ------------------------------------------------------------------------------
function reset(coil) {
  live.coil = coil;
  live.defects = [];
  live.seqs = new Set();
  live.summary = null;
  live.progress = null;
  live.periodic = [];
}

function addDefect(d) {
  if (d.coil !== live.coil) reset(d.coil);
  if (live.seqs.has(d.seq)) return;  // the snapshot and the stream may both carry it
  live.seqs.add(d.seq);
  live.defects.push(d);
  if (live.defects.length > 5000) live.defects.shift();
}

function onSnapshot(s) {
  live.config = s.config;
  live.classes = (s.config && s.config.classes) || [];
  reset(s.coil);
  for (const d of s.defects || []) addDefect(d);
  live.summary = s.summary;
  live.progress = s.progress;
  live.periodic = s.periodic || [];
  if (s.health) onHealth(s.health);
  $("upload-off").hidden = !!(s.config && s.config.upload);
  $("upload-form").hidden = !(s.config && s.config.upload);
  loadCoils();  // with the config known: the report links
  scheduleDraw();
}

function onSummary(s) {
  if (s.coil !== live.coil) {
    const done = !live.coil || (live.summary && live.summary.final);
    if (s.final && !done) { loadCoils(); return; }
    reset(s.coil);
  }
  live.summary = s;
  if (s.final) loadCoils();
  scheduleDraw();
}

function onTrack(t) {
  if (t.coil !== live.coil) return;
  const seqs = new Set(t.event_seqs || []);
  for (const d of live.defects) {
    if (seqs.has(d.seq)) {
      d.track_id = t.track_id;
      if (t.crop_url) d.crop_url = t.crop_url;
    }
  }
  scheduleDraw();
}

function onPeriodic(p) {
  if (p.coil !== live.coil) return;
  live.periodic.push(p);
  scheduleDraw();
}

function onProgress(p) {
  if (p.coil !== live.coil) reset(p.coil);
  live.progress = p;
  scheduleDraw();
}

function onHealth(h) {
  $("agent-line").textContent = `${h.agent || "agent"} ${h.state || "?"}: profile ${h.profile || "?"}, ` +
    `${h.inferred ?? 0} frames inferred, queue ${h.queue_depth ?? 0}`;
}

function scheduleDraw() {
  if (drawPending) return;
  drawPending = true;
  requestAnimationFrame(() => { drawPending = false; draw(); });
}

function stripWidthMm() {
  let w = 0;
  const c = live.config;
  if (c && c.frame_width_px) {  // the cameras' frames side by side, from the agent's config
    for (const cam of c.cameras || []) w = Math.max(w, cam.offset_x_mm + c.frame_width_px * cam.mm_per_px_x);
  }
  for (const d of live.defects) w = Math.max(w, (d.across_mm || 0) + (d.width_mm || 0) / 2);
  return Math.max(w * 1.05, 100);
}

function coilLengthMm() {
  let l = 0;
  if (live.progress && live.progress.length_mm) l = live.progress.length_mm;
  if (live.summary && live.summary.length_mm) l = Math.max(l, live.summary.length_mm);
  for (const d of live.defects) l = Math.max(l, (d.along_mm || 0) + (d.length_mm || 0) / 2);
  return Math.max(l, 1000);
}

function draw() {
  $("coil-name").textContent = live.coil || "none yet";
  const s = live.summary;
  const state = !live.coil ? "" : s && s.final ? (s.complete ? "complete" : "incomplete") : "open";
  const badge = $("coil-state");
  badge.textContent = state;
  badge.dataset.state = state;
  const g = s && s.grade;  // the coil layer's grade (issue 19), when the agent grades
  const gradeEl = $("coil-grade");
  gradeEl.textContent = g && g.grade ? `grade ${g.grade}: ${g.reason || ""}` : "";
  gradeEl.dataset.grade = (g && g.grade) || "";

  // strip map: along the coil left to right, across top to bottom
  const svg = $("strip-map");
  const lengthMm = coilLengthMm(), widthMm = stripWidthMm();
  const sx = MAP_W / lengthMm, sy = MAP_H / widthMm;
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  for (const d of live.defects) {
    const w = Math.max(3, (d.length_mm || 0) * sx), h = Math.max(3, (d.width_mm || 0) * sy);
    const r = document.createElementNS(SVG_NS, "rect");
    r.setAttribute("x", ((d.along_mm || 0) * sx - w / 2).toFixed(1));
    r.setAttribute("y", ((d.across_mm || 0) * sy - h / 2).toFixed(1));
    r.setAttribute("width", w.toFixed(1));
    r.setAttribute("height", h.toFixed(1));
    r.setAttribute("fill", colour(d));
    r.setAttribute("class", "defect");
    r.setAttribute("data-class", d.class);
    r.setAttribute("data-seq", d.seq);
    const t = document.createElementNS(SVG_NS, "title");
    t.textContent = `${d.class} ${fmt(d.confidence, 2)} at ${fmt(d.along_mm / 1000, 2)} m`;
    r.appendChild(t);
    svg.appendChild(r);
  }
  svg.setAttribute("data-count", String(live.defects.length));
  svg.setAttribute("data-coil", live.coil || "");
  $("map-scale").textContent = `${fmt(lengthMm / 1000, 1)} m along (left to right) × ${fmt(widthMm, 0)} mm across`;

  // counts against the budget
  const counts = {};
  for (const d of live.defects) counts[d.class] = (counts[d.class] || 0) + 1;
  const names = live.classes.length ? live.classes : Object.keys(counts).sort();
  const tbody = $("counts").querySelector("tbody");
  tbody.replaceChildren();
  const metres = coilLengthMm() / 1000;
  for (const name of names) {
    const tr = el("tr");
    const td = el("td");
    const sw = el("span", null, { class: "swatch" });
    sw.style.background = colour({ class: name });
    td.append(sw, document.createTextNode(name));
    tr.append(td, el("td", counts[name] || 0, { class: "num", "data-class": name }),
              el("td", fmt((counts[name] || 0) / metres, 3), { class: "num" }));
    tbody.append(tr);
  }
  const budget = $("budget");
  budget.replaceChildren();
  const budgetS = (live.config && live.config.budget_s) || null;
  const p = live.progress, f = (s && s.frames) || (p && p.frames);
  if (f) {
    budget.append(el("span", `${f.received ?? 0} frames received, ${f.inspected ?? 0} inspected, ` +
                                `${f.gated_out ?? 0} gated out, ${f.rejected ?? 0} rejected, ${f.missing ?? 0} missing`));
  }
  const wall = (s && s.timing && s.timing.wall_s) ?? (p && p.wall_s);
  if (typeof wall === "number" && budgetS) {
    const over = wall > budgetS;
    budget.append(el("span", `${fmt(wall, 1)} s of the ${fmt(budgetS, 0)} s coil budget` + (over ? " (over)" : ""),
                     { id: "budget-time", "data-over": String(over) }));
  }
  budget.append(el("span", `${live.defects.length} defects`, { id: "defect-total" }));

  // latest events, newest first
  const lt = $("latest").querySelector("tbody");
  lt.replaceChildren();
  for (const d of live.defects.slice(-LATEST).reverse()) {
    const tr = el("tr");
    const cls = el("td");
    const sw = el("span", null, { class: "swatch" });
    sw.style.background = colour(d);
    cls.append(sw, document.createTextNode(d.class));
    const crop = el("td");
    if (d.crop_url && d.crop_url.startsWith("/crops/")) {  // a URL the page's server made
      const img = el("img", null, { alt: `crop of track ${d.track_id ?? ""}`, src: d.crop_url, class: "crop" });
      img.addEventListener("error", () => img.remove());  // deleted by the agent's retention: no broken icon
      crop.append(img);
    }
    tr.append(el("td", d.seq, { class: "num" }), cls, el("td", fmt(d.confidence, 2), { class: "num" }),
              el("td", fmt(d.along_mm / 1000, 2), { class: "num" }), el("td", fmt(d.across_mm, 0), { class: "num" }),
              el("td", `${fmt(d.width_mm, 0)} × ${fmt(d.length_mm, 0)}`), el("td", `${d.camera} / ${d.index}`), crop);
    lt.append(tr);
  }
  const per = $("periodic");
  per.replaceChildren();
  for (const p of live.periodic) {
    per.append(el("li", `${p.class}: ${p.count} marks ${fmt(p.pitch_mm, 0)} mm apart at ${fmt(p.across_mm, 0)} mm ` +
                        `across (roll Ø ${fmt(p.roll_diameter_mm, 0)} mm)`));
  }
  $("periodic-box").hidden = live.periodic.length === 0;
  const legend = $("legend");
  legend.replaceChildren();
  for (const name of names) {
    const item = el("span");
    const sw = el("span", null, { class: "swatch" });
    sw.style.background = colour({ class: name });
    item.append(sw, document.createTextNode(name));
    legend.append(item);
  }
}

// -- stream ---------------------------------------------------------------------------------
function connect() {
  const src = new EventSource("/events");
  const badge = $("stream-state");
  const setState = (s) => { badge.dataset.state = s; badge.textContent = `stream: ${s}`; };
  src.onopen = () => setState("live");
  src.onerror = () => setState("lost");  // EventSource reconnects by itself, to a fresh snapshot
  src.addEventListener("snapshot", (e) => onSnapshot(JSON.parse(e.data)));
  src.addEventListener("defect", (e) => { addDefect(JSON.parse(e.data).defect); scheduleDraw(); });
  src.addEventListener("summary", (e) => onSummary(JSON.parse(e.data).summary));
  src.addEventListener("progress", (e) => onProgress(JSON.parse(e.data).progress));
  src.addEventListener("track", (e) => onTrack(JSON.parse(e.data).track));
  src.addEventListener("periodic", (e) => onPeriodic(JSON.parse(e.data).periodic));
  src.addEventListener("health", (e) => onHealth(JSON.parse(e.data).health));
}

// -- past coils -----------------------------------------------------------------------------
async function loadCoils() {
  const r = await fetch("/api/coils");
  if (!r.ok) return;
  const data = await r.json();
  const tbody = $("coils").querySelector("tbody");
  tbody.replaceChildren();
  for (const s of data.coils) {
    const t = s.timing || {};
    const tr = el("tr", null, { "data-coil": s.coil });
    const result = (s.complete ? "complete" : "INCOMPLETE") + (s.grade && s.grade.grade ? `, ${s.grade.grade}` : "");
    tr.append(el("td", s.coil), el("td", result), el("td", s.end_reason),
              el("td", s.defect_count, { class: "num" }), el("td", fmt((s.length_mm || 0) / 1000, 2), { class: "num" }),
              el("td", `${fmt(t.wall_s, 1)} / ${fmt(t.budget_s, 0)}`, { class: "num" }));
    if (live.config && live.config.reports) {
      const td = el("td");
      td.append(el("a", "report", { href: `/report/${encodeURIComponent(s.coil)}`, target: "_blank",
                                    rel: "noopener", class: "report-link" }));
      tr.append(td);
    }
    tr.addEventListener("click", () => showCoil(s.coil));
    tbody.append(tr);
  }
}

async function showCoil(name) {
  const r = await fetch(`/api/coils/${encodeURIComponent(name)}`);
  const box = $("coil-detail");
  box.hidden = false;
  $("coil-detail-name").textContent = name;
  $("coil-detail-json").textContent = r.ok ? JSON.stringify(await r.json(), null, 2) : `not found (${r.status})`;
}

// -- upload ---------------------------------------------------------------------------------
async function upload(ev) {
  ev.preventDefault();
  const file = $("upload-file").files[0];
  const status = $("upload-status");
  if (!file) { status.textContent = "choose a PNG or JPEG first"; return; }
  const max = (live.config && live.config.max_upload_bytes) || Infinity;
  if (file.size > max) { status.textContent = `the file is ${file.size} bytes, over the page's ${max}`; return; }
  status.textContent = "inspecting…";
  $("upload-go").disabled = true;
  try {
    const r = await fetch("/api/inspect", { method: "POST", body: file,
      headers: { "Content-Type": file.type || "application/octet-stream",
                 "X-File-Name": file.name.replace(/[^\x20-\x7e]/g, "_") } });
    const data = await r.json();
    if (!r.ok) { status.textContent = `refused: ${data.error || r.status}`; return; }
    $("overlay").src = `data:image/png;base64,${data.overlay_png}`;
    const shown = Object.assign({}, data);
    delete shown.overlay_png;
    $("upload-json").textContent = JSON.stringify(shown, null, 2);
    $("upload-result").hidden = false;
    status.textContent = `${data.events.length} defect(s), gate score ${fmt(data.gate_score, 3)}`;
    status.dataset.events = String(data.events.length);
  } catch (e) {
    status.textContent = `failed: ${e}`;
  } finally {
    $("upload-go").disabled = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("upload-form").addEventListener("submit", upload);
  $("coils-refresh").addEventListener("click", loadCoils);
  connect();
});
