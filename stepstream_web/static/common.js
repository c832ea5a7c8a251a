"use strict";
// What every page shares: badges (icon and word, never colour alone), times, and element helpers.
// Nothing here decides a state: every word shown is one the status service sent.

const ICONS = {pending: "○", running: "◐", waiting: "◑", completed: "✔", failed: "✘", cancelled: "⊘", skipped: "↷"};

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function setBadge(node, state) {
  const known = Object.prototype.hasOwnProperty.call(ICONS, state);
  node.className = "badge s-" + (known ? state : "unknown");
  node.dataset.state = state;
  node.textContent = (known ? ICONS[state] : "?") + " " + state;
  node.title = "state: " + state;
}

function two(n) { return String(n).padStart(2, "0"); }

// HH:MM:SS in local time, as the CLI shows "stale since".
function wallClock(iso) {
  const moment = new Date(iso);
  return two(moment.getHours()) + ":" + two(moment.getMinutes()) + ":" + two(moment.getSeconds());
}

// A duration as the CLI's render.span writes it.
function span(seconds) {
  if (seconds === null || seconds === undefined) return "";
  if (seconds < 60) return seconds < 10 ? seconds.toFixed(1) + "s" : Math.round(seconds) + "s";
  const whole = Math.floor(seconds), secs = whole % 60, minutes = Math.floor(whole / 60) % 60;
  const hours = Math.floor(whole / 3600);
  return hours ? hours + "h" + two(minutes) + "m" + two(secs) + "s" : minutes + "m" + two(secs) + "s";
}

// Seconds from `startIso` to `endIso` (or now): the elapsed clock of something still running.
function elapsed(startIso, endIso) {
  if (!startIso) return null;
  return Math.max(0, ((endIso ? new Date(endIso) : new Date()) - new Date(startIso)) / 1000);
}
