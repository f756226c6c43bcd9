// The emailq dashboard: plain JavaScript, no build step, no dependencies.
//
// Security: every piece of server text (SMTP replies, reasons, addresses, worker ids) goes
// into the page as text (the `el` helper appends strings as Text nodes; nothing here uses
// innerHTML), and the page's Content-Security-Policy allows no inline script. The admin
// key is kept in sessionStorage (gone when the tab closes) and sent only as a Bearer header;
// it never appears in a URL. Live updates are server-sent events read with fetch(), since
// EventSource cannot send a header.
"use strict";

(() => {
  const API = "api/v1";
  const KEY_NAME = "emailq.adminKey";
  const PAGE_SIZE = 20;
  const REFRESH_MS = 5000; // heartbeat ages and oldest ages move without events too
  const EVENTS_SHOWN = 50;
  const SVG = "http://www.w3.org/2000/svg";

  const state = {
    key: sessionStorage.getItem(KEY_NAME) || "",
    readOnly: true,
    offset: 0,
    nextOffset: null,
    lastEventId: null,
    stream: null,
    refreshTimer: null,
    pending: null,
    events: [],
    lookedUp: null,
  };

  const $ = (id) => document.getElementById(id);

  // An element with attributes and children; strings become Text nodes, never markup.
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (name === "class") node.className = value;
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value);
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function say(text, isError) {
    const message = $("message");
    message.textContent = text || "";
    message.className = isError ? "error" : "";
  }

  function setLive(text, kind) {
    const badge = $("live");
    badge.textContent = text;
    badge.className = "badge " + kind;
  }

  function age(seconds) {
    if (seconds === null || seconds === undefined) return "-";
    if (seconds < 60) return seconds.toFixed(1) + " s";
    if (seconds < 3600) return (seconds / 60).toFixed(1) + " min";
    return (seconds / 3600).toFixed(1) + " h";
  }

  // A time in the browser's own zone, named: a page read beside UTC logs says which it is.
  function when(iso) {
    if (!iso) return "-";
    const date = new Date(iso);
    return isNaN(date) ? String(iso) : date.toLocaleString(undefined, { timeZoneName: "short" });
  }

  // A worker's circuit breaker in words: "open" reads as good news to anyone who does not
  // know breakers. `since` is the worker's clock, epoch ms.
  function relayText(relay) {
    if (!relay) return "unknown";
    if (relay.state === "closed") return "ok";
    if (relay.state === "half_open") return "probing the relay";
    return "relay down since " + when(new Date(relay.since).toISOString()) + ", probing";
  }

  // -- the API ----------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, detail) {
      super(detail);
      this.status = status;
    }
  }

  function authHeaders() {
    return state.key ? { Authorization: "Bearer " + state.key } : {};
  }

  async function api(path, options) {
    const init = Object.assign({ cache: "no-store" }, options || {});
    init.headers = Object.assign({}, authHeaders(), init.headers || {});
    const response = await fetch(API + path, init);
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      body = null;
    }
    if (!response.ok) {
      const detail = body && body.detail ? body.detail : "HTTP " + response.status;
      throw new ApiError(response.status, detail);
    }
    return body;
  }

  function needKey(detail) {
    stopStream();
    clearInterval(state.refreshTimer);
    $("main").hidden = true;
    $("key-form").hidden = false;
    $("key-forget").hidden = !state.key;
    setLive("not connected", "off");
    say(detail, true);
    $("key").focus();
  }

  function failed(error) {
    if (error instanceof ApiError && error.status === 401) {
      needKey("This API needs an admin key: " + error.message);
    } else {
      say(error.message || String(error), true);
    }
  }

  // -- start, and the admin key -----------------------------------------------------------

  async function start() {
    let permissions;
    try {
      permissions = await api("/admin/permissions");
    } catch (error) {
      if (error instanceof ApiError && (error.status === 401 || error.status === 403)) {
        // 401 with a key given: that key is not one (without, the API just needs one).
        const refused = state.key ? "That key was refused: " + error.message
          : "Enter an admin key to open the dashboard.";
        needKey(error.status === 401 ? refused : error.message);
      } else {
        say("Cannot reach the API: " + (error.message || error), true);
      }
      return;
    }
    state.readOnly = permissions.read_only;
    $("mode").hidden = !state.readOnly;
    $("key-form").hidden = true;
    $("key-forget").hidden = !state.key;
    $("main").hidden = false;
    say("");
    await refresh();
    clearInterval(state.refreshTimer);
    state.refreshTimer = setInterval(refresh, REFRESH_MS);
    connect();
  }

  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.key = $("key").value.trim();
    $("key").value = "";
    sessionStorage.setItem(KEY_NAME, state.key);
    start();
  });

  $("key-forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_NAME);
    state.key = "";
    needKey("The key was forgotten.");
  });

  // -- refreshing what is shown -----------------------------------------------------------

  async function refresh() {
    try {
      const [stats, workers, dead, throughput] = await Promise.all([
        api("/admin/stats"),
        api("/admin/workers"),
        api(`/admin/failed?offset=${state.offset}&limit=${PAGE_SIZE}`),
        api("/admin/throughput"),
      ]);
      showStats(stats);
      showWorkers(workers.workers);
      showDead(dead, stats.failed);
      showChart(throughput.minutes);
      if (state.lookedUp) await lookUp(state.lookedUp, true);
    } catch (error) {
      failed(error);
    }
  }

  // Events come in bursts: one refresh shortly after, not one per event.
  function refreshSoon() {
    if (state.pending) return;
    state.pending = setTimeout(() => {
      state.pending = null;
      refresh();
    }, 250);
  }

  function showStats(stats) {
    const lanes = $("lanes").tBodies[0];
    lanes.replaceChildren(...stats.lanes.map((lane) => el("tr", { "data-lane": lane.priority },
      el("td", {}, lane.priority),
      el("td", { class: "num depth" }, lane.depth),
      el("td", { class: "num oldest" }, age(lane.oldest_age_seconds)))));
    const counters = [
      ["scheduled", stats.scheduled], ["in flight", stats.in_flight],
      ["live workers", stats.live_workers], ["dead letters", stats.failed],
      ["sent, last minute", stats.sent_last_minute], ["sent, last hour", stats.sent_last_hour],
      ["failed, last minute", stats.failed_last_minute],
      ["failed, last hour", stats.failed_last_hour],
    ];
    $("counters").replaceChildren(...counters.flatMap(([name, value]) => [
      el("dt", {}, name), el("dd", { "data-counter": name }, value)]));
  }

  function showWorkers(workers) {
    const body = $("workers").tBodies[0];
    if (!workers.length) {
      body.replaceChildren(el("tr", {}, el("td", { colspan: 5, class: "empty" }, "no live workers")));
      return;
    }
    body.replaceChildren(...workers.map((worker) => {
      const relay = worker.relay;
      const relayState = relay ? relay.state : "unknown";
      return el("tr", { "data-worker": worker.worker_id },
        el("td", { class: "mono" }, worker.worker_id),
        el("td", { class: "num" + (worker.heartbeat_late ? " late" : "") },
          age(worker.heartbeat_age_seconds) + " ago" + (worker.heartbeat_late ? " (late)" : "")),
        el("td", { class: "state-" + relayState }, relayText(relay)),
        el("td", { class: "num" }, relay && relay.send_rate ? relay.send_rate.toFixed(1) + "/s" : "-"),
        el("td", {}, relay && relay.error ? relay.error : ""));
    }));
  }

  function attemptLog(entries) {
    if (!entries.length) return el("p", { class: "empty" }, "no attempts");
    return el("table", { class: "attempts" },
      el("thead", {}, el("tr", {}, el("th", {}, "At"), el("th", { class: "num" }, "Attempt"),
        el("th", {}, "Outcome"), el("th", { class: "num" }, "Code"), el("th", {}, "Reply"),
        el("th", { class: "num" }, "ms"))),
      el("tbody", {}, ...entries.map((entry) => el("tr", {},
        el("td", {}, when(entry.at)), el("td", { class: "num" }, entry.attempt),
        el("td", {}, entry.outcome), el("td", { class: "num" }, entry.code ?? ""),
        el("td", {}, entry.reply ?? ""),
        el("td", { class: "num" }, entry.duration_ms === null || entry.duration_ms === undefined
          ? "" : Math.round(entry.duration_ms))))));
  }

  function actionButton(label, kind, taskId) {
    const button = el("button", { type: "button", class: kind, "data-task-id": taskId }, label);
    button.hidden = state.readOnly;
    button.addEventListener("click", () => act(kind, taskId, button));
    return button;
  }

  function taskLink(taskId) {
    return el("button", { type: "button", class: "link mono", onclick: () => lookUp(taskId) },
      taskId);
  }

  function showDead(page, total) {
    const body = $("dead").tBodies[0];
    $("dead-count").textContent = "(" + total + ")";
    if (!page.tasks.length) {
      body.replaceChildren(el("tr", {}, el("td", { colspan: 6, class: "empty" }, "none")));
    } else {
      body.replaceChildren(...page.tasks.map((task) => el("tr", { "data-task-id": task.task_id },
        el("td", {}, taskLink(task.task_id)),
        el("td", {}, when(task.updated_at)),
        el("td", {}, task.to),
        el("td", { class: "num" }, task.attempts),
        el("td", { class: "reason" }, task.reason ?? "",
          el("details", {}, el("summary", {}, "attempt log (" + task.attempt_log.length + ")"),
            attemptLog(task.attempt_log))),
        el("td", {}, actionButton("Requeue", "requeue", task.task_id)))));
    }
    state.nextOffset = page.next_offset ?? null;
    const first = page.tasks.length ? page.offset + 1 : 0;
    $("dead-page").textContent = `${first}-${page.offset + page.tasks.length} of ${total}`;
    $("dead-prev").disabled = page.offset === 0;
    $("dead-next").disabled = state.nextOffset === null;
  }

  $("dead-prev").addEventListener("click", () => {
    state.offset = Math.max(0, state.offset - PAGE_SIZE);
    refresh();
  });
  $("dead-next").addEventListener("click", () => {
    if (state.nextOffset !== null) state.offset = state.nextOffset;
    refresh();
  });

  // -- the chart: inline SVG, one stacked bar per minute ----------------------------------

  function showChart(minutes) {
    const chart = $("chart");
    const width = 720, height = 180, left = 34, bottom = 18, top = 8;
    const plotW = width - left - 4, plotH = height - bottom - top;
    const peak = Math.max(1, ...minutes.map((m) => m.sent + m.failed));
    const step = plotW / Math.max(1, minutes.length);
    const y = (value) => top + plotH - (value / peak) * plotH;
    const nodes = [
      svg("line", { x1: left, y1: top + plotH, x2: width - 4, y2: top + plotH, class: "axis" }),
      svg("line", { x1: left, y1: top, x2: width - 4, y2: top, class: "axis" }),
      svg("text", { x: left - 4, y: top + 8, "text-anchor": "end" }, String(peak)),
      svg("text", { x: left - 4, y: top + plotH, "text-anchor": "end" }, "0"),
    ];
    let sent = 0, failures = 0;
    minutes.forEach((minute, i) => {
      sent += minute.sent;
      failures += minute.failed;
      const x = left + i * step;
      const label = `${new Date(minute.at).toLocaleTimeString()}: ${minute.sent} sent, ${minute.failed} failed`;
      const group = svg("g", {});
      group.append(svg("title", {}, label));
      if (minute.sent) {
        group.append(svg("rect", { x, width: Math.max(1, step - 1), y: y(minute.sent),
          height: top + plotH - y(minute.sent), class: "sent" }));
      }
      if (minute.failed) {
        const base = y(minute.sent);
        group.append(svg("rect", { x, width: Math.max(1, step - 1),
          y: base - (plotH * minute.failed) / peak, height: (plotH * minute.failed) / peak,
          class: "failed" }));
      }
      nodes.push(group);
    });
    const span = minutes.length;
    for (const [i, text] of [[0, `-${span} min`], [Math.floor(span / 2), `-${Math.ceil(span / 2)} min`],
      [span - 1, "now"]]) {
      nodes.push(svg("text", { x: left + i * step, y: height - 4,
        "text-anchor": i === 0 ? "start" : i === span - 1 ? "end" : "middle" }, text));
    }
    chart.replaceChildren(...nodes);
    $("chart-total").textContent = `(${sent} sent, ${failures} failed in ${span} min)`;
  }

  // -- task lookup and actions ------------------------------------------------------------

  async function lookUp(taskId, quiet) {
    state.lookedUp = taskId;
    $("lookup-id").value = taskId;
    let task;
    try {
      task = await api("/email/result?task_id=" + encodeURIComponent(taskId));
    } catch (error) {
      if (!quiet) {
        $("task").replaceChildren(el("p", { class: "empty" }, error.message));
        state.lookedUp = null;
      }
      return;
    }
    const fields = [
      ["status", el("span", { class: "status-" + task.status, id: "task-status" }, task.status)],
      ["task id", el("span", { class: "mono" }, task.task_id)], ["to", task.to],
      ["priority", task.priority], ["attempts", task.attempts], ["reason", task.reason],
      ["created", when(task.created_at)], ["updated", when(task.updated_at)],
      ["sent", task.sent_at && when(task.sent_at)],
      ["next attempt", task.next_attempt_at && when(task.next_attempt_at)],
      ["scheduled for", task.scheduled_at && when(task.scheduled_at)],
      ["expires", task.expires_at && when(task.expires_at)], ["request id", task.request_id],
    ].filter(([, value]) => value !== null && value !== undefined && value !== "");
    const actions = el("p", {});
    if (task.status === "failed") actions.append(actionButton("Requeue", "requeue", task.task_id));
    if (task.status === "pending") actions.append(actionButton("Cancel", "cancel", task.task_id));
    $("task").replaceChildren(
      el("dl", {}, ...fields.flatMap(([name, value]) => [el("dt", {}, name), el("dd", {}, value)])),
      actions, el("h3", {}, "Attempt log"), attemptLog(task.attempt_log));
  }

  $("lookup-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const taskId = $("lookup-id").value.trim();
    if (taskId) lookUp(taskId);
  });

  async function act(kind, taskId, button) {
    if (kind === "cancel" && !window.confirm("Cancel task " + taskId + "? It will never be sent.")) return;
    button.disabled = true;
    try {
      await api(`/admin/tasks/${encodeURIComponent(taskId)}/${kind}`, { method: "POST" });
      say((kind === "requeue" ? "Requeued " : "Cancelled ") + taskId);
    } catch (error) {
      failed(error);
    }
    refreshSoon();
  }

  // -- live updates: server-sent events over fetch() --------------------------------------

  function stopStream() {
    if (state.stream) state.stream.abort();
    state.stream = null;
  }

  function showEvent(event) {
    state.events.unshift(event);
    state.events.length = Math.min(state.events.length, EVENTS_SHOWN);
    $("events").tBodies[0].replaceChildren(...state.events.map((e) => el("tr", { "data-type": e.type },
      el("td", {}, when(new Date(e.time).toISOString())), el("td", {}, e.type),
      el("td", {}, taskLink(e.task_id)), el("td", {}, e.lane), el("td", { class: "num" }, e.attempt),
      el("td", { class: "num" }, e.code ?? ""), el("td", {}, e.reason))));
  }

  function onFrame(text) {
    let id = null, name = "message";
    const data = [];
    for (const line of text.split("\n")) {
      if (line.startsWith(":")) continue; // a keepalive comment
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "id") id = value;
      else if (field === "event") name = value;
      else if (field === "data") data.push(value);
    }
    if (id !== null) state.lastEventId = id;
    if (!data.length) return;
    if (name === "unavailable") {
      setLive("Redis unavailable", "warn");
      return;
    }
    setLive("live", "on");
    showEvent(JSON.parse(data.join("\n")));
    refreshSoon();
  }

  async function connect() {
    stopStream();
    const controller = new AbortController();
    state.stream = controller;
    const headers = authHeaders();
    if (state.lastEventId) headers["Last-Event-ID"] = state.lastEventId;
    // The first connection starts with what just happened; a reconnection goes on from
    // the last event seen.
    const path = "/admin/events" + (state.lastEventId ? "" : "?backlog=" + EVENTS_SHOWN);
    try {
      const response = await fetch(API + path, { headers, cache: "no-store",
        signal: controller.signal });
      if (response.status === 401) {
        needKey("The admin key was refused.");
        return;
      }
      if (!response.ok || !response.body) throw new Error("HTTP " + response.status);
      setLive("live", "on");
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value.replace(/\r\n?/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          onFrame(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
        }
      }
    } catch (error) {
      if (controller.signal.aborted) return;
    }
    if (state.stream !== controller) return;
    // The server stopped or the connection dropped: refresh, and resume from the last id.
    setLive("reconnecting", "off");
    setTimeout(() => {
      if (state.stream === controller) {
        refresh();
        connect();
      }
    }, 3000);
  }

  start();
})();
