"use strict";
// daybook's dashboard: polls /v1/dashboard (two seconds after each answer) and draws it.
// No framework and no build step; the token lives in this tab's session storage only.

const POLL_MS = 2000;
const MAX_WAIT_MS = 60000; // the longest a Retry-After holds the next poll back
const TREND_POINTS = 60;
const trends = new Map(); // "name vN" -> recent lag figures

const $ = (id) => document.getElementById(id);

function token() { return sessionStorage.getItem("daybook-token") || ""; }

async function api(path, options = {}) {
  const headers = Object.assign({ "Accept": "application/json" }, options.headers || {});
  if (token()) headers["Authorization"] = "Bearer " + token();
  const answer = await fetch(path, Object.assign({}, options, { headers }));
  const body = await answer.text().then(exactJson).catch(() => ({}));
  if (!answer.ok) {
    const detail = body.detail || body.title || answer.statusText;
    const error = new Error(`${answer.status} ${body.code ? body.code + ": " : ""}${detail}`);
    error.retryAfter = Number(answer.headers.get("Retry-After")) || 0; // seconds
    throw error;
  }
  return body;
}

// Amounts are exact JSON integers up to 2**63-1 (daily totals beyond): a number past 2**53
// is read as a BigInt from its own digits, never rounded to a double.
function exactJson(text) {
  return JSON.parse(text, (key, value, context) =>
    typeof value === "number" && !Number.isSafeInteger(value) && context &&
    /^-?[0-9]+$/.test(context.source) ? BigInt(context.source) : value);
}

// JSON text of an answer, its BigInts (see exactJson) written as the numbers they are:
// JSON.stringify refuses them. Each is first a marker no answer holds (a NUL character,
// which daybook refuses in any text), then its digits.
function showJson(value) {
  const big = [];
  const text = JSON.stringify(value, (key, item) => {
    if (typeof item !== "bigint") return item;
    big.push(item.toString());
    return `\u0000${big.length - 1}`;
  }, 2);
  return text.replace(/"\\u0000(\d+)"/g, (_, index) => big[Number(index)]);
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text === null || text === undefined ? "–" : String(text);
  if (className) td.className = className;
  return td;
}

function number(value) {
  return typeof value === "number" || typeof value === "bigint" ? value.toLocaleString("en") : "–";
}

function seconds(value) {
  if (typeof value !== "number") return "–";
  return value < 1 ? `${(value * 1000).toFixed(1)} ms` : `${value.toFixed(2)} s`;
}

function trend(key, lag) {
  const points = trends.get(key) || [];
  points.push(lag);
  while (points.length > TREND_POINTS) points.shift();
  trends.set(key, points);
  const top = Math.max(1, ...points);
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "trend");
  svg.setAttribute("viewBox", `0 0 ${TREND_POINTS} 20`);
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", `lag over the last ${points.length} updates, now ${lag}`);
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  const start = TREND_POINTS - points.length;
  line.setAttribute("points", points.map((v, i) => `${start + i},${20 - (v / top) * 18 - 1}`).join(" "));
  svg.appendChild(line);
  return svg;
}

function drawProjections(projections) {
  const body = $("projections").tBodies[0];
  // Redrawn at every poll: the replay button a keyboard user is on keeps the focus.
  const focused = body.contains(document.activeElement) ? document.activeElement.dataset.replay : null;
  body.replaceChildren();
  for (const p of projections) {
    const row = body.insertRow();
    row.dataset.projection = p.name;
    cell(row, p.name);
    cell(row, p.version, "num");
    cell(row, p.owner);
    cell(row, p.state, `state-${p.state}`);
    cell(row, number(p.position), "num");
    cell(row, p.lag_events ? `${number(p.lag_events)} (${seconds(p.lag_seconds)})` : "0", "num");
    row.insertCell().appendChild(trend(`${p.name} v${p.version}`, p.lag_events || 0));
    const last = p.last_reconcile;
    const reconciled = cell(row, reconcileText(last), last ? `state-${last.result}` : "");
    if (last) reconciled.title = [`finished ${last.at}`, ...last.drifts].join("\n");
    cell(row, number(p.parked), "num");
    const actions = row.insertCell();
    if (p.parked > 0) {
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = "Replay parked";
      button.setAttribute("aria-label", `Replay the parked events of ${p.name} version ${p.version}`);
      button.dataset.replay = `${p.name} v${p.version}`;
      button.addEventListener("click", () => replay(p.name, button));
      actions.appendChild(button);
      if (focused === button.dataset.replay) button.focus();
    }
    if (p.error) {
      // Why it stopped or retries (the projection's own error), under its row.
      const why = body.insertRow();
      why.className = "why";
      const text = why.insertCell();
      text.colSpan = 10;
      text.textContent = `${p.name} v${p.version}: ${p.error}`;
    }
  }
}

function reconcileText(last) {
  if (!last) return "never";
  const at = `at ${number(last.position)}`;
  if (last.result === "failed") return `failed: ${last.error}`;
  if (last.result === "clean") return `clean ${at}`;
  const rows = `${number(last.drift)} drifted ${at}`;
  return last.result === "repaired" ? `${rows}, repaired` : `${rows}, not repaired`;
}

function drawRows(tableId, rows, columns) {
  const body = $(tableId).tBodies[0];
  body.replaceChildren();
  for (const item of rows) {
    const row = body.insertRow();
    for (const [name, format] of columns) cell(row, format ? format(item[name]) : item[name]);
  }
}

async function replay(name, button) {
  button.disabled = true;
  try {
    await api(`/v1/projections/${encodeURIComponent(name)}/resume`, { method: "POST" });
    $("error").textContent = "";
    poll(0); // shown at once (after a poll in flight, if one is)
  } catch (error) {
    $("error").textContent = `Replay of ${name} refused: ${error.message}`;
    button.disabled = false;
  }
}

let updatedAt = null; // when the figures shown were gathered (a time of day), or null

// Returns how many milliseconds to wait before the next poll.
async function refresh() {
  if (!token()) {
    $("error").textContent = "Enter a token with the read scope (daybook tokens create).";
    return POLL_MS;
  }
  try {
    const view = await api("/v1/dashboard");
    $("head").textContent = number(view.head);
    $("rate").textContent = view.writes.rate.toFixed(1);
    $("p50").textContent = seconds(view.writes.commit_p50);
    $("p99").textContent = seconds(view.writes.commit_p99);
    $("refused").textContent = number(view.writes.refused);
    $("failed").textContent = number(view.writes.failed);
    drawProjections(view.projections);
    const counts = Object.entries(view.sagas.counts).map(([state, n]) => `${state} ${n}`);
    $("saga-counts").textContent = counts.length ? counts.join(" · ") : "no sagas yet";
    drawRows("stuck", view.sagas.stuck, [["saga_id"], ["state"], ["step"], ["deadline"], ["last_error"]]);
    drawRows("holds", view.holds, [["hold_id"], ["account_id"], ["amount", number], ["currency"], ["expires_at"]]);
    drawRows("decisions", view.decisions,
      [["at"], ["projection"], ["position", number], ["table"], ["row"], ["change"]]);
    updatedAt = new Date().toLocaleTimeString();
    $("updated").textContent = updatedAt;
    document.body.classList.remove("stale");
    $("error").textContent = "";
    return POLL_MS;
  } catch (error) {
    $("error").textContent = `Could not refresh: ${error.message}`;
    // The figures stay, marked: they are those of the last answer, not of now.
    $("updated").textContent = `${updatedAt || "never"} (not current: could not refresh)`;
    document.body.classList.add("stale");
    // A server that says when to come back (503 with Retry-After) is not asked sooner.
    return Math.max(POLL_MS, Math.min(error.retryAfter * 1000, MAX_WAIT_MS));
  }
}

// One poll at a time: the next is timed from the end of the last, so answers slower than
// POLL_MS never pile up (each holds a read-model connection of the server's).
let pollTimer = null;
let polling = false;
let pollAgain = false;

function poll(delay) {
  clearTimeout(pollTimer);
  pollTimer = setTimeout(runPoll, delay);
}

async function runPoll() {
  if (polling) { pollAgain = true; return; } // a new token meanwhile: once this one ends
  polling = true;
  let wait = POLL_MS;
  try {
    wait = await refresh();
  } finally {
    polling = false;
    if (pollAgain) { pollAgain = false; wait = 0; }
    poll(wait);
  }
}

async function lookup(path) {
  try {
    $("lookup-result").textContent = showJson(await api(path));
  } catch (error) {
    $("lookup-result").textContent = error.message;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("token").value = token();
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem("daybook-token", $("token").value.trim());
    $("token-state").textContent = "token set";
    poll(0);
  });
  $("balance-form").addEventListener("submit", (event) => {
    event.preventDefault();
    lookup(`/v1/accounts/${encodeURIComponent($("account").value.trim())}/balance`);
  });
  $("stock-form").addEventListener("submit", (event) => {
    event.preventDefault();
    lookup(`/v1/stock/${encodeURIComponent($("sku").value.trim())}`);
  });
  poll(0);
});
