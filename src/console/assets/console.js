// session-worker console: reads /api/ with the token the operator gives; no cookies, no
// inline script (the page's Content-Security-Policy allows this file only).
"use strict";

const state = { token: null, name: null, group: null, cursor: null, timer: null, plan: null, watch: null };

function $(id) { return document.getElementById(id); }

function text(tag, value, cls) {
  const el = document.createElement(tag);
  el.textContent = value === null || value === undefined ? "—" : String(value);
  if (cls) el.className = cls;
  return el;
}

function row(cells, numeric) {
  const tr = document.createElement("tr");
  cells.forEach((c, i) => tr.appendChild(text("td", c, numeric && numeric.includes(i) ? "num" : "")));
  return tr;
}

async function api(path, body) {
  const headers = { Authorization: "Bearer " + state.token };
  const init = { headers };
  if (body !== undefined) {
    init.method = "POST";
    headers["Content-Type"] = "application/json";
    headers["X-Operator"] = state.name;
    init.body = JSON.stringify(body);
  }
  const res = await fetch(path, init);
  const answer = await res.json().catch(() => ({ error: res.statusText }));
  if (!res.ok) {
    const err = new Error(answer.error || res.statusText);
    err.status = res.status;
    throw err;
  }
  return answer;
}

function chart(svg, values) {
  svg.replaceChildren();
  const max = Math.max(1, ...values);
  values.forEach((v, i) => {
    const r = document.createElementNS("http://www.w3.org/2000/svg", "rect");
    const h = Math.round((v / max) * 38);
    r.setAttribute("x", String(i * 4));
    r.setAttribute("y", String(40 - h));
    r.setAttribute("width", "3");
    r.setAttribute("height", String(h));
    svg.appendChild(r);
  });
}

function showOverview(o) {
  const queues = $("queues").tBodies[0];
  queues.replaceChildren(...o.queues.map(q => row([q.queue, q.name, q.depth, q.groups, q.oldest, q.newest, `${Math.round(q.read_ms_ago / 1000)} s ago`], [2, 3])));
  const f = o.fleet;
  $("fleet").textContent = f.reachable
    ? `fleet: ${f.live_pods ?? "?"} live pod(s), this pod's share ${f.rate_limit_share_per_minute ?? "?"}/min` +
      (f.readyz && f.readyz.ready ? ", ready" : `, not ready: ${((f.readyz && f.readyz.reasons) || []).join("; ")}`)
    : f.error;
  const h = o.last_hour;
  $("created-total").textContent = h.created;
  $("failed-total").textContent = h.failed;
  $("replayed-total").textContent = h.replayed;
  chart($("chart-created"), h.per_minute.map(m => m[0]));
  chart($("chart-failed"), h.per_minute.map(m => m[1]));
  chart($("chart-replayed"), h.per_minute.map(m => m[2]));
}

function showGroups(groups) {
  const body = $("groups").tBodies[0];
  body.replaceChildren(...groups.map(g => {
    const tr = row([g.queue, g.reason, g.detail, g.count, g.oldest, g.newest], [3]);
    tr.className = "clickable";
    tr.dataset.group = g.id;
    tr.addEventListener("click", () => openGroup(g));
    return tr;
  }));
}

async function openGroup(g) {
  state.group = g.id;
  state.groupQueue = g.queue;
  $("plan-view").hidden = true;
  state.cursor = null;
  $("group-title").textContent = `${g.queue} · ${g.reason} · ${g.count} message(s)`;
  $("messages").tBodies[0].replaceChildren();
  $("messages-view").hidden = false;
  $("message-view").hidden = true;
  await morePage();
}

async function morePage() {
  const q = new URLSearchParams({ group: state.group, limit: "50" });
  if (state.cursor) q.set("cursor", state.cursor);
  try {
    const page = await api("/api/messages?" + q);
    const body = $("messages").tBodies[0];
    page.messages.forEach(m => {
      const tr = row([m.message_id, m.idempotency_key, m.failed_at, m.attempts, m.replay_count, m.detail], [3, 4]);
      tr.className = "clickable";
      tr.addEventListener("click", () => openMessage(m.message_id));
      body.appendChild(tr);
    });
    state.cursor = page.next_cursor || null;
    $("more").hidden = !state.cursor;
  } catch (e) {
    status(e.message, true);
  }
}

// One dead letter whole (properties, every header, body), and its key's timeline below.
async function openMessage(id) {
  try {
    const q = new URLSearchParams({ queue: state.groupQueue });
    const r = await api("/api/messages/" + encodeURIComponent(id) + "?" + q);
    $("message-title").textContent = `${id} in the ${r.queue} DLQ`;
    $("message-json").textContent = JSON.stringify(r.message, null, 2);
    $("message-view").hidden = false;
    if (r.message.idempotency_key) {
      $("lookup-id").value = r.message.idempotency_key;
      await lookup(r.message.idempotency_key);
    }
  } catch (e) {
    status(e.message, true);
  }
}

async function lookup(id) {
  try {
    const t = await api("/api/keys/" + encodeURIComponent(id));
    $("lookup-summary").textContent = t.timeline.length
      ? `${t.matched_by}: key(s) ${t.keys.join(", ") || "—"}; state ${t.state ?? "—"}, decided by ${t.decided_by ?? "—"}`
      : "nothing found for it";
    $("timeline").replaceChildren(...t.timeline.map(e => text("li", e.kind === "audit"
      ? `${e.timestamp} ${e.event_type} ${e.outcome} by ${e.operator || e.worker_id}${e.detail ? " — " + e.detail : ""}`
      : `${e.failed_at} dead letter in ${e.queue}: ${e.reason} (${e.message_id})`)));
  } catch (e) {
    status(e.message, true);
  }
}

async function makePlan() {
  try {
    const p = await api("/api/plans", { queue: state.groupQueue, group: state.group });
    state.plan = p.id;
    $("plan-id").textContent = p.id;
    const counts = Object.entries(p.counts).map(([k, v]) => `${k} ${v}`).join(", ");
    $("plan-summary").textContent = `${p.total} message(s): ${counts}; at ${p.rate_per_sec.toFixed(2)}/s about ${Math.ceil(p.estimated_secs)} s`;
    $("plan-view").hidden = false;
    $("progress").textContent = "";
  } catch (e) {
    status(e.status === 403 ? "planning needs the operator token" : e.message, true);
  }
}

function showProgress(p) {
  $("progress").textContent = `${p.state}: step ${p.step + 1} of ${p.steps.length || 1}, ` +
    `${p.replayed} of ${p.total} replayed, ${p.succeeded} started, ${p.refailed} failed again — ${p.message}`;
  const over = ["stopped", "aborted", "done", "failed"].includes(p.state);
  $("pause").hidden = over || p.state === "paused";
  $("resume").hidden = over || p.state !== "paused";
  $("abort").hidden = over;
  if (over) {
    clearInterval(state.watch);
    refresh();
  }
}

async function applyPlan() {
  try {
    showProgress(await api("/api/replay", { plan_id: state.plan, force: $("plan-force").checked }));
    clearInterval(state.watch);
    state.watch = setInterval(async () => {
      try { showProgress(await api("/api/replay/" + state.plan)); } catch (e) { status(e.message, true); }
    }, 1000);
  } catch (e) {
    status(e.status === 403 ? "replaying needs the operator token" : e.message, true);
  }
}

async function steer(action) {
  try { showProgress(await api(`/api/replay/${state.plan}/${action}`, {})); } catch (e) { status(e.message, true); }
}

async function purgeGroup() {
  try {
    const r = await api("/api/purge", { queue: state.groupQueue, group: state.group, confirm: $("purge-confirm").value.trim() });
    status(`purged ${r.purged} message(s) from ${r.queue}`, false);
    $("messages-view").hidden = true;
    refresh();
  } catch (e) {
    status(e.status === 403 ? "purging needs the operator token" : e.message, true);
  }
}

function status(message, isError) {
  $("status").textContent = message;
  $("status").className = isError ? "error" : "";
}

async function refresh() {
  try {
    const [o, g] = await Promise.all([api("/api/overview"), api("/api/groups")]);
    showOverview(o);
    showGroups(g.groups);
    status("updated " + new Date().toLocaleTimeString(), false);
    return true;
  } catch (e) {
    if (e.status === 401) {
      signOut("that token was refused");
    } else {
      status(e.message, true);
    }
    return false;
  }
}

async function signIn(token, name) {
  state.token = token;
  state.name = name;
  if (await refresh()) {
    sessionStorage.setItem("console-token", token);
    sessionStorage.setItem("console-name", name);
    $("sign-in").hidden = true;
    $("app").hidden = false;
    $("sign-out").hidden = false;
    $("who").textContent = "signed in as " + name;
    state.timer = setInterval(refresh, 10000);
  }
}

function signOut(reason) {
  sessionStorage.clear();
  clearInterval(state.timer);
  state.token = null;
  $("app").hidden = true;
  $("sign-in").hidden = false;
  $("sign-out").hidden = true;
  $("who").textContent = "";
  $("sign-in-error").textContent = reason || "";
}

document.addEventListener("DOMContentLoaded", () => {
  $("sign-in-form").addEventListener("submit", ev => {
    ev.preventDefault();
    signIn($("token").value.trim(), $("operator-name").value.trim());
  });
  $("sign-out").addEventListener("click", () => signOut(""));
  $("more").addEventListener("click", morePage);
  $("plan").addEventListener("click", makePlan);
  $("apply").addEventListener("click", applyPlan);
  ["pause", "resume", "abort"].forEach(a => $(a).addEventListener("click", () => steer(a)));
  $("purge-form").addEventListener("submit", ev => {
    ev.preventDefault();
    purgeGroup();
  });
  $("lookup-form").addEventListener("submit", ev => {
    ev.preventDefault();
    lookup($("lookup-id").value.trim());
  });
  const saved = sessionStorage.getItem("console-token");
  if (saved) signIn(saved, sessionStorage.getItem("console-name") || "");
});
