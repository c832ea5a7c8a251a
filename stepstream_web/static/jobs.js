"use strict";
// The jobs list, live from WatchJobs through the gateway: each `jobs` event is the newest jobs the filter
// matches at one revision; a row already showing a newer revision of a job keeps it (the SDK's rule), and
// rows are drawn once per animation frame. "Stale since" follows the job page's rules.

const rows = new Map();  // job id -> <li>
let source = null;
let latest = null;
let frame = 0;
let link = {live: true, last_heard: null};
let lastMessage = Date.now();
let beatInterval = null;
let gatewayDown = false;

function filterQuery() {
  const query = new URLSearchParams();
  const state = document.getElementById("state").value;
  const name = document.getElementById("name").value.trim();
  if (state) query.append("state", state);
  if (name) query.set("name", name);
  return query;
}

function draw() {
  frame = 0;
  const list = document.getElementById("jobs");
  drawBanner();
  if (latest === null) return;
  const keep = new Set();
  const ordered = latest.map((job) => {
    keep.add(job.id);
    const row = rows.get(job.id) || makeRow(job.id);
    if (job.revision > Number(row.dataset.revision)) drawRow(row, job);
    return row;
  });
  for (const [id, row] of rows) if (!keep.has(id)) { row.remove(); rows.delete(id); }
  list.replaceChildren(...ordered);
  document.getElementById("empty").hidden = ordered.length > 0;
}

function makeRow(id) {
  const row = element("li", "job");
  row.dataset.id = id;
  row.dataset.revision = "0";
  const line = element("div", "line");
  const link = element("a", "name");
  link.href = "/jobs/" + encodeURIComponent(id);
  line.append(element("span", "badge"), link, element("span", "mono muted id", id), element("span", "muted counts"),
    element("span", "muted when"));
  row.append(line, element("div", "detail"));
  rows.set(id, row);
  return row;
}

function drawRow(row, job) {
  row.dataset.revision = String(job.revision);
  row.dataset.state = job.state;
  setBadge(row.querySelector(".badge"), job.state);
  row.querySelector(".name").textContent = job.name;
  const c = job.step_counts;
  row.querySelector(".counts").textContent = (c.completed + c.failed + c.cancelled + c.skipped) + "/" + c.total
    + " steps ended";
  row.querySelector(".when").textContent = job.created_at ? "created " + new Date(job.created_at).toLocaleString() : "";
  const staleWords = job.stale && job.stale_since ? "⚠ stale since " + wallClock(job.stale_since) : "";
  row.querySelector(".detail").textContent = [staleWords, job.reason, job.message].filter(Boolean).join(" · ");
}

function drawBanner() {
  const quiet = beatInterval !== null && Date.now() - lastMessage > 3 * beatInterval * 1000;
  let text = "";
  if (gatewayDown || quiet) {
    text = "⚠ stale since " + wallClock(new Date(lastMessage).toISOString()) + ": no word from the web gateway, reconnecting";
  } else if (!link.live && link.last_heard) {
    text = "⚠ stale since " + wallClock(link.last_heard) + ": no word from the status service, reconnecting";
  }
  const banner = document.getElementById("list-stale");
  banner.hidden = !text;
  banner.textContent = text;
}

function heard() {
  lastMessage = Date.now();
  gatewayDown = false;
}

function schedule() {
  if (!frame) frame = requestAnimationFrame(draw);
}

function open() {
  if (source) source.close();
  const query = filterQuery();
  source = new EventSource("/api/jobs/stream" + (query.toString() ? "?" + query : ""));
  source.addEventListener("jobs", (event) => {
    heard();
    const data = JSON.parse(event.data);
    latest = data.jobs;
    link = {live: data.live, last_heard: data.last_heard};
    schedule();
  });
  source.addEventListener("link", (event) => { heard(); link = JSON.parse(event.data); schedule(); });
  source.addEventListener("beat", (event) => { heard(); beatInterval = JSON.parse(event.data).interval; schedule(); });
  source.addEventListener("error", () => {
    gatewayDown = true;
    schedule();
    if (source.readyState === EventSource.CLOSED) setTimeout(open, 1000);
  });
}

setInterval(drawBanner, 1000);
document.getElementById("filters").addEventListener("submit", (event) => { event.preventDefault(); open(); });
document.getElementById("state").addEventListener("change", open);
document.getElementById("name").addEventListener("change", open);
open();
