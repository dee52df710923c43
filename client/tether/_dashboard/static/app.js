// Tether dashboard. The fleet arrives over server-sent events (no polling); halts, audit and
// the ledger are re-read when an event says something changed. Every value from the server
// goes into the page as text, never as HTML.
"use strict";

const CSRF = document.querySelector('meta[name="csrf-token"]').content;
const TENANT = document.querySelector('meta[name="tether-tenant"]').content;
const STATES = ["ACTIVE", "KILLED", "STALE", "EXITED"];
const $ = (id) => document.getElementById(id);

const fleet = new Map();   // key -> row, as the server sent it
let clockOffset = 0;       // server time minus this browser's, from each snapshot
let canAct = false;        // until WhoAmI says otherwise, show no kill or resume controls

// ---- helpers ---------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function age(iso) {
  if (!iso) return "never";
  const seconds = Math.max(0, (Date.now() + clockOffset - Date.parse(iso)) / 1000);
  if (seconds < 10) return `${seconds.toFixed(1)}s ago`;
  if (seconds < 60) return `${Math.floor(seconds)}s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)}m ${Math.floor(seconds % 60)}s ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)}h ${Math.floor((seconds % 3600) / 60)}m ago`;
  return `${Math.floor(seconds / 86400)}d ago`;
}

function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "";
}

async function api(path, body) {
  const options = body === undefined ? {} : {
    method: "POST",
    headers: { "content-type": "application/json", "x-tether-csrf": CSRF },
    body: JSON.stringify(body),
  };
  const response = await fetch(path, { credentials: "same-origin", ...options });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    throw new Error(`${response.status} ${data.status || ""}: ${data.error || response.statusText}`);
  }
  return data;
}

function say(id, text, ok) {
  const node = $(id);
  node.textContent = text;
  node.className = `result ${ok ? "ok" : "error"}`;
}

let refreshTimer = null;
function refreshSoon() {   // many events, one re-read
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(() => { loadHalts(); loadAudit(); loadEffects(true); }, 300);
}

// ---- identity --------------------------------------------------------------------------

async function loadMe() {
  try {
    const me = await api("/api/whoami");
    canAct = me.can_act;
    $("me").textContent = me.role ? `${me.id} (${me.role})` : me.id;
  } catch (err) {
    canAct = false;
    $("me").textContent = `who am I? ${err.message}`;
  }
  document.body.classList.toggle("read-only", !canAct);
  $("readonly").hidden = canAct;
  renderFleet();
  loadHalts();
}

// ---- the fleet, live -------------------------------------------------------------------

function fleetRow(row) {
  const checkpoint = row.checkpoint ? JSON.stringify(row.checkpoint) : "";
  const cells = [
    el("td", { text: row.tenant }),
    el("td", { text: row.agent }),
    el("td", { class: "mono", text: row.run_id }),
    el("td", { class: "mono", text: row.instance_id }),
    el("td", {}, el("span", { class: `state ${row.state}`, text: row.state })),
    el("td", { class: "age", "data-at": row.last_heartbeat || "", text: age(row.last_heartbeat) }),
    el("td", { class: "mono checkpoint", text: checkpoint, title: checkpoint }),
    el("td", { text: (row.halts || []).join("; ") }),
  ];
  const act = el("td", { class: "act" });
  if (canAct && row.state !== "KILLED" && row.state !== "EXITED") {
    act.append(el("button", { class: "small danger", text: "Kill…", type: "button",
                              onclick: () => prefillKill(row) }));
  }
  return el("tr", { class: `row-${row.state}`, "data-key": row.key, "data-state": row.state },
            ...cells, act);
}

let renderPending = false;
function renderSoon() {   // many events, one render per frame
  if (renderPending) return;
  renderPending = true;
  requestAnimationFrame(() => { renderPending = false; renderFleet(); });
}

function renderFleet() {
  const showExited = $("show-exited").checked;
  const rows = [...fleet.values()]
    .filter((r) => showExited || r.state !== "EXITED")
    .sort((a, b) => STATES.indexOf(a.state) - STATES.indexOf(b.state)
      || a.tenant.localeCompare(b.tenant) || a.agent.localeCompare(b.agent)
      || a.run_id.localeCompare(b.run_id) || a.instance_id.localeCompare(b.instance_id));
  $("fleet").tBodies[0].replaceChildren(...rows.map(fleetRow));
  $("fleet-empty").hidden = rows.length > 0;
  const counts = STATES.map((s) => [s, [...fleet.values()].filter((r) => r.state === s).length]);
  $("counts").textContent = counts.filter(([, n]) => n).map(([s, n]) => `${n} ${s}`).join(" · ");
  if (!$("effects-tenant").value && fleet.size) {
    $("effects-tenant").value = TENANT || [...fleet.values()][0].tenant;
    loadEffects(true);
  }
}

function showLink(link) {
  const node = $("link");
  node.className = `link ${link.connected ? "up" : "down"}`;
  node.textContent = link.connected
    ? `live: ${link.coordinator}`
    : `disconnected${link.coordinator ? ` from ${link.coordinator}` : ""}: ${link.error}`;
}

function listen() {
  const events = new EventSource("/api/events");
  events.addEventListener("snapshot", (e) => {
    const data = JSON.parse(e.data);
    clockOffset = Date.parse(data.now) - Date.now();
    fleet.clear();
    for (const row of data.rows) fleet.set(row.key, row);
    showLink(data.link);
    renderSoon();
    refreshSoon();
  });
  events.addEventListener("agent", (e) => {
    const row = JSON.parse(e.data);
    const before = fleet.get(row.key);
    fleet.set(row.key, row);
    renderSoon();
    if (!before || before.state !== row.state) refreshSoon();
  });
  events.addEventListener("link", (e) => showLink(JSON.parse(e.data)));
  events.onerror = () => showLink({ connected: false, coordinator: "", error: "dashboard unreachable, retrying" });
}

function tick() {   // ages move on between events; a local clock, not a request
  for (const cell of document.querySelectorAll("td.age")) cell.textContent = age(cell.dataset.at);
}

// ---- kill ------------------------------------------------------------------------------

function prefillKill(row) {
  $("kill-scope").value = "agent";
  $("kill-tenant").value = row.tenant;
  $("kill-agent").value = row.agent;
  $("kill-run").value = row.run_id;
  showKillFields();
  $("kill-reason").focus();
}

function showKillFields() {
  const scope = $("kill-scope").value;
  for (const label of document.querySelectorAll("#kill-form label[data-for]")) {
    label.hidden = !label.dataset.for.split(" ").includes(scope);
  }
  document.querySelector("#kill-form label[data-mode]").hidden = $("kill-mode").value !== "soft";
}

function killOrder() {
  const form = new FormData($("kill-form"));
  const order = Object.fromEntries([...form.entries()].map(([k, v]) => [k, String(v).trim()]));
  order.force = $("kill-force").checked;
  if (order.mode !== "soft") delete order.grace;
  return order;
}

function describe(order) {
  const what = {
    global: "EVERY agent of every tenant",
    tenant: `every agent of tenant ${order.tenant}`,
    agent: `agent://${order.tenant}/${order.agent}`,
    run: `run ${order.run_id}${order.tenant ? ` of tenant ${order.tenant}` : ""}`,
  }[order.scope];
  const cap = order.capability ? `capability ${order.capability} in ` : "";
  const grace = order.mode === "soft" ? `, grace ${order.grace || 30}s` : "";
  return `Kill ${cap}${what} (${order.mode}${grace})? Reason: “${order.reason}”`;
}

function askKill(event) {
  event.preventDefault();
  const order = killOrder();
  if (!order.reason) { say("kill-result", "a reason is required: it goes into the audit", false); return; }
  $("kill-summary").textContent = describe(order);
  $("kill-confirm").hidden = false;
  $("kill-confirm-button").focus();
}

async function confirmKill() {
  $("kill-confirm").hidden = true;
  try {
    const result = await api("/api/kill", killOrder());
    const verb = result.already_halted ? "already halted" : "halted";
    say("kill-result", `${verb}: ${result.halt.what} (halt ${result.halt.id})`, true);
    $("kill-reason").value = "";
  } catch (err) {
    say("kill-result", `kill refused: ${err.message}`, false);
  }
  loadHalts();
}

// ---- halts -----------------------------------------------------------------------------

let resuming = null;

async function loadHalts() {
  try {
    const halts = await api("/api/halts");
    $("halts").tBodies[0].replaceChildren(...halts.map((h) => el("tr", { "data-halt": h.id },
      el("td", { text: h.what }),
      el("td", { text: h.reason }),
      el("td", { class: "mono", text: h.actor, title: h.actor_note ? `note: ${h.actor_note}` : "" }),
      el("td", { text: age(h.created_at), title: when(h.created_at) }),
      el("td", { class: "act" }, canAct ? el("button", { class: "small", type: "button", text: "Resume…",
                                                   onclick: () => askResume(h) }) : ""),
    )));
    $("halts-empty").hidden = halts.length > 0;
  } catch (err) {
    say("resume-result", `halts: ${err.message}`, false);
  }
}

function askResume(halt) {
  resuming = halt;
  $("resume-summary").textContent = `Lift the halt on ${halt.what} (${halt.reason})?`;
  $("resume-confirm").hidden = false;
}

async function confirmResume() {
  $("resume-confirm").hidden = true;
  try {
    const result = await api("/api/resume", { halt_id: resuming.id, reason: $("resume-reason").value });
    say("resume-result", result.was_halted ? `resumed ${result.resumed.what}` : "was not halted", true);
    $("resume-reason").value = "";
  } catch (err) {
    say("resume-result", `resume refused: ${err.message}`, false);
  }
  loadHalts();
}

// ---- audit -----------------------------------------------------------------------------

async function loadAudit() {
  try {
    const audit = await api("/api/audit");
    const v = audit.verify;
    const badge = $("verify");
    if (v.intact === null) {
      badge.className = "badge unknown"; badge.textContent = `chain not checked: ${v.problem}`;
    } else if (v.intact) {
      badge.className = "badge ok"; badge.textContent = `chain verified: ${v.entries} entries`;
    } else {
      badge.className = "badge bad";
      badge.textContent = `CHAIN BROKEN${v.first_bad_id ? ` at ${v.first_bad_id}` : ""}: ${v.problem}`;
    }
    $("audit").tBodies[0].replaceChildren(...audit.entries.map((e) => el("tr", {},
      el("td", { text: when(e.at) }),
      el("td", { text: e.action }),
      el("td", { text: e.what }),
      el("td", { class: "mono", text: e.actor }),
      el("td", { text: e.actor_note }),
      el("td", { text: e.reason }),
    )));
    $("audit-error").textContent = "";
  } catch (err) {
    $("audit-error").textContent = `audit: ${err.message}`;
  }
}

// ---- the effects ledger ----------------------------------------------------------------

async function loadEffects(quiet) {
  const form = new FormData($("effects-form"));
  if (!form.get("tenant")) { if (!quiet) say("effects-result", "name a tenant", false); return; }
  const query = new URLSearchParams([...form.entries()].map(([k, v]) => [k, String(v).trim()]));
  try {
    const rows = await api(`/api/effects?${query}`);
    $("effects").tBodies[0].replaceChildren(...rows.map((r) => el("tr", { class: `effect-${r.status}` },
      el("td", { text: when(r.intended_at) }),
      el("td", { text: when(r.ended_at) }),
      el("td", { text: `${r.tenant}/${r.agent}` }),
      el("td", { class: "mono", text: r.run_id }),
      el("td", { text: r.capability }),
      el("td", { class: "mono", text: r.key }),
      el("td", { text: r.status }),
      el("td", { text: r.refused_by || r.error }),
    )));
    const landed = rows.filter((r) => r.status === "landed").length;
    say("effects-result", `${rows.length} effects, ${landed} landed (to compensate)`, true);
  } catch (err) {
    say("effects-result", `effects: ${err.message}`, false);
  }
}

// ---- start -----------------------------------------------------------------------------

function start() {
  if (TENANT) $("kill-tenant").value = TENANT;
  $("show-exited").addEventListener("change", renderFleet);
  $("kill-scope").addEventListener("change", showKillFields);
  $("kill-mode").addEventListener("change", showKillFields);
  $("kill-form").addEventListener("submit", askKill);
  $("kill-confirm-button").addEventListener("click", confirmKill);
  $("kill-cancel").addEventListener("click", () => { $("kill-confirm").hidden = true; });
  $("resume-confirm-button").addEventListener("click", confirmResume);
  $("resume-cancel").addEventListener("click", () => { $("resume-confirm").hidden = true; });
  $("effects-form").addEventListener("submit", (e) => { e.preventDefault(); loadEffects(false); });
  showKillFields();
  loadMe();
  listen();
  setInterval(tick, 1000);
}

start();
