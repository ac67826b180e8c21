// tokenwire page: streams /v1/generate over fetch and resumes it after a drop, with Last-Event-ID
// once it has an event, from the stream's first event before.
"use strict";
const $ = (id) => document.getElementById(id);
let current = null; // the run on screen: { requestId, lastEventId, controller, stopped, ... }
const MAX_RETRIES = 8; // resumes in a row that bring no event before the page gives up

function setStatus(text, cls) {
  const el = $("status");
  el.textContent = text;
  el.className = "status " + (cls || text);
}

function headers() {
  const h = { "Content-Type": "application/json", "Accept": "text/event-stream" };
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function body() {
  const b = { prompt: $("prompt").value };
  // An empty field is left out (the server's default), not sent as 0.
  for (const name of ["max_tokens", "temperature", "top_p"]) {
    const value = $(name).value.trim();
    if (value !== "") b[name] = Number(value);
  }
  const stop = $("stop").value.replace(/\\n/g, "\n");
  if (stop) b.stop = [stop];
  return b;
}

// Parse a text/event-stream body, calling onEvent({event, data, id}) per event. Lines end at
// \r\n, \n or \r, wherever the network cuts the bytes (a \r that ends a read may be the first
// half of a \r\n, so it waits for the next read).
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let ev = { event: "message", data: null, id: null };
  const line = /\r\n|\n|\r(?!$)/;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return; // an event the body ends before its blank line is not dispatched
    buffer += decoder.decode(value, { stream: true });
    let m;
    while ((m = line.exec(buffer)) !== null) {
      const text = buffer.slice(0, m.index);
      buffer = buffer.slice(m.index + m[0].length);
      if (text === "") {
        if (ev.data !== null) onEvent(ev);
        ev = { event: "message", data: null, id: null };
        continue;
      }
      if (text.startsWith(":")) continue;
      const colon = text.indexOf(":");
      const field = colon < 0 ? text : text.slice(0, colon);
      const content = colon < 0 ? "" : text.slice(colon + 1).replace(/^ /, "");
      if (field === "event") ev.event = content;
      else if (field === "data") ev.data = ev.data === null ? content : ev.data + "\n" + content;
      else if (field === "id") ev.id = content;
    }
  }
}

function handle(ev, run, stats) {
  if (run !== current) return; // a stopped run's last bytes
  const data = JSON.parse(ev.data); // before the id counts: a broken event is fetched again
  // An error without an id is this edge's, not the stream's. A 503 (the resume store out of
  // reach) ended this connection only: the page resumes from the last event, as after a drop
  // that brought nothing.
  if (ev.event === "error" && !ev.id && data.status === 503) return;
  if (ev.id) run.lastEventId = ev.id;
  run.progress = true;
  if (ev.event === "token") {
    const now = performance.now();
    if (stats.first === null) {
      stats.first = now;
      $("ttft").textContent = (now - stats.start).toFixed(1) + " ms";
    }
    stats.count += 1;
    $("output").textContent += data.text;
    $("count").textContent = String(stats.count);
    const secs = (now - stats.first) / 1000;
    if (secs > 0) $("rate").textContent = ((stats.count - 1) / secs).toFixed(1);
  } else if (ev.event === "usage") {
    $("usage").textContent = `${data.prompt_tokens} + ${data.completion_tokens} = ${data.total_tokens}`;
  } else if (ev.event === "done") {
    $("finish").textContent = data.finish_reason + (data.stop_sequence ? ` (${JSON.stringify(data.stop_sequence)})` : "");
    run.finished = true;
  } else if (ev.event === "error") {
    $("finish").textContent = `error ${data.status}: ${data.message}`;
    run.finished = true;
    run.failed = true;
    // The edge's own (410: events dropped): the page gives up on a stream that may still run.
    if (!ev.id) cancelUpstream(run);
  }
}

async function errorText(response) {
  try { const j = await response.json(); return (j.error && j.error.message) || response.statusText; }
  catch (e) { return response.statusText; }
}

function newRequestId() {
  // Chosen here, so that Stop can cancel the request before its first event arrives.
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function cancelUpstream(run) {
  // Fire and forget: the page does not wait for the answer, and nothing it says is shown.
  fetch(`/v1/generate/${encodeURIComponent(run.requestId)}/cancel`, { method: "POST", headers: headers() })
    .catch(() => {});
}

// What the page sends after an attempt that failed: "post" (start the stream), "resume" (GET
// its events) or null (give up). `status` is the edge's refusal, null for a connection that
// broke; `resumed`, whether an attempt failed before this one.
function nextAttempt(status, wasPost, resumed, r) {
  if (status === null) return "resume"; // the edge may have the stream: ask it
  if (!resumed) return null; // the edge refused the request: no stream runs
  if (status === 429 || status === 503) return wasPost ? "post" : "resume"; // busy: again
  if (r.lastEventId !== null) return null;
  // Before the first event a POST that broke may not have reached the edge. A resume's 404
  // says it has no stream with the id (yet): the page sends the POST again under the same id,
  // which the edge refuses (409) where the first is still opening the stream; then it resumes.
  if (status === 404 && !wasPost) return "post";
  if (status === 409 && wasPost) return "resume";
  return null;
}

// Enables the controls of a page that is (or is not) streaming. The button that has the focus
// and is about to be disabled hands it to the other one: focus never drops to the page's body.
function setRunning(running) {
  const [on, off] = running ? [$("stop_button"), $("generate")] : [$("generate"), $("stop_button")];
  on.disabled = false;
  if (document.activeElement === off) on.focus();
  off.disabled = true;
  $("output").setAttribute("aria-busy", String(running));
}

async function run() {
  const r = {
    requestId: newRequestId(), lastEventId: null, controller: null,
    request: JSON.stringify(body()), // sent again as it was, whatever the form says by then
    finished: false, failed: false, stopped: false, progress: false,
  };
  current = r;
  const stats = { start: performance.now(), first: null, count: 0 };
  for (const id of ["ttft", "rate", "finish", "usage"]) $(id).textContent = "–";
  $("request_id").textContent = r.requestId;
  $("count").textContent = "0";
  $("output").textContent = "";
  setRunning(true);
  setStatus("connecting", "streaming");
  let retries = 0;
  let resumed = false;
  let attempt = "post";
  while (!r.finished && !r.stopped) {
    r.controller = new AbortController();
    r.progress = false;
    let refused = null; // the status of an answer that is not the stream
    try {
      let response;
      const h = headers();
      if (attempt === "post") {
        h["X-Request-ID"] = r.requestId;
        response = await fetch("/v1/generate", { method: "POST", headers: h, body: r.request, signal: r.controller.signal });
      } else {
        // Without Last-Event-ID (no event yet) the edge replays the stream from its first event.
        if (r.lastEventId !== null) h["Last-Event-ID"] = r.lastEventId;
        response = await fetch(`/v1/generate/${encodeURIComponent(r.requestId)}/events`, { headers: h, signal: r.controller.signal });
      }
      if (response.status === 204) { r.finished = true; break; } // every event was read
      if (!response.ok) {
        refused = response.status;
        throw new Error(`error ${response.status}: ${await errorText(response)}`);
      }
      if (r === current) setStatus(resumed ? "resumed" : "streaming");
      await readEvents(response, (ev) => handle(ev, r, stats));
      if (!r.finished && !r.stopped) throw new Error("the stream ended early");
    } catch (e) {
      if (r.stopped) break;
      // A resume that brought events starts the count again: only drops in a row give up.
      retries = r.progress ? 1 : retries + 1;
      attempt = nextAttempt(refused, attempt === "post", resumed, r);
      if (retries > MAX_RETRIES || attempt === null) {
        // Giving up, the page cancels the stream, so the server does not generate it for nobody
        // (a refused first POST started none).
        if (resumed || refused === null) cancelUpstream(r);
        if (r === current) { setStatus("error"); $("finish").textContent = String(e.message || e); }
        break;
      }
      resumed = true;
      if (r === current) setStatus("reconnecting");
      await new Promise((res) => setTimeout(res, Math.min(2000, 100 * 2 ** retries)));
    }
  }
  if (r !== current) return; // stopped, and another run owns the page now
  if (r.finished && !r.failed) setStatus("done");
  if (r.failed) setStatus("error");
  setRunning(false);
}

function stop() {
  const r = current;
  if (!r || r.stopped) return;
  r.stopped = true;
  current = null; // its last bytes and its answers no longer reach the page
  if (r.controller) r.controller.abort();
  cancelUpstream(r);
  $("finish").textContent = "cancelled";
  setStatus("stopped", "done");
  setRunning(false);
}

$("form").addEventListener("submit", (e) => { e.preventDefault(); run(); });
$("stop_button").addEventListener("click", stop);
// Ctrl+Enter (⌘+Enter on a Mac) generates and Escape stops, wherever the focus is.
document.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && !$("generate").disabled) { e.preventDefault(); run(); }
  else if (e.key === "Escape" && !$("stop_button").disabled) { e.preventDefault(); stop(); }
});
$("api_key").value = localStorage.getItem("tokenwire_api_key") || "";
$("api_key").addEventListener("change", () => localStorage.setItem("tokenwire_api_key", $("api_key").value.trim()));
