// The potluck dashboard: polls /api/v1/state and redraws tables and uPlot charts. No other dependency.
"use strict";

const POLL_MS = 2000;
const charts = {};
window.potluckCharts = charts; // for operators poking in the console, and for the browser test

const $ = (id) => document.getElementById(id);
const fmt = (value, digits) => (value === null || value === undefined ? "–" : Number(value).toFixed(digits));
const int = (value) => (value === null || value === undefined ? "–" : Math.round(value).toLocaleString("en"));

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text; // textContent only: names come from the network
  if (cls) td.className = cls;
  row.appendChild(td);
}

function fillTable(id, rows, render) {
  const body = $(id).querySelector("tbody");
  body.replaceChildren();
  if (!rows.length) {
    const tr = document.createElement("tr");
    cell(tr, "none yet", "note");
    tr.firstChild.colSpan = $(id).querySelectorAll("thead th").length;
    body.appendChild(tr);
    return;
  }
  for (const [index, row] of rows.entries()) {
    const tr = document.createElement("tr");
    render(tr, row, index);
    body.appendChild(tr);
  }
}

function chartWidth() {
  return Math.max(320, Math.min(620, (document.body.clientWidth - 110) / 2));
}

function makeCharts() {
  charts.loss = new uPlot({
    width: chartWidth(), height: 240,
    scales: { x: { time: false }, acc: { range: [0, 1] } },
    axes: [{ label: "epoch" }, { label: "loss" }, { scale: "acc", side: 1, label: "accuracy", grid: { show: false } }],
    series: [{ label: "epoch" },
             { label: "training loss", stroke: "#d1495b", width: 2 },
             { label: "held-out accuracy", stroke: "#2e86ab", width: 2, scale: "acc" }],
  }, [[], [], []], $("loss-chart"));
  charts.throughput = new uPlot({
    width: chartWidth(), height: 240,
    axes: [{}, { label: "samples/s" }],
    series: [{ label: "time" }, { label: "samples/s per epoch", stroke: "#3b8b5a", width: 2, fill: "rgba(59,139,90,.12)" }],
  }, [[], []], $("throughput-chart"));
}

function render(state) {
  $("run-id").textContent = state.run_id || "";
  $("epoch").textContent = state.epoch;
  $("loss").textContent = fmt(state.loss, 4);
  $("accuracy").textContent = fmt(state.metrics.accuracy, 3);
  const rates = state.history.samples_per_second;
  $("throughput").textContent = rates.length ? int(rates[rates.length - 1]) : "–";
  $("live-peers").textContent = `${state.live_peers} of ${state.peers.length}`;
  $("samples").textContent = int(state.samples);
  $("checkpoint").textContent = state.checkpoint ? `epoch ${state.checkpoint.epoch}` : "none";
  const failure = state.checkpoint_failure;
  $("checkpoint-alert").hidden = !failure;
  $("checkpoint-alert").textContent = failure ? `checkpoint failed at epoch ${failure.epoch}: ${failure.why}` : "";

  const h = state.history;
  charts.loss.setData([h.epoch, h.loss, h.accuracy]);
  charts.throughput.setData([h.time, h.samples_per_second]);

  fillTable("peers", state.peers, (tr, p) => {
    if (!p.alive) tr.className = "gone";
    cell(tr, p.id); cell(tr, p.org); cell(tr, p.device); cell(tr, p.epoch);
    cell(tr, int(p.samples_per_second)); cell(tr, `${fmt(p.last_seen_seconds_ago, 0)}s ago${p.alive ? "" : " (gone)"}`);
    cell(tr, int(p.samples)); cell(tr, `${int(p.credit)}${p.credit_verified ? "" : "*"}`);
    cell(tr, p.audit_status, p.banned || p.audits_failed ? "bad" : (p.audits_passed ? "ok" : ""));
  });
  fillTable("orgs", state.orgs, (tr, o, index) => {
    cell(tr, String(index + 1)); cell(tr, o.name);
    cell(tr, `${o.peers} (${o.live_peers})`); cell(tr, int(o.samples));
    cell(tr, int(o.credit)); cell(tr, `${(100 * o.share).toFixed(1)}%`);
  });
  $("credit-note").textContent = state.credit_verified
    ? "credit: verified samples (audited work)"
    : "* credit: includes pending samples, not verified yet (their window has not settled)";
  const describe = (r) => Object.entries(r).filter(([k]) => !["peer_id", "verdict", "reason"].includes(k))
    .map(([k, v]) => `${k}=${v}`).join(" ");
  fillTable("audits", state.audits, (tr, a) => { cell(tr, a.peer_id); cell(tr, a.verdict || a.result || a.status || ""); cell(tr, describe(a)); });
  fillTable("bans", state.bans, (tr, b) => { cell(tr, b.peer_id); cell(tr, b.reason || ""); cell(tr, describe(b)); });
}

async function poll() {
  try {
    const response = await fetch("/api/v1/state", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    render(await response.json());
    $("status").textContent = `updated ${new Date().toLocaleTimeString()}`;
    $("status").className = "status";
  } catch (error) {
    $("status").textContent = `cannot reach the coordinator (${error.message}); retrying`;
    $("status").className = "status stale";
  }
  setTimeout(poll, POLL_MS);
}

makeCharts();
window.addEventListener("resize", () => {
  for (const chart of Object.values(charts)) chart.setSize({ width: chartWidth(), height: 240 });
});
poll();
