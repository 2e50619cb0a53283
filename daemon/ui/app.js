// berth's status page. Every number comes from the same admin API the `berth` CLI calls;
// events and logs arrive as streams (fetch + ReadableStream, so the token travels in a header,
// never in a URL). All text from the API goes into the page through textContent only.
"use strict";

(() => {
  const TOKEN_KEY = "berth.admin-token";
  const REFRESH_MS = 10000;  // GPU samples and in-flight counts change without an event
  const EVENTS_KEPT = 200;
  const LOG_LINES_KEPT = 1000;
  const $ = (id) => document.getElementById(id);
  const state = { token: sessionStorage.getItem(TOKEN_KEY) || "", view: null, endpoint: null,
                  events: null, logs: null, timer: null, pending: null, lastEventTs: 0,
                  lastEventId: 0 };

  class ApiError extends Error {
    constructor(status, code, message) { super(message); this.status = status; this.code = code; }
  }

  function authHeaders() {
    return state.token ? { Authorization: "Bearer " + state.token } : {};
  }

  async function api(method, path, body) {
    const init = { method, headers: authHeaders(), cache: "no-store", credentials: "omit" };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const resp = await fetch(path, init);
    const text = await resp.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
    if (!resp.ok && !(path === "/healthz" && data)) {
      const err = (data && data.error) || {};
      throw new ApiError(resp.status, err.code || "http_" + resp.status, err.message || resp.statusText);
    }
    return data;
  }

  // Reads a streamed answer line by line until it ends or `signal` aborts it.
  async function streamLines(path, signal, onLine) {
    const resp = await fetch(path, { headers: authHeaders(), signal, cache: "no-store", credentials: "omit" });
    if (!resp.ok) throw new ApiError(resp.status, "stream_refused", resp.statusText);
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let at;
      while ((at = buffer.indexOf("\n")) >= 0) {
        onLine(buffer.slice(0, at));
        buffer = buffer.slice(at + 1);
      }
    }
  }

  // --- small DOM helpers ------------------------------------------------------------------

  function el(tag, text, cls) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (cls) node.className = cls;
    return node;
  }

  function fillTable(id, rows, empty) {
    const body = $(id).tBodies[0];
    body.replaceChildren();
    if (!rows.length) {
      const td = el("td", empty, "note");
      td.colSpan = $(id).tHead.rows[0].cells.length;
      body.append(el("tr"));
      body.lastChild.append(td);
      return;
    }
    for (const cells of rows) {
      const tr = el("tr");
      for (const cell of cells) {
        const td = cell instanceof Node ? el("td") : el("td", cell);
        if (cell instanceof Node) td.append(cell);
        tr.append(td);
      }
      body.append(tr);
    }
  }

  const clock = (ts) => ts ? new Date(ts * 1000).toLocaleTimeString() : "–";
  const dash = (v, unit) => (v === null || v === undefined) ? "–" : v + (unit || "");
  const seconds = (s) => (s === null || s === undefined) ? "–" : s.toFixed(1) + " s";

  function show(section) {
    for (const id of ["sign-in", "overview", "endpoint"]) $(id).hidden = id !== section;
    state.view = section;
  }

  function summarize(text, level) {
    $("summary").textContent = text;
    $("summary").className = "summary " + level;
  }

  // --- sign-in ----------------------------------------------------------------------------

  function signIn(message) {
    stopStreams();
    show("sign-in");
    $("sign-out").hidden = true;
    summarize("Sign in with the admin token", "warn");
    $("sign-in-error").textContent = message || "";
    $("token").focus();
  }

  async function trySignIn(event) {
    event.preventDefault();
    state.token = $("token").value.trim();
    $("token").value = "";
    try {
      await api("GET", "/v1/endpoints");
    } catch (err) {
      state.token = "";
      sessionStorage.removeItem(TOKEN_KEY);
      signIn(err.status === 401 || err.status === 403 ? "Token refused: " + err.message : err.message);
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, state.token);
    begin();
  }

  function signOut() {
    state.token = "";
    sessionStorage.removeItem(TOKEN_KEY);
    signIn("Signed out.");
  }

  // --- the overview -----------------------------------------------------------------------

  function attention(health, endpoints, gpus) {
    const issues = [];
    if (health.status !== "ok") issues.push(["bad", "Docker engine: " + (health.docker || health.status)]);
    if (health.state_disk) issues.push(["warn", "State disk " + health.state_disk]);
    if (health.gpus) issues.push(["warn", "GPU " + health.gpus]);
    for (const e of endpoints) {
      if (e.error) issues.push(["bad", e.name + ": " + e.error]);
      else if (e.queued > 0 && !e.replicas.some((r) => r.state === "ready")) {
        issues.push(["warn", e.name + ": " + e.queued + " call(s) waiting for a replica"]);
      }
    }
    for (const g of gpus) {
      if (g.healthy === false) issues.push(["bad", "GPU " + g.index + " unhealthy: " + (g.health_reason || "")]);
    }
    return issues;
  }

  function renderSummary(health, endpoints, gpus) {
    const issues = attention(health, endpoints, gpus);
    if (issues.length) {
      const level = issues.some(([l]) => l === "bad") ? "bad" : "warn";
      summarize("Needs attention: " + issues.map(([, text]) => text).join(" · "), level);
      return;
    }
    const ready = endpoints.reduce((n, e) => n + e.replicas.filter((r) => r.state === "ready").length, 0);
    summarize(`All is well: ${endpoints.length} endpoint(s), ${ready} replica(s) ready, ${gpus.length} GPU(s)`, "ok");
  }

  function endpointLink(name) {
    const a = el("a", name);
    a.href = "#/endpoint/" + encodeURIComponent(name);
    return a;
  }

  function gpuHealth(g) {
    if (g.healthy === false) return el("span", "unhealthy: " + g.health_reason, "bad");
    if (g.cordoned) return el("span", "cordoned: " + g.cordon_reason, "warn");
    return el("span", "ok", "ok");
  }

  async function refreshOverview() {
    const [health, eps, gpus, counts] = await Promise.all([
      api("GET", "/healthz"), api("GET", "/v1/endpoints"), api("GET", "/v1/gpus"),
      api("GET", "/v1/tasks/counts").catch(() => ({ counts: [] }))]);
    renderSummary(health, eps.endpoints, gpus.gpus);
    fillTable("endpoints", eps.endpoints.map((e) => {
      const ready = e.replicas.filter((r) => r.state === "ready").length;
      const live = e.replicas.filter((r) => r.state !== "stopped" && r.state !== "failed").length;
      return [endpointLink(e.name), el("span", e.status, e.error ? "bad" : ""), `${ready}/${live}`,
              e.in_flight, e.queued, (e.spec.models || []).join(", ") || "–", e.error || "–"];
    }), "No endpoints yet.");
    fillTable("gpus", gpus.gpus.map((g) => [
      g.index, g.name, g.memory_used_mib === null ? `${g.memory_mib} MiB` : `${g.memory_used_mib} / ${g.memory_mib} MiB`,
      dash(g.utilization_pct, "%"), dash(g.temperature_c, " °C"),
      g.endpoint ? `${g.endpoint} (${g.replica})` : "free", gpuHealth(g)]), "No GPUs.");
    fillTable("tasks", counts.counts.map((c) => [c.endpoint, c.status, c.count]), "No async tasks.");
  }

  // --- one endpoint -----------------------------------------------------------------------

  async function refreshEndpoint() {
    const name = state.endpoint;
    const [health, e, all, gpus] = await Promise.all([
      api("GET", "/healthz"), api("GET", "/v1/endpoints/" + encodeURIComponent(name)),
      api("GET", "/v1/endpoints"), api("GET", "/v1/gpus")]);
    renderSummary(health, all.endpoints, gpus.gpus);  // the line speaks for the whole box
    $("ep-name").textContent = e.name;
    $("ep-status").textContent = `${e.status} · generation ${e.generation} · ${e.source}-owned · ` +
      `${e.in_flight} in flight · ${e.queued} queued` + (e.error ? " · error: " + e.error : "");
    fillTable("replicas", e.replicas.map((r) => [
      r.id, r.state, r.generation, r.gpus.map((g) => g.index ?? g.uuid).join(", ") || "–", r.in_flight,
      clock(r.ready_at), r.failures, r.reason || "–"]), "No replicas (scaled to zero).");
    const starts = e.starts ? [["last", e.starts.last], [`median of ${e.starts.count}`, e.starts.median]] : [];
    fillTable("starts", starts.map(([label, s]) => [label, seconds(s.pull_s), seconds(s.create_s),
      seconds(s.start_s), seconds(s.load_s), seconds(s.total_s)]), "No cold start since berthd started.");
    $("spec").textContent = JSON.stringify(e.spec, null, 2);
    const min = $("scale-min"), max = $("scale-max");
    if (!min.dataset.loaded || min.dataset.loaded !== name) {
      min.value = e.spec.min_replicas;
      max.value = e.spec.max_replicas;
      min.dataset.loaded = name;
    }
  }

  async function act(what, method, path, body) {
    $("ep-action").textContent = what + "…";
    try {
      await api(method, path, body);
      $("ep-action").textContent = what + ": done.";
    } catch (err) {
      $("ep-action").textContent = `${what} refused: ${err.message} (${err.code})`;
    }
    scheduleRefresh(0);
  }

  function scale(event) {
    event.preventDefault();
    const body = { min_replicas: Number($("scale-min").value), max_replicas: Number($("scale-max").value) };
    act("Scale", "PATCH", "/v1/endpoints/" + encodeURIComponent(state.endpoint), body);
  }

  function restart() {
    act("Restart", "POST", "/v1/endpoints/" + encodeURIComponent(state.endpoint) + "/restart");
  }

  function followLogs(name) {
    const controller = new AbortController();
    state.logs = controller;
    const pre = $("logs");
    pre.textContent = "";
    $("logs-state").textContent = "following";
    const lines = [];
    streamLines(`/v1/endpoints/${encodeURIComponent(name)}/logs?follow=true&tail=200`, controller.signal, (line) => {
      const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      lines.push(line);
      if (lines.length > LOG_LINES_KEPT) lines.splice(0, lines.length - LOG_LINES_KEPT);
      pre.textContent = lines.join("\n");
      if (atBottom) pre.scrollTop = pre.scrollHeight;
    }).then(() => { $("logs-state").textContent = "ended"; },
            (err) => { if (err.name !== "AbortError") $("logs-state").textContent = "stopped: " + err.message; });
  }

  // --- live events --------------------------------------------------------------------------

  function addEvent(e) {
    const li = el("li");
    li.append(el("time", clock(e.ts)), el("span", e.kind, "kind"),
              el("span", (e.endpoint ? e.endpoint + ": " : "") + e.message));
    li.dataset.kind = e.kind;
    $("events").prepend(li);
    while ($("events").children.length > EVENTS_KEPT) $("events").lastChild.remove();
    state.lastEventTs = Math.max(state.lastEventTs, e.ts);
  }

  function followEvents() {
    const controller = new AbortController();
    state.events = controller;
    const since = state.lastEventTs ? `&since=${state.lastEventTs}` : "";
    streamLines(`/v1/events?follow=true&limit=30${since}`, controller.signal, (line) => {
      if (!line.startsWith("data: ")) return;
      const event = JSON.parse(line.slice(6));
      if (!event.kind) return;  // the "behind" notice: the stream ends and reconnects
      if (event.id && event.id <= state.lastEventId) return;  // seen before a reconnect
      state.lastEventId = Math.max(state.lastEventId, event.id || 0);
      addEvent(event);
      scheduleRefresh(250);
    }).then(() => reconnectEvents(controller), (err) => {
      if (err.status === 401) signIn("Token refused: " + err.message);
      else reconnectEvents(controller);
    });
    $("live").textContent = "live";
    $("live").className = "badge on";
  }

  function reconnectEvents(controller) {
    if (controller.signal.aborted || state.events !== controller) return;
    $("live").textContent = "reconnecting";
    $("live").className = "badge";
    setTimeout(() => { if (state.events === controller) followEvents(); }, 2000);
  }

  // --- views and refresh ------------------------------------------------------------------

  function scheduleRefresh(delay) {
    clearTimeout(state.pending);
    state.pending = setTimeout(refresh, delay);
  }

  async function refresh() {
    clearTimeout(state.timer);
    try {
      if (state.view === "overview") await refreshOverview();
      else if (state.view === "endpoint") await refreshEndpoint();
    } catch (err) {
      if (err.status === 401) { signIn("Token refused: " + err.message); return; }
      summarize("Cannot read berthd: " + err.message, "bad");
    }
    if (state.view !== "sign-in") state.timer = setTimeout(refresh, REFRESH_MS);
  }

  function route() {
    if (state.logs) { state.logs.abort(); state.logs = null; }
    const match = location.hash.match(/^#\/endpoint\/(.+)$/);
    let name = null;
    try { name = match ? decodeURIComponent(match[1]) : null; } catch (_) { name = null; }
    if (name) {
      state.endpoint = name;
      $("ep-action").textContent = "";
      $("scale-min").dataset.loaded = "";
      show("endpoint");
      followLogs(state.endpoint);
    } else {
      show("overview");
    }
    refresh();
  }

  function stopStreams() {
    for (const key of ["events", "logs"]) {
      if (state[key]) { state[key].abort(); state[key] = null; }
    }
    clearTimeout(state.timer);
    clearTimeout(state.pending);
  }

  async function begin() {
    try {
      await api("GET", "/v1/endpoints");
    } catch (err) {
      if (err.status === 401) { signIn(state.token ? "Token refused: " + err.message : ""); return; }
      summarize("Cannot reach berthd: " + err.message, "bad");
      return;
    }
    $("sign-out").hidden = !state.token;  // open mode: nothing to sign out of
    $("events").replaceChildren();
    state.lastEventTs = 0;
    state.lastEventId = 0;
    followEvents();
    route();
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("sign-in-form").addEventListener("submit", trySignIn);
    $("sign-out").addEventListener("click", signOut);
    $("scale-form").addEventListener("submit", scale);
    $("restart").addEventListener("click", restart);
    window.addEventListener("hashchange", () => { if (state.view !== "sign-in") route(); });
    begin();
  });
})();
