// dreamstream browser demo: plain JS, no build step. Protocol v1 (docs/protocol.md).
//
// - One WebSocket to /v1/stream; `start` → `ready`, then pipelined `step`s (up to
//   ready.max_inflight outstanding) paced at the stream's fps; frames arrive as binary messages
//   (16-byte little-endian header + JPEG/PNG/raw payload) and are decoded with createImageBitmap.
// - Frames are shown at the stream's fps from a small playout queue.
// - A dropped connection is resumed automatically (`resume` with the stored session id and
//   token, reconnecting with exponential backoff).
// - Controls are built from ready.action_schema: enum properties become a button pad (WASD and
//   arrows map to up/left/down/right and diagonals), integer/number properties become inputs
//   that arrows nudge.
// - Share: a player's page offers a watch link (`?watch=<session_id>&wt=<watch_token>`); a page
//   opened with one is a read-only spectator (`watch` → `watching`, then the session's frames,
//   drawn by the same code) with its own stats: fps, steps dropped, latency behind the player,
//   viewers. Its controls are disabled and hidden.
// - `window.dreamstream` exposes state and counters for tests and debugging.
"use strict";

// Query parameters of a watch link (protocol/constants.py WATCH_LINK_SESSION_PARAM and
// WATCH_LINK_TOKEN_PARAM): /?watch=<session_id>&wt=<watch_token>[&token=<server token>]
const WATCH_LINK_SESSION_PARAM = "watch";
const WATCH_LINK_TOKEN_PARAM = "wt";

(() => {
  const $ = (id) => document.getElementById(id);
  const els = {
    canvas: $("screen"), conn: $("conn"), pipeline: $("pipeline"), error: $("error"),
    seed: $("seed"), randomSeed: $("random-seed"), start: $("start"), stop: $("stop"),
    codec: $("codec"), actions: $("actions"), actionNow: $("action-now"), options: $("options"),
    fps: $("ov-fps"), latency: $("ov-latency"), pct: $("ov-pct"), ttff: $("ov-ttff"),
    inflight: $("ov-inflight"), step: $("ov-step"), viewers: $("ov-viewers"),
    behind: $("ov-behind"), dropped: $("ov-dropped"), playPanel: $("play-panel"),
    share: $("share"), shareBox: $("share-box"), shareLink: $("share-link"), shareCopy: $("share-copy"),
    watchStatus: $("watch-status"), playOwn: $("play-own"),
  };
  const ctx = els.canvas.getContext("2d");
  const params = new URLSearchParams(location.search);
  const WATCH = params.has(WATCH_LINK_SESSION_PARAM);  // a watch link's page: read-only spectator
  const HEADER_BYTES = 16;
  const CODEC_MIME = { 1: "image/jpeg", 2: "image/png" };
  const FATAL_NO_RESUME = new Set(["idle_timeout", "internal", "overloaded", "too_large", "unknown_session"]);
  const MIN_LEAD_STEPS = 2;  // steps kept ahead of the display (in flight + decoded, waiting)
  const BACKOFF_MS = [250, 500, 1000, 2000, 4000, 5000];
  const MAX_RECONNECTS = 20;
  const BEHIND_EMA_WEIGHT = 0.1;     // weight of a new step in the moving average of behind_ms
  const WATCH_MAX_QUEUED_FRAMES = 8; // a spectator skips the oldest frames beyond this many waiting

  const dbg = {
    mode: WATCH ? "watch" : "play",
    connection: "idle",     // idle | connecting | ready | watching | reconnecting | ended | closed | error
    lastAction: null,       // action of the last step sent
    lastError: null,        // {code, message, step, fatal} or {code: "connection", ...}
    ready: null,            // last ready message
    sessionId: null,
    counters: { stepsSent: 0, stepsDone: 0, framesReceived: 0, framesDrawn: 0, errors: 0,
                reconnects: 0, resumes: 0, restarts: 0, underruns: 0, framesSkipped: 0 },
    latencyMs: null, ttffMs: null, fps: 0, inflight: 0, nextStep: 0,
    latencies: [],
    watchers: null,         // connections watching the session (last step_done / watching)
    watch: WATCH ? { sessionId: params.get(WATCH_LINK_SESSION_PARAM), steps: 0, lastStep: null,
                     dropped: 0, behindMs: null, ended: false } : null,
  };
  window.dreamstream = dbg;

  let ws = null;
  let ready = null;            // the player's `ready` (null on a watch link's page)
  let watching = null;         // the spectator's `watching` of the current connection
  let schema = null;
  let wantRunning = false;     // user pressed Start and not Stop
  let startedAt = 0;           // performance.now() when Start was pressed (for time to first frame)
  let firstFrameShown = false;
  let reconnectAttempt = 0;
  let reconnectTimer = null;
  let stepTimer = null;
  let drawTimer = null;
  let nextStep = 0;
  const inflight = new Map();  // step → {sentAt, action}
  const playout = [];          // [{bitmap|null, failed, step}] in arrival order
  const drawTimes = [];        // performance.now() of recent draws (fps meter)

  // ---- controls from the action schema ---------------------------------------------------
  const control = { kind: "none", enumName: null, values: [], held: new Set(), tap: null,
                    numbers: {}, inputs: {}, buttons: new Map() };
  const DIRS = { up: [0, -1], down: [0, 1], left: [-1, 0], right: [1, 0] };
  const KEYMAP = { w: "up", arrowup: "up", s: "down", arrowdown: "down",
                   a: "left", arrowleft: "left", d: "right", arrowright: "right" };

  function resolve(node) {
    for (let i = 0; i < 16 && node; i++) {
      if (node.$ref) {
        let target = schema;
        for (const part of node.$ref.replace(/^#\//, "").split("/")) target = (target || {})[part];
        node = Object.assign({}, target, node); delete node.$ref;
      } else if (node.allOf && node.allOf.length === 1) {
        node = Object.assign({}, node.allOf[0], node); delete node.allOf;
      } else if (node.anyOf) {
        const opt = node.anyOf.find((o) => o.type !== "null") || {};
        node = Object.assign({}, opt, node); delete node.anyOf;
      } else break;
    }
    return node || {};
  }

  function buildControls(actionSchema) {
    schema = actionSchema || {};
    const root = resolve(schema);
    const props = root.properties || {};
    els.actions.textContent = "";
    control.kind = "none"; control.values = []; control.numbers = {}; control.inputs = {};
    control.buttons.clear();
    const names = Object.keys(props);
    const enumName = names.find((n) => Array.isArray(resolve(props[n]).enum));
    if (enumName) {
      control.kind = "enum"; control.enumName = enumName;
      control.values = resolve(props[enumName]).enum.map(String);
      control.default = resolve(props[enumName]).default ?? (control.values.includes("none") ? "none" : null);
      const pad = document.createElement("div");
      const grid = ["up_left", "up", "up_right", "left", "none", "right", "down_left", "down", "down_right"];
      const isPad = ["up", "down", "left", "right"].every((v) => control.values.includes(v));
      pad.className = isPad ? "pad" : "list";
      const order = isPad ? grid : control.values;
      for (const v of order) {
        if (!control.values.includes(v)) { pad.appendChild(document.createElement("span")); continue; }
        const b = document.createElement("button");
        b.type = "button"; b.dataset.action = v; b.textContent = v.replace("_", " ");
        b.addEventListener("pointerdown", (e) => { e.preventDefault(); control.held.add("btn:" + v); control.tap = v; refresh(); });
        for (const ev of ["pointerup", "pointerleave", "pointercancel"]) {
          b.addEventListener(ev, () => { control.held.delete("btn:" + v); refresh(); });
        }
        control.buttons.set(v, b);
        pad.appendChild(b);
      }
      els.actions.appendChild(pad);
      for (const n of names.filter((n) => n !== enumName)) addField(n, resolve(props[n]));
    } else {
      const numeric = names.filter((n) => ["integer", "number"].includes(resolve(props[n]).type));
      control.kind = numeric.length ? "numbers" : "none";
      for (const n of names) addField(n, resolve(props[n]));
      if (numeric.length) {
        const pad = document.createElement("div");
        pad.className = "pad";
        const grid = [null, "up", null, "left", null, "right", null, "down", null];
        for (const dir of grid) {
          if (!dir) { pad.appendChild(document.createElement("span")); continue; }
          const b = document.createElement("button");
          b.type = "button"; b.dataset.action = dir; b.textContent = dir;
          b.addEventListener("click", () => nudge(dir));
          control.buttons.set(dir, b);
          pad.appendChild(b);
        }
        els.actions.appendChild(pad);
      }
    }
    refresh();
  }

  function addField(name, prop) {
    const type = prop.type;
    if (!["integer", "number", "boolean"].includes(type)) return;
    const row = document.createElement("div");
    row.className = "field";
    const label = document.createElement("label");
    label.textContent = name; label.htmlFor = "act-" + name;
    const input = document.createElement("input");
    input.id = "act-" + name;
    if (type === "boolean") {
      input.type = "checkbox"; input.checked = Boolean(prop.default);
    } else {
      input.type = "number"; input.step = type === "integer" ? "1" : "any";
      if (prop.minimum !== undefined) input.min = prop.minimum;
      if (prop.maximum !== undefined) input.max = prop.maximum;
      input.value = prop.default ?? 0;
    }
    input.addEventListener("input", refresh);
    control.inputs[name] = { input, prop };
    row.append(label, input);
    els.actions.appendChild(row);
  }

  // ---- start options from the options schema (numbers and booleans; others keep defaults) ----
  const optionInputs = {};

  function buildOptions(optionsSchema) {
    const saved = schema;
    schema = optionsSchema || {};  // resolve() follows $refs within the schema being read
    const props = resolve(schema).properties || {};
    els.options.textContent = "";
    for (const key of Object.keys(optionInputs)) delete optionInputs[key];
    for (const [name, raw] of Object.entries(props)) {
      const prop = resolve(raw);
      if (!["integer", "number", "boolean"].includes(prop.type)) continue;
      const row = document.createElement("div");
      row.className = "group";
      const label = document.createElement("label");
      label.textContent = name.replace(/_/g, " "); label.htmlFor = "opt-" + name;
      label.title = prop.description || name;
      const input = document.createElement("input");
      input.id = "opt-" + name;
      if (prop.type === "boolean") {
        input.type = "checkbox"; input.checked = Boolean(prop.default);
      } else {
        input.type = "number"; input.step = prop.type === "integer" ? "1" : "any";
        if (prop.minimum !== undefined) input.min = prop.minimum;
        if (prop.maximum !== undefined) input.max = prop.maximum;
        input.value = prop.default ?? "";
        if (params.has(name)) input.value = params.get(name);
      }
      optionInputs[name] = { input, prop };
      row.append(label, input);
      els.options.appendChild(row);
    }
    schema = saved;
  }

  function startOptions() {
    const out = {};
    for (const [name, { input, prop }] of Object.entries(optionInputs)) {
      if (prop.type === "boolean") out[name] = input.checked;
      else if (input.value !== "") out[name] = prop.type === "integer" ? Math.trunc(Number(input.value)) : Number(input.value);
    }
    return out;
  }

  function nudge(dir) {
    // integer/number schemas: arrows move the pattern offset (first two numeric fields = x, y)
    const numeric = Object.keys(control.inputs).filter((n) => control.inputs[n].prop.type !== "boolean");
    const [dx, dy] = DIRS[dir];
    const targets = [[numeric[0], dx], [numeric[1], dy]];
    for (const [name, delta] of targets) {
      if (!name || !delta) continue;
      const { input, prop } = control.inputs[name];
      let v = Number(input.value || 0) + delta;
      if (prop.minimum !== undefined) v = Math.max(prop.minimum, v);
      if (prop.maximum !== undefined) v = Math.min(prop.maximum, v);
      input.value = String(v);
    }
    refresh();
  }

  function heldDirection() {
    const dirs = new Set();
    for (const h of control.held) dirs.add(h.startsWith("btn:") ? h.slice(4) : h);
    if (dirs.size === 0) return null;
    for (const d of dirs) if (!(d in DIRS)) return d; // a non-direction button (e.g. "none")
    let x = 0, y = 0;
    for (const d of dirs) { x += DIRS[d][0]; y += DIRS[d][1]; }
    const v = (y < 0 ? "up" : y > 0 ? "down" : "") + (x && y ? "_" : "") + (x < 0 ? "left" : x > 0 ? "right" : "");
    if (v && control.values.includes(v)) return v;
    return [...dirs].reverse().find((d) => control.values.includes(d)) || null;
  }

  function currentAction(consume) {
    if (control.kind === "none") return null;
    const action = {};
    for (const [name, { input, prop }] of Object.entries(control.inputs)) {
      if (prop.type === "boolean") action[name] = input.checked;
      else if (input.value !== "") action[name] = prop.type === "integer" ? Math.trunc(Number(input.value)) : Number(input.value);
    }
    if (control.kind === "enum") {
      let v = heldDirection();
      if (v === null && control.tap !== null) v = control.tap;     // a short tap still counts once
      if (consume) control.tap = null;
      action[control.enumName] = v ?? control.default ?? control.values[0];
    }
    return action;
  }

  function refresh() {
    const a = currentAction(false);
    els.actionNow.textContent = "action: " + JSON.stringify(a);
    const active = control.kind === "enum" ? a[control.enumName] : null;
    for (const [v, b] of control.buttons) b.classList.toggle("active", v === active);
  }

  document.addEventListener("keydown", (e) => {
    if (WATCH || e.target instanceof HTMLInputElement || e.target instanceof HTMLSelectElement) return;
    const dir = KEYMAP[e.key.toLowerCase()];
    if (!dir) return;
    e.preventDefault();
    if (control.kind === "numbers") { nudge(dir); return; }
    control.held.add(dir); control.tap = heldDirection(); refresh();
  });
  document.addEventListener("keyup", (e) => {
    const dir = KEYMAP[e.key.toLowerCase()];
    if (dir) { control.held.delete(dir); refresh(); }
  });
  window.addEventListener("blur", () => { control.held.clear(); refresh(); });

  // ---- UI state --------------------------------------------------------------------------
  function setConn(state, text) {
    dbg.connection = state;
    els.conn.dataset.state = state;
    els.conn.textContent = text || state;
    els.start.disabled = wantRunning;
    els.stop.disabled = !wantRunning;
    updateShare();
  }

  function showError(code, message, extra) {
    dbg.lastError = Object.assign({ code, message }, extra || {});
    dbg.counters.errors += 1;
    els.error.hidden = false;
    els.error.textContent = `${code}: ${message}`;
  }

  function clearError() { els.error.hidden = true; els.error.textContent = ""; }

  function fmtMs(v) { return v === null || v === undefined ? "–" : `${v.toFixed(1)} ms`; }

  function percentile(sorted, q) {
    if (!sorted.length) return null;
    return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
  }

  function updateOverlay() {
    const now = performance.now();
    while (drawTimes.length && now - drawTimes[0] > 1000) drawTimes.shift();
    dbg.fps = drawTimes.length;
    const stream = ready || watching;
    els.fps.textContent = stream ? `${dbg.fps} / ${stream.fps}` : "–";
    els.ttff.textContent = fmtMs(dbg.ttffMs);
    els.viewers.textContent = dbg.watchers === null ? "–" : String(dbg.watchers);
    if (WATCH) updateWatchOverlay(); else updatePlayerOverlay();
  }

  function updatePlayerOverlay() {
    dbg.inflight = inflight.size;
    dbg.nextStep = nextStep;
    els.latency.textContent = fmtMs(dbg.latencyMs);
    const sorted = [...dbg.latencies].sort((a, b) => a - b);
    const p50 = percentile(sorted, 0.5), p99 = percentile(sorted, 0.99);
    els.pct.textContent = p50 === null ? "–" : `${p50.toFixed(1)} / ${p99.toFixed(1)} ms`;
    els.inflight.textContent = ready ? `${inflight.size} / ${ready.max_inflight}` : "–";
    els.step.textContent = ready ? String(nextStep) : "–";
  }

  function updateWatchOverlay() {
    const w = dbg.watch;
    els.behind.textContent = fmtMs(w.behindMs);
    els.dropped.textContent = watching || w.steps ? String(w.dropped) : "–";
    els.step.textContent = w.lastStep === null ? "–" : String(w.lastStep);
  }
  setInterval(updateOverlay, 250);

  // ---- connection ------------------------------------------------------------------------
  function wsUrl() {
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    const token = params.get("token");
    return `${proto}//${location.host}/v1/stream` + (token ? `?token=${encodeURIComponent(token)}` : "");
  }

  // A connection for an existing session (resume, watch) offers the subprotocol naming it, the one
  // header a browser can set: a fleet (dreamstream serve --ray) routes it to the server holding
  // the session (protocol/routing.py, docs/protocol.md "Fleets").
  const SESSION_SUBPROTOCOL_PREFIX = "dreamstream.session.";

  function openSocket(onOpen, sessionId) {
    const routed = sessionId && /^[A-Za-z0-9._~-]{1,128}$/.test(sessionId);  // a valid subprotocol token
    const sock = routed ? new WebSocket(wsUrl(), [SESSION_SUBPROTOCOL_PREFIX + sessionId]) : new WebSocket(wsUrl());
    sock.binaryType = "arraybuffer";
    ws = sock;
    sock.onopen = () => { if (ws === sock) onOpen(sock); };
    sock.onmessage = (ev) => { if (ws === sock) onMessage(ev); };
    sock.onclose = (ev) => { if (ws === sock) onClose(ev); };
    sock.onerror = () => {};  // onclose follows with the details
    return sock;
  }

  function send(obj) {
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(obj));
  }

  function start() {
    if (WATCH) return;  // a spectator's page never drives a session
    stop(false);
    wantRunning = true;
    clearError();
    dbg.lastError = null;
    firstFrameShown = false;
    dbg.ttffMs = null; dbg.latencies = []; dbg.latencyMs = null;
    startedAt = performance.now();
    reconnectAttempt = 0;
    setConn("connecting");
    const seed = Math.max(0, Math.trunc(Number(els.seed.value) || 0));
    openSocket((sock) => {
      const msg = { type: "start", seed, codec: els.codec.value };
      const options = startOptions();
      if (Object.keys(options).length) msg.options = options;
      sock.send(JSON.stringify(msg));
    });
  }

  function stop(sendEnd = true) {
    wantRunning = false;
    clearTimeout(reconnectTimer); reconnectTimer = null;
    stopPacing();
    if (ws) {
      const sock = ws;
      ws = null;
      if (sendEnd && sock.readyState === WebSocket.OPEN && ready) sock.send(JSON.stringify({ type: "end" }));
      setTimeout(() => { try { sock.close(1000); } catch (e) { /* already closed */ } }, sendEnd ? 200 : 0);
    }
    ready = null; dbg.ready = null; dbg.sessionId = null; dbg.watchers = null;
    inflight.clear(); playout.length = 0;
    setConn("idle", "stopped");
  }

  function resume() {
    if (!dbg.ready) return;
    setConn("reconnecting", `resuming (try ${reconnectAttempt})`);
    const { session_id, resume_token } = dbg.ready;
    openSocket((sock) => sock.send(JSON.stringify({ type: "resume", session_id, resume_token })), session_id);
  }

  // retry after a backoff: `resume` (a player) or `watch` again (a spectator)
  function scheduleReconnect(reason, retry) {
    if (reconnectAttempt >= MAX_RECONNECTS) {
      wantRunning = false;
      const hint = WATCH ? "reload the page to watch again" : "press Start";
      showError("connection", `gave up after ${MAX_RECONNECTS} reconnect attempts (${reason}); ${hint}`);
      setConn("error", "disconnected");
      return;
    }
    const delay = BACKOFF_MS[Math.min(reconnectAttempt, BACKOFF_MS.length - 1)];
    reconnectAttempt += 1;
    dbg.counters.reconnects += 1;
    setConn("reconnecting", `reconnecting in ${(delay / 1000).toFixed(1)} s`);
    clearTimeout(reconnectTimer);
    reconnectTimer = setTimeout(retry, delay);
  }

  function closeReason(ev) {
    return `connection closed (code ${ev.code}${ev.reason ? ", " + ev.reason : ""})`;
  }

  function onClose(ev) {
    if (WATCH) { onWatchClose(ev); return; }
    ws = null;
    stopPacing();
    for (const [k] of inflight) nextStep = Math.min(nextStep, k);
    inflight.clear();
    const fatal = dbg.lastError && dbg.lastError.fatal && FATAL_NO_RESUME.has(dbg.lastError.code);
    if (fatal) { wantRunning = false; setConn("error", dbg.lastError.code); return; }
    if (!wantRunning) { setConn("idle", "stopped"); return; }
    const why = closeReason(ev);
    if (!dbg.ready) {
      wantRunning = false;
      showError("connection", `${why}: is the server running at ${location.host}?`);
      setConn("error", "closed");
      return;
    }
    if (!(dbg.lastError && dbg.lastError.code === "shutting_down")) {
      showError("connection", `${why}; reconnecting and resuming session ${dbg.ready.session_id.slice(0, 8)}…`);
    }
    scheduleReconnect(why, resume);
  }

  function onMessage(ev) {
    if (typeof ev.data !== "string") { onFrame(ev.data, performance.now()); return; }
    let msg;
    try { msg = JSON.parse(ev.data); } catch (e) { showError("protocol", "server sent invalid JSON"); return; }
    switch (msg.type) {
      case "ready": onReady(msg); break;
      case "watching": onWatching(msg); break;
      case "step_done": onStepDone(msg); break;
      case "error": if (WATCH) onWatchError(msg); else onServerError(msg); break;
      case "pong": break;
      case "ended": if (WATCH) onWatchEnded(); break;
      default: showError("protocol", `unknown message type ${msg.type}`);
    }
  }

  function onReady(msg) {
    const resumed = dbg.ready && dbg.ready.session_id === msg.session_id;
    ready = msg; dbg.ready = msg; dbg.sessionId = msg.session_id;
    nextStep = msg.next_step;
    reconnectAttempt = 0;
    if (resumed) { dbg.counters.resumes += 1; clearError(); }
    showStream(msg);
    if (!schema || JSON.stringify(schema) !== JSON.stringify(msg.action_schema)) buildControls(msg.action_schema);
    setConn("ready", resumed ? "ready (resumed)" : "ready");
    startPacing();
  }

  // the stream's description (`ready` or `watching`): canvas size and the header line
  function showStream(msg) {
    if (els.canvas.width !== msg.width || els.canvas.height !== msg.height) {
      els.canvas.width = msg.width; els.canvas.height = msg.height;
    }
    els.pipeline.textContent = `${msg.pipeline} · ${msg.width}×${msg.height} · ${msg.fps} fps · ${msg.codec}`;
  }

  // ---- stepping (pipelined, paced at the stream's fps) -----------------------------------
  function stepPeriodMs() { return ready ? (1000 * ready.frames_per_step) / ready.fps : 100; }

  function startPacing() {
    stopPacing();
    pump();
    stepTimer = setInterval(pump, stepPeriodMs());
    startDrawing(ready.fps);
  }

  function startDrawing(fps) {
    clearInterval(drawTimer);
    drawTimer = setInterval(draw, 1000 / fps);
  }

  function stopPacing() {
    clearInterval(stepTimer); stepTimer = null;
    clearInterval(drawTimer); drawTimer = null;
  }

  function pump() {
    if (!ready || !ws || ws.readyState !== WebSocket.OPEN) return;
    const buffered = playout.length + inflight.size * ready.frames_per_step;
    if (inflight.size >= ready.max_inflight) return;
    // keep just enough steps ahead of the display to hide the step latency: more would only add
    // input lag (an action shows up after everything queued before it)
    const lead = Math.max(MIN_LEAD_STEPS, ready.max_inflight) * ready.frames_per_step;
    if (buffered >= lead && firstFrameShown) return;
    const action = currentAction(true);
    const k = nextStep++;
    inflight.set(k, { sentAt: performance.now(), action });
    dbg.lastAction = action;
    dbg.counters.stepsSent += 1;
    send({ type: "step", step: k, action, client_ts: Date.now() });
  }

  function onStepDone(msg) {
    if (typeof msg.watchers === "number") dbg.watchers = msg.watchers;
    if (WATCH) onWatchedStep(msg); else onOwnStep(msg);
  }

  function onOwnStep(msg) {
    const entry = inflight.get(msg.step);
    inflight.delete(msg.step);
    dbg.counters.stepsDone += 1;
    if (entry) {
      dbg.latencyMs = performance.now() - entry.sentAt;
      dbg.latencies.push(dbg.latencyMs);
      if (dbg.latencies.length > 120) dbg.latencies.shift();
    }
    dbg.serverTiming = msg.timing;
    pump();
  }

  function onServerError(msg) {
    showError(msg.code, msg.message, { step: msg.step, fatal: msg.fatal });
    if (msg.step !== null && msg.step !== undefined && inflight.has(msg.step)) {
      inflight.delete(msg.step);
      nextStep = Math.min(nextStep, msg.step);  // the session did not advance
    }
    if (msg.fatal) {
      stopPacing();
      if (msg.code === "unknown_session") dbg.ready = null;  // resume window over: start anew
      if (FATAL_NO_RESUME.has(msg.code)) wantRunning = false;
      setConn("error", msg.code);
    } else if (msg.code === "unknown_session") {
      // our resume came too late (resume window over, or the server restarted): start a new
      // session with the same settings after a moment, so the error stays readable
      dbg.ready = null;
      setConn("error", "session expired");
      if (wantRunning) {
        dbg.counters.restarts += 1;
        setTimeout(() => { if (wantRunning && !dbg.ready) start(); }, 1500);
      }
    }
  }

  // ---- frames ----------------------------------------------------------------------------
  function onFrame(buf, now) {
    if (buf.byteLength < HEADER_BYTES) { showError("protocol", "short binary message"); return; }
    const v = new DataView(buf);
    if (v.getUint8(0) !== 0x44 || v.getUint8(1) !== 0x53) { showError("protocol", "bad frame magic"); return; }
    const codec = v.getUint8(3), step = v.getUint32(4, true);
    const width = v.getUint16(12, true), height = v.getUint16(14, true);
    dbg.counters.framesReceived += 1;
    const item = { bitmap: null, failed: false, skipped: false, step, receivedAt: now };
    playout.push(item);
    if (WATCH) skipOldFrames(WATCH_MAX_QUEUED_FRAMES);
    decode(codec, buf, width, height).then(
      (bmp) => { if (item.skipped) { bmp.close(); return; } item.bitmap = bmp; if (!firstFrameShown) draw(); },
      (err) => { item.failed = true; showError("decode", String(err)); },
    );
  }

  // A spectator cannot pace the stream: when frames arrive faster than they are drawn, skip the
  // oldest waiting ones rather than fall further behind the player.
  function skipOldFrames(max) {
    while (playout.length > max) {
      const old = playout.shift();
      old.skipped = true;
      if (old.bitmap) old.bitmap.close();
      dbg.counters.framesSkipped += 1;
    }
  }

  function decode(codec, buf, width, height) {
    const payload = new Uint8Array(buf, HEADER_BYTES);
    if (codec === 0) {
      const rgba = new Uint8ClampedArray(width * height * 4);
      for (let i = 0, j = 0; i < payload.length; i += 3, j += 4) {
        rgba[j] = payload[i]; rgba[j + 1] = payload[i + 1]; rgba[j + 2] = payload[i + 2]; rgba[j + 3] = 255;
      }
      return createImageBitmap(new ImageData(rgba, width, height));
    }
    const mime = CODEC_MIME[codec];
    if (!mime) return Promise.reject(new Error(`unknown codec ${codec}`));
    return createImageBitmap(new Blob([payload], { type: mime }));
  }

  function draw() {
    while (playout.length && playout[0].failed) playout.shift();
    const head = playout[0];
    if (!head) { if (firstFrameShown && inflight.size) dbg.counters.underruns += 1; return; }
    if (!head.bitmap) return;
    playout.shift();
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(head.bitmap, 0, 0, els.canvas.width, els.canvas.height);
    head.bitmap.close();
    dbg.counters.framesDrawn += 1;
    drawTimes.push(performance.now());
    if (!firstFrameShown) {
      firstFrameShown = true;
      dbg.ttffMs = performance.now() - startedAt;
    }
  }

  // ---- share: a watch link to this session -----------------------------------------------
  let shareOpen = false;       // the user asked for the link (Share)

  // the link while this page drives a session whose `ready` has a watch_token, else null
  function watchLink() {
    const r = dbg.ready;
    if (WATCH || !wantRunning || !r || !r.watch_token) return null;
    const q = new URLSearchParams({ [WATCH_LINK_SESSION_PARAM]: r.session_id, [WATCH_LINK_TOKEN_PARAM]: r.watch_token });
    if (params.has("token")) q.set("token", params.get("token"));
    return `${location.origin}${location.pathname}?${q}`;
  }

  function updateShare() {
    const link = watchLink();
    els.share.disabled = !link;
    els.share.setAttribute("aria-expanded", String(Boolean(shareOpen && link)));
    els.shareBox.hidden = !(shareOpen && link);
    els.shareLink.value = link || "";
  }

  function toggleShare() {
    shareOpen = !shareOpen;
    updateShare();
    if (shareOpen) els.shareLink.select();
  }

  function copyShareLink() {
    const link = els.shareLink.value;
    if (!link) return;
    els.shareLink.select();
    const done = (ok) => {
      els.shareCopy.textContent = ok ? "copied" : "press Ctrl+C";
      setTimeout(() => { els.shareCopy.textContent = "copy"; }, 1500);
    };
    const legacyCopy = () => { try { return document.execCommand("copy"); } catch (e) { return false; } };
    if (navigator.clipboard && navigator.clipboard.writeText) {
      navigator.clipboard.writeText(link).then(() => done(true), () => done(legacyCopy()));
    } else done(legacyCopy());
  }

  // ---- watching: a watch link's page (read-only spectator) ---------------------------------
  function watch() {
    watching = null;
    if (!reconnectAttempt) { startedAt = performance.now(); setConn("connecting"); }
    else setConn("reconnecting", `watching again (try ${reconnectAttempt})`);
    els.watchStatus.textContent = reconnectAttempt ? "Connection lost; watching again…" : "Connecting…";
    const msg = { type: "watch", session_id: dbg.watch.sessionId,
                  watch_token: params.get(WATCH_LINK_TOKEN_PARAM) || "" };
    openSocket((sock) => sock.send(JSON.stringify(msg)), dbg.watch.sessionId);
  }

  function onWatching(msg) {
    watching = msg;
    reconnectAttempt = 0;
    dbg.watchers = msg.watchers;
    clearError();
    showStream(msg);
    setConn("watching", "watching");
    els.watchStatus.textContent = `Watching session ${msg.session_id.slice(0, 8)}… live from step ${msg.next_step}.`;
    startDrawing(msg.fps);
  }

  function onWatchedStep(msg) {
    const w = dbg.watch;
    dbg.counters.stepsDone += 1;
    w.steps += 1;
    w.lastStep = msg.step;
    w.dropped += msg.dropped || 0;
    if (typeof msg.behind_ms === "number") {
      w.behindMs = w.behindMs === null ? msg.behind_ms : w.behindMs + BEHIND_EMA_WEIGHT * (msg.behind_ms - w.behindMs);
    }
  }

  function onWatchEnded() {
    dbg.watch.ended = true;
    setConn("ended", "session ended");
    els.watchStatus.textContent = "The session has ended.";
  }

  // a refused `watch` (unknown_session: wrong link or session over; overloaded: too many
  // watchers) or a fatal error: show it and stay disconnected
  function onWatchError(msg) {
    showError(msg.code, msg.message, { step: msg.step, fatal: msg.fatal });
    if (watching && !msg.fatal) return;
    detachWatcher();
    setConn("error", msg.code);
    els.watchStatus.textContent = msg.code === "unknown_session"
      ? "Not watching: the session has ended, or the link is wrong." : `Not watching (${msg.code}).`;
  }

  // no longer connected: stop drawing, forget the viewer count, close (if still open)
  function detachWatcher() {
    const sock = ws;
    ws = null;
    stopPacing();
    dbg.watchers = null;
    if (sock) sock.close(1000);
  }

  function onWatchClose(ev) {
    detachWatcher();
    if (dbg.watch.ended) return;  // `ended` came first: the page says so already
    const why = closeReason(ev);
    if (dbg.lastError && dbg.lastError.fatal) { setConn("error", dbg.lastError.code); return; }
    if (!watching && !reconnectAttempt) {
      showError("connection", `${why}: is the server running at ${location.host}?`);
      setConn("error", "closed");
      return;
    }
    showError("connection", `${why}; watching again…`);
    scheduleReconnect(why, watch);
  }

  // ---- wiring ----------------------------------------------------------------------------
  els.start.addEventListener("click", start);
  els.stop.addEventListener("click", () => stop(true));
  els.randomSeed.addEventListener("click", () => { els.seed.value = String(Math.floor(Math.random() * 1e6)); });
  els.share.addEventListener("click", toggleShare);
  els.shareCopy.addEventListener("click", copyShareLink);
  dbg.start = start;
  dbg.stop = () => stop(true);
  dbg.currentAction = () => currentAction(false);
  // simulate a dropped connection (no `end`): the page must resume the same session
  dbg.debugDrop = () => { if (ws) ws.close(4000, "debug drop"); };

  // ---- page start: a player's page, or a watch link's ------------------------------------
  function initPlayer() {
    if (params.has("seed")) els.seed.value = params.get("seed");
    if (params.has("codec")) els.codec.value = params.get("codec");
    // /v1/info needs the token when the server has one (the header keeps it out of access logs)
    const infoHeaders = params.has("token") ? { Authorization: `Bearer ${params.get("token")}` } : {};
    fetch("v1/info", { headers: infoHeaders }).then((r) => (r.ok ? r.json() : Promise.reject(new Error(`HTTP ${r.status}`)))).then(
      (info) => {
        els.pipeline.textContent = `${info.pipeline} · ${info.stream ? `${info.stream.width}×${info.stream.height}` : ""}`;
        if (info.options_schema) buildOptions(info.options_schema);
        if (info.action_schema) buildControls(info.action_schema);
        if (info.default_codec && !params.has("codec")) els.codec.value = info.default_codec === "raw" ? "jpeg" : info.default_codec;
      },
      (err) => showError("connection", `cannot reach the server's /v1/info (${err.message})`),
    ).finally(() => {
      setConn("idle");
      if (params.get("autostart") !== "0") start();
    });
  }

  function initWatcher() {
    els.playPanel.disabled = true;  // every control that acts, including ones built later
    if (params.has("token")) els.playOwn.search = `?token=${encodeURIComponent(params.get("token"))}`;
    els.pipeline.textContent = "watching";
    watch();
  }

  document.body.dataset.mode = dbg.mode;
  if (WATCH) initWatcher(); else initPlayer();
})();
