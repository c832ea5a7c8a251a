"use strict";
// The live job page. Updates arrive as Server-Sent Events whose id is the status service's revision;
// each is merged into `pending` (the newest per step, by revision) and drawn once per animation frame,
// and nothing is drawn unless its revision is newer than what the element shows (the SDK's rule).

const jobId = decodeURIComponent(location.pathname.split("/").pop());
const streamUrl = "/api/jobs/" + encodeURIComponent(jobId) + "/stream";
const PAGE = 50;
const OUTPUT_KEPT = 500;  // lines an output panel keeps in the page (the gateway starts it with as many)
const STALE_AFTER_BEATS = 3;

const rows = new Map();  // step name -> <li>
let pending = {revision: 0, header: null, steps: new Map(), link: null};
let frame = 0;
let shown = 0;  // the newest revision drawn
let source = null;
let lastMessage = Date.now();
let beatInterval = null;
let gatewayDownSince = null;
let ended = false;
let link = {live: true, last_heard: null};
let header = null;

function schedule() {
  if (!frame) frame = requestAnimationFrame(flush);
}

function take(data) {
  if (data.revision > pending.revision) pending.revision = data.revision;
  if (!pending.header || data.revision > pending.header.revision) pending.header = {revision: data.revision, job: data.job};
  for (const step of data.steps) {
    const held = pending.steps.get(step.name);
    if (!held || step.revision > held.revision) pending.steps.set(step.name, step);
  }
  pending.link = {live: data.live, last_heard: data.last_heard};
  schedule();
}

function flush() {
  frame = 0;
  const batch = pending;
  pending = {revision: 0, header: null, steps: new Map(), link: null};
  const jobNode = document.getElementById("job");
  if (batch.header && batch.header.revision > Number(jobNode.dataset.revision)) drawHeader(jobNode, batch.header);
  for (const step of batch.steps.values()) {
    const row = rows.get(step.name) || addRow(step);
    if (step.revision > Number(row.dataset.revision)) drawStep(row, step);
  }
  if (batch.revision > shown) {
    shown = batch.revision;
    const node = document.getElementById("revision");
    node.dataset.revision = String(shown);
    node.textContent = "revision " + shown;
  }
  if (batch.link) link = batch.link;
  // Marked here, not when `end` arrives: the job's last view is drawn in this same frame.
  if (ended) document.body.dataset.ended = "true";
  drawBanners();
}

function drawHeader(node, held) {
  const job = held.job;
  header = job;
  node.dataset.revision = String(held.revision);
  node.dataset.state = job.state;
  setBadge(document.getElementById("job-state"), job.state);
  document.getElementById("job-name").textContent = job.name;
  document.getElementById("job-id").textContent = job.id;
  document.title = job.name + " · " + job.state + " · stepstream";
  const c = job.step_counts;
  const done = c.completed + c.failed + c.cancelled + c.skipped;
  document.getElementById("job-counts").textContent = done + "/" + c.total + " steps ended";
  drawTimes();
  const words = [job.reason, job.message].filter(Boolean).join(": ");
  const who = job.cancelled_by ? " (cancelled by " + job.cancelled_by + ")" : "";
  document.getElementById("job-detail").textContent = words + who;
}

function drawTimes() {
  if (!header) return;
  const took = elapsed(header.started_at, header.finished_at);
  document.getElementById("job-times").textContent = took === null ? "not started" : span(took);
  for (const row of rows.values()) {
    if (row.step && row.step.state === "running" && row.step.started_at) {
      row.querySelector(".duration").textContent = span(elapsed(row.step.started_at, null));
    }
  }
}

function addRow(step) {
  const row = document.getElementById("step-template").content.firstElementChild.cloneNode(true);
  row.dataset.name = step.name;
  row.dataset.index = String(step.index);
  row.querySelector(".name").textContent = step.name;
  row.querySelector(".type").textContent = step.type;
  const list = document.getElementById("steps");
  const after = [...list.children].find((other) => Number(other.dataset.index) > step.index);
  list.insertBefore(row, after || null);
  rows.set(step.name, row);
  wireChildren(row, step.name);
  wireOutput(row, step.name);
  return row;
}

function drawStep(row, step) {
  row.step = step;
  row.dataset.revision = String(step.revision);
  row.dataset.state = step.state;
  setBadge(row.querySelector(".badge"), step.state);
  row.querySelector(".attempt").textContent = step.attempt > 1 || step.max_attempts > 1
    ? "attempt " + step.attempt + "/" + step.max_attempts : "";
  row.querySelector(".duration").textContent = span(step.duration_seconds !== null
    ? step.duration_seconds : elapsed(step.started_at, step.finished_at));
  row.querySelector(".detail").textContent = [step.reason, step.message].filter(Boolean).join(": ");
  const c = step.children;
  const box = row.querySelector(".children");
  box.hidden = c.total === 0;
  if (c.total === 0) return;
  const bar = row.querySelector(".bar");
  bar.replaceChildren(...["completed", "failed", "cancelled", "running"].map((state) => {
    const part = element("span", "b-" + state);
    part.style.width = (100 * c[state] / c.total) + "%";
    return part;
  }));
  const text = c.completed + " completed · " + c.failed + " failed · " + c.cancelled + " cancelled · "
    + c.running + " running · " + c.pending + " pending" + (c.unknown ? " · " + c.unknown + " unknown" : "")
    + " of " + c.total;
  bar.setAttribute("aria-label", text);
  const counts = row.querySelector(".counts");
  counts.textContent = text;
  Object.assign(counts.dataset, {total: c.total, completed: c.completed, failed: c.failed,
    cancelled: c.cancelled, running: c.running, pending: c.pending});
}

function wireChildren(row, stepName) {
  const drill = row.querySelector(".drill");
  const childPanel = outputPanel(row.querySelector(".child-output"));
  const childTitle = row.querySelector(".child-output-title");
  let offset = 0;

  function showChild(index, button) {
    const url = outputUrl(stepName) + "?child=" + index;
    for (const other of row.querySelectorAll(".open-child-output")) other.setAttribute("aria-expanded", "false");
    if (childPanel.shows === url) {
      childPanel.hide();
      return;
    }
    childTitle.textContent = "child " + index + " output";
    childPanel.show(url, "stepstream logs " + jobId + " " + stepName + "/" + index);
    button.setAttribute("aria-expanded", "true");
  }

  async function load() {
    const state = row.querySelector(".child-state").value;
    const query = new URLSearchParams({offset: String(offset), limit: String(PAGE)});
    if (state) query.append("state", state);
    const url = "/api/jobs/" + encodeURIComponent(jobId) + "/steps/" + encodeURIComponent(stepName)
      + "/children?" + query;
    const body = row.querySelector("tbody");
    const page = row.querySelector(".page");
    let data;
    try {
      const response = await fetch(url, {credentials: "same-origin"});
      data = await response.json();
      if (!response.ok) throw new Error(data.error || response.statusText);
    } catch (error) {
      page.textContent = "could not load: " + error.message;
      return;
    }
    body.replaceChildren(...data.children.map((child) => {
      const tr = element("tr");
      const state = element("span");
      setBadge(state, child.state);
      const cells = [element("td", "mono", String(child.index)), element("td"), element("td", "wide mono", child.item),
        element("td", "", String(child.attempt)), element("td", "", span(child.duration_seconds)),
        element("td", "wide", [child.reason, child.message].filter(Boolean).join(": ")), element("td")];
      cells[1].append(state);
      const open = element("button", "open-child-output", "output");
      open.type = "button";
      open.dataset.child = String(child.index);
      open.setAttribute("aria-expanded", String(childPanel.shows === outputUrl(stepName) + "?child=" + child.index));
      open.addEventListener("click", () => showChild(child.index, open));
      cells[6].append(open);
      tr.append(...cells);
      return tr;
    }));
    page.textContent = data.children.length
      ? (offset + 1) + "–" + (offset + data.children.length) : "none";
    row.querySelector(".prev").disabled = offset === 0;
    row.querySelector(".next").disabled = !data.more;
  }
  row.querySelector(".open-children").addEventListener("click", () => {
    drill.hidden = !drill.hidden;
    if (!drill.hidden) load();
  });
  row.querySelector(".child-state").addEventListener("change", () => { offset = 0; load(); });
  row.querySelector(".reload-children").addEventListener("click", load);
  row.querySelector(".prev").addEventListener("click", () => { offset = Math.max(0, offset - PAGE); load(); });
  row.querySelector(".next").addEventListener("click", () => { offset += PAGE; load(); });
}

// An output panel: one stream of lines (SSE id ATTEMPT-LINE, so the browser's reconnect resumes after the
// last line it got), drawn once per animation frame, the last OUTPUT_KEPT lines kept. Every line is set as
// textContent: output is never read as HTML. show() follows a step's or a child's output, hide() stops.
function outputPanel(panel) {
  const list = panel.querySelector(".output-lines");
  const note = panel.querySelector(".output-note");
  const state = panel.querySelector(".output-state");
  let url = null;
  let command = "";
  let stream = null;
  let last = null;  // ATTEMPT-LINE of the newest line received
  let waiting = [];
  let drawing = 0;
  let attempt = 0;
  let finished = false;

  function draw() {
    drawing = 0;
    const batch = waiting.slice(-OUTPUT_KEPT);
    waiting = [];
    const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 8;
    const nodes = [];
    for (const line of batch) {
      if (line.attempt !== attempt) {
        if (attempt) nodes.push(element("div", "notice", "— attempt " + line.attempt + " —"));
        attempt = line.attempt;
      }
      const node = element("div", line.stream, line.text);
      node.dataset.line = line.attempt + "-" + line.number;
      if (line.stream !== "stdout") node.title = line.stream;
      nodes.push(node);
    }
    list.append(...nodes);
    while (list.childElementCount > OUTPUT_KEPT) list.firstElementChild.remove();
    const first = [...list.children].find((node) => node.dataset.line);
    const firstNumber = first ? Number(first.dataset.line.split("-")[1]) : 0;
    note.hidden = firstNumber === 0;
    note.textContent = "Lines before line " + (firstNumber + 1) + " of attempt " + attempt
      + " are not shown (this panel keeps the last " + OUTPUT_KEPT + "; `" + command + "` shows them all).";
    if (atBottom) list.scrollTop = list.scrollHeight;
    if (finished) panel.dataset.ended = "true";
  }

  function open() {
    state.textContent = "following…";
    const opened = stream = new EventSource(last ? url + (url.includes("?") ? "&" : "?") + "after=" + last : url);
    stream.addEventListener("line", (event) => {
      last = event.lastEventId;
      waiting.push(JSON.parse(event.data));
      if (!drawing) drawing = requestAnimationFrame(draw);
    });
    stream.addEventListener("end", () => {
      finished = true;
      opened.close();
      state.textContent = "the attempt has ended: no more output";
      if (!drawing) drawing = requestAnimationFrame(draw);
    });
    stream.addEventListener("problem", (event) => {
      opened.close();
      state.textContent = "output unavailable: " + JSON.parse(event.data).error;
    });
    // The orchestrator out of reach or at its limit of streams: the browser reconnects from its Last-Event-ID.
    stream.addEventListener("unavailable", (event) => {
      state.textContent = "the orchestrator cannot serve the output now (" + JSON.parse(event.data).error
        + "), reconnecting…";
    });
    stream.addEventListener("open", () => { state.textContent = "following…"; });
    stream.addEventListener("error", () => {
      if (finished || panel.hidden || opened !== stream) return;
      state.textContent = "no word from the web gateway, reconnecting…";
      if (opened.readyState === EventSource.CLOSED) {
        setTimeout(() => { if (!panel.hidden && opened === stream) open(); }, 1000);
      }
    });
  }

  return {
    get shows() { return panel.hidden ? null : url; },
    show(target, how) {
      if (target !== url) {
        if (stream) stream.close();
        stream = null;
        url = target;
        command = how;
        last = null;
        waiting = [];
        attempt = 0;
        finished = false;
        list.replaceChildren();
        note.hidden = true;
        delete panel.dataset.ended;
      }
      panel.hidden = false;
      if (!finished) open();
    },
    hide() {
      panel.hidden = true;
      if (stream) stream.close();
    },
  };
}

function outputUrl(stepName) {
  return "/api/jobs/" + encodeURIComponent(jobId) + "/steps/" + encodeURIComponent(stepName) + "/output/stream";
}

function wireOutput(row, stepName) {
  const toggle = row.querySelector(".open-output");
  const panel = outputPanel(row.querySelector(".step-output"));
  toggle.addEventListener("click", () => {
    if (panel.shows) panel.hide();
    else panel.show(outputUrl(stepName), "stepstream logs " + jobId + " " + stepName);
    toggle.setAttribute("aria-expanded", String(panel.shows !== null));
  });
}

function showBanner(id, text) {
  const node = document.getElementById(id);
  node.hidden = !text;
  node.textContent = text || "";
}

// The same three facts the CLI shows as "stale since": the gateway's stream went quiet (this page's own
// link), the gateway's watch of the status service is not live (its SDK said so), and the status service
// says it cannot follow the job's orchestrator (server freshness).
function drawBanners() {
  const quiet = beatInterval !== null && Date.now() - lastMessage > STALE_AFTER_BEATS * beatInterval * 1000;
  const down = !ended && (gatewayDownSince !== null || quiet);
  showBanner("gateway-stale", down ? "⚠ stale since " + wallClock(new Date(lastMessage).toISOString())
    + ": no word from the web gateway, reconnecting" : "");
  showBanner("watch-stale", !ended && !link.live && link.last_heard ? "⚠ stale since " + wallClock(link.last_heard)
    + ": no word from the status service, reconnecting" : "");
  const job = header;
  showBanner("source-stale", job && job.stale && job.stale_since ? "⚠ stale since " + wallClock(job.stale_since)
    + ": the status service cannot follow the job's orchestrator" + (job.stale_detail ? " (" + job.stale_detail + ")" : "")
    : "");
}

function heard() {
  lastMessage = Date.now();
  gatewayDownSince = null;
}

function open() {
  // A new EventSource starts without a Last-Event-ID: ?after= tells the gateway what is already drawn.
  const after = Math.max(shown, pending.revision);
  source = new EventSource(after ? streamUrl + "?after=" + after : streamUrl);
  source.addEventListener("view", (event) => { heard(); take(JSON.parse(event.data)); });
  source.addEventListener("link", (event) => { heard(); pending.link = JSON.parse(event.data); schedule(); });
  source.addEventListener("beat", (event) => { heard(); beatInterval = JSON.parse(event.data).interval; schedule(); });
  source.addEventListener("end", () => {
    heard();
    ended = true;
    source.close();
    schedule();
  });
  source.addEventListener("open", () => { heard(); schedule(); });
  source.addEventListener("error", () => {
    if (ended) return;
    if (gatewayDownSince === null) gatewayDownSince = Date.now();
    drawBanners();
    if (source.readyState === EventSource.CLOSED) reopen();
  });
}

// The browser gives up on a stream answered with an error status (the gateway could not reach the status
// service, or the job is unknown): ask why, then try again unless the job does not exist.
async function reopen() {
  try {
    const response = await fetch("/api/jobs/" + encodeURIComponent(jobId), {credentials: "same-origin"});
    if (response.status === 404) {
      showBanner("missing", "No job " + jobId + " on the status service.");
      return;
    }
  } catch (error) { /* the gateway is down: keep trying */ }
  setTimeout(open, 1000);
}

setInterval(() => { drawTimes(); drawBanners(); }, 1000);
open();
