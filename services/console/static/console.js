// The ztbank lab console: renders what /api/state and the /api/events stream say.
// Every piece of data goes into the page as text (textContent), never as HTML: audit records
// carry what callers sent.
"use strict";

const SERVICES = ["gateway", "transfer-engine", "risk"];
const COLOURS = { "gateway": "#2f6fde", "transfer-engine": "#d9822b", "risk": "#3b9a57" };
const MAX_FEED = 200;
const MIN_SPAN = 60;  // seconds: the narrowest time axis of a chart
// Workloads renew their SVID between 40 % and 50 % of its lifetime (the issuer's schedule).
const ROTATE_BY = 0.5;

const $ = (id) => document.getElementById(id);
const state = { decisions: [], charts: {}, snapshot: null, messageUntilLabEnds: false };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) node.append(child === null || child === undefined ? "" : child);
  return node;
}

function short(text, keep) {
  if (!text) return "–";
  return text.length > keep ? text.slice(0, keep) + "…" : text;
}

function seconds(ms) {
  const s = Math.round(ms / 1000);
  if (Math.abs(s) < 120) return `${s} s`;
  const sign = s < 0 ? "-" : "";
  const m = Math.floor(Math.abs(s) / 60);
  // A signing CA lives hours: hours and minutes, not "1439 min 28 s".
  if (m >= 120) return `${sign}${Math.floor(m / 60)} h ${m % 60} min`;
  return `${sign}${m} min ${Math.abs(s) % 60} s`;
}

// -- stack state ---------------------------------------------------------------------------

function renderState(snapshot) {
  state.snapshot = snapshot;
  const stack = snapshot.stack;
  const up = snapshot.up;
  $("stack-state").textContent = up ? "stack up" : "stack down";
  $("stack-state").className = `pill ${up ? "ok" : "bad"}`;
  $("down").hidden = up;
  $("start-command").textContent = snapshot.start_command;
  $("down-hint").textContent = snapshot.start_hint || "";
  $("trust-domain").textContent = stack.trust_domain;
  $("console-id").textContent = snapshot.console.spiffe_id;
  $("root-ca").textContent = stack.root_ca;
  const issuer = stack.issuer;
  $("issuer-state").textContent = issuer.running ? `running, Workload API ${issuer.socket}` : "stopped";
  const authority = issuer.authority;
  $("signing-ca").textContent = authority ? short(authority.active_ca_serial, 16) : "–";
  $("signing-ca-expiry").dataset.until = authority ? authority.active_ca_not_after : "";
  $("upstream").textContent = authority ? authority.upstream : "–";
  $("crl-number").textContent = authority ? authority.crl_number : "–";
  $("revoked-count").textContent = authority ? authority.revoked_certificates : "–";
  $("revoked-ids-count").textContent = authority ? authority.revoked_spiffe_ids.length : "–";
  $("entries").textContent = authority ? authority.entries : "–";
  renderCards(stack.services);
  renderRevocations(snapshot, authority);
  tick();
}

function renderCards(services) {
  const cards = $("cards");
  for (const name of SERVICES) {
    const svc = services[name];
    if (!svc) continue;
    let card = cards.querySelector(`[data-service="${name}"]`);
    if (!card) {
      card = el("article", { class: "card", "data-service": name },
        el("h3", {}, name, " ", el("span", { class: "pill health" })),
        el("div", { class: "id" }),
        el("dl", {},
          el("dt", {}, "address"), el("dd", { class: "address" }),
          el("dt", {}, "SVID serial"), el("dd", {}, el("code", { class: "serial" })),
          el("dt", {}, "expires in"), el("dd", { class: "expires countdown" }),
          el("dt", {}, "rotates in"), el("dd", { class: "rotates countdown" })),
        el("div", { class: "error muted" }));
      cards.append(card);
    }
    const health = card.querySelector(".health");
    health.textContent = svc.healthy ? "healthy" : svc.ready === false ? "not ready" : "down";
    health.className = `pill health ${svc.healthy ? "ok" : "bad"}`;
    card.dataset.healthy = String(svc.healthy);
    card.querySelector(".id").textContent = svc.spiffe_id;
    card.querySelector(".address").textContent = svc.url || svc.address || "–";
    const serial = card.querySelector(".serial");
    if (serial.textContent !== (svc.svid_serial || "–") && serial.textContent !== "") {
      card.classList.remove("changed");
      void card.offsetWidth;  // restarts the highlight
      card.classList.add("changed");
    }
    serial.textContent = svc.svid_serial || "–";
    card.querySelector(".expires").dataset.until = svc.svid_not_after || "";
    let rotate = "";
    if (svc.svid_not_before && svc.svid_not_after) {
      const from = Date.parse(svc.svid_not_before), to = Date.parse(svc.svid_not_after);
      rotate = new Date(from + ROTATE_BY * (to - from)).toISOString();
    }
    card.querySelector(".rotates").dataset.until = rotate;
    card.querySelector(".error").textContent = svc.error || "";
  }
}

function tick() {
  const now = Date.now();
  for (const node of document.querySelectorAll(".countdown")) {
    const until = node.dataset.until;
    if (!until) { node.textContent = "–"; continue; }
    const left = Date.parse(until) - now;
    node.textContent = left > 0 ? seconds(left) : (node.classList.contains("rotates") ? "due" : "expired");
  }
}

function renderRevocations(snapshot, authority) {
  const body = $("revoked");
  body.replaceChildren(...snapshot.revoked.map((entry) =>
    el("tr", {}, el("td", {}, el("code", {}, entry.serial)), el("td", {}, entry.revoked_at),
      el("td", {}, entry.reason || "–"))));
  if (!snapshot.revoked.length) body.append(el("tr", {}, el("td", { colSpan: 3, class: "muted" }, "nothing revoked")));
  $("crl-error").hidden = !snapshot.crl_error;
  $("crl-error").textContent = snapshot.crl_error || "";
  const ids = authority ? authority.revoked_spiffe_ids : [];
  $("revoked-ids").replaceChildren(...ids.map((id) => el("li", {}, el("code", {}, id))));
}

// -- decisions -------------------------------------------------------------------------------

function addDecision(item) {
  state.decisions.push(item);
  if (state.decisions.length > MAX_FEED) state.decisions.shift();
  if (!matches(item)) return;
  const feed = $("feed");
  feed.prepend(decisionRow(item));
  while (feed.children.length > MAX_FEED) feed.lastChild.remove();
}

function isHealthCheck(item) {
  const method = item.method || "";
  return method === "GET /healthz" || method.startsWith("/grpc.health.v1.Health/");
}

function matches(item) {
  const service = $("filter-service").value, verdict = $("filter-decision").value;
  if ($("filter-health").checked && isHealthCheck(item) && item.decision === "allow") return false;
  return (!service || item.service === service) && (!verdict || item.decision === verdict);
}

function decisionRow(item) {
  return el("tr", { class: item.decision, "data-decision": item.decision, "data-service": item.service || "" },
    el("td", {}, (item.time || "").slice(11, 23)),
    el("td", {}, item.service),
    el("td", {}, el("span", { class: `pill ${item.decision === "allow" ? "ok" : "bad"}` }, item.decision)),
    el("td", { title: item.caller || "" }, short((item.caller || "").split("/svc/").pop(), 24)),
    el("td", {}, short(item.method, 60)),
    el("td", {}, short(item.reason, 120)));
}

function renderFeed() {
  const rows = state.decisions.filter(matches).slice(-MAX_FEED).reverse().map(decisionRow);
  $("feed").replaceChildren(...rows);
}

// -- charts ------------------------------------------------------------------------------------

function chart(id, key) {
  const target = $(id);
  // A latency step without requests is a gap (null), so a step with requests between two
  // gaps has no line to draw: points make it visible.
  const points = key === "rate" ? {} : { points: { show: true, size: 5, fill: "#fff" } };
  const series = [{}].concat(SERVICES.map((name) =>
    ({ label: name, stroke: COLOURS[name], width: 2, spanGaps: false, ...points })));
  const options = { width: Math.max(260, target.clientWidth || 320), height: 180, series, legend: { live: false },
    axes: [{}, { size: 50 }], scales: { x: { time: true } } };
  return new uPlot(options, [[]].concat(SERVICES.map(() => [])), target);
}

function renderMetrics(metrics) {
  if (typeof uPlot === "undefined") return;
  for (const [id, key] of [["chart-p99", "p99"], ["chart-p50", "p50"], ["chart-rate", "rate"]]) {
    state.charts[id] = state.charts[id] || chart(id, key);
    const first = metrics[SERVICES[0]];
    if (!first) continue;
    const data = [first.t].concat(SERVICES.map((name) => (metrics[name] ? metrics[name][key] : first.t.map(() => null))));
    state.charts[id].setData(data);
    // One step only (a console just started): uPlot would spread that one time over years.
    if (first.t.length === 1) state.charts[id].setScale("x", { min: first.t[0], max: first.t[0] + MIN_SPAN });
  }
}

// -- labs ----------------------------------------------------------------------------------------

function renderLabButtons(labs) {
  const buttons = Object.entries(labs).map(([name, help]) =>
    el("button", { type: "button", title: help, "data-lab": name, onclick: () => startLab(name) }, name));
  $("lab-buttons").replaceChildren(...buttons);
}

function showMessage(text, untilLabEnds) {
  $("lab-message").hidden = !text;
  $("lab-message").textContent = text || "";
  state.messageUntilLabEnds = Boolean(text && untilLabEnds);
}

// "Title: detail", or the detail alone when it starts by saying what the title says.
function problemText(body, status) {
  const title = body.title || String(status), detail = body.detail || "";
  if (!detail) return title;
  if (!detail.toLowerCase().startsWith(title.toLowerCase())) return `${title}: ${detail}`;
  return detail.charAt(0).toUpperCase() + detail.slice(1);
}

async function startLab(name) {
  showMessage("");
  let reply;
  try {
    reply = await fetch(`/api/labs/${encodeURIComponent(name)}`, { method: "POST", headers: { "X-Ztbank-Console": "start" } });
  } catch (error) {
    showMessage(`the console does not answer: ${error}`);
    return;
  }
  if (reply.status !== 202) {
    const body = await reply.json().catch(() => ({}));
    // "A lab is running" (409) is true until that lab ends: renderLab takes it away then.
    showMessage(problemText(body, reply.status), reply.status === 409);
  }
}

function renderLab(run) {
  if (!run) return;
  $("lab-name").textContent = `lab ${run.lab}`;
  const verdict = run.verdict || "running";
  $("lab-verdict").textContent = verdict;
  $("lab-verdict").className = `pill ${verdict === "passed" ? "ok" : verdict === "failed" ? "bad" : "unknown"}`;
  $("lab-output").textContent = run.lines.join("\n");
  for (const button of document.querySelectorAll("#lab-buttons button")) button.disabled = !run.verdict;
  if (run.verdict && state.messageUntilLabEnds) showMessage("");
}

function addLabLine(item) {
  const output = $("lab-output");
  output.textContent += (output.textContent ? "\n" : "") + item.line;
  output.scrollTop = output.scrollHeight;
}

// -- reports -------------------------------------------------------------------------------------

function renderReports(reports) {
  const items = reports.map((r) => el("li", {}, el("a", { href: r.url, target: "_blank", rel: "noopener" }, r.name),
    " ", el("span", { class: "muted" }, new Date(r.modified * 1000).toLocaleString())));
  if (!items.length) items.push(el("li", { class: "muted" }, "no report yet: run make load"));
  $("report-list").replaceChildren(...items);
}

// -- start -----------------------------------------------------------------------------------------

// Everything the console holds, drawn afresh: at the start, and again once the event stream is
// back after it was lost (the console restarted: what happened meanwhile is not streamed).
async function load() {
  const initial = await (await fetch("/api/state")).json();
  renderState(initial.state);
  renderLabButtons(initial.labs);
  renderLab(initial.lab);
  renderReports(initial.reports);
  state.decisions = initial.decisions.slice(-MAX_FEED);
  renderFeed();
  renderMetrics(initial.metrics);
}

async function start() {
  for (const name of SERVICES) $("filter-service").append(el("option", {}, name));
  $("filter-service").onchange = renderFeed;
  $("filter-decision").onchange = renderFeed;
  $("filter-health").onchange = renderFeed;
  await load();
  let lost = false;
  const events = new EventSource("/api/events");
  events.onopen = () => {
    if (lost) load().then(() => { lost = false; }, (error) => showMessage(`console: ${error}`));
  };
  events.addEventListener("state", (e) => renderState(JSON.parse(e.data)));
  events.addEventListener("decision", (e) => addDecision(JSON.parse(e.data)));
  events.addEventListener("metrics", (e) => renderMetrics(JSON.parse(e.data)));
  events.addEventListener("lab", (e) => renderLab(JSON.parse(e.data)));
  events.addEventListener("lab_line", (e) => addLabLine(JSON.parse(e.data)));
  events.addEventListener("reports", (e) => renderReports(JSON.parse(e.data)));
  events.onerror = () => {
    lost = true;
    $("stack-state").textContent = "console reconnecting…";
    $("stack-state").className = "pill unknown";
  };
  setInterval(tick, 250);
}

document.addEventListener("DOMContentLoaded", () => { start().catch((error) => showMessage(`console: ${error}`)); });
