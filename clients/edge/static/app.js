// tokenwire page: streams /v1/generate over fetch, resumes with Last-Event-ID after a drop.
"use strict";
const $ = (id) => document.getElementById(id);
let current = null; // { requestId, lastEventId, controller, stopped }

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
  const b = {
    prompt: $("prompt").value,
    max_tokens: Number($("max_tokens").value),
    temperature: Number($("temperature").value),
    top_p: Number($("top_p").value),
  };
  const stop = $("stop").value.replace(/\\n/g, "\n");
  if (stop) b.stop = [stop];
  return b;
}

// Parse a text/event-stream body, calling onEvent({event, data, id}) per event.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const ev = { event: "message", data: "", id: null };
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue;
        const [field, ...rest] = line.split(":");
        const value = rest.join(":").replace(/^ /, "");
        if (field === "event") ev.event = value;
        else if (field === "data") ev.data += (ev.data ? "\n" : "") + value;
        else if (field === "id") ev.id = value;
      }
      if (ev.data) onEvent(ev);
    }
  }
}

function handle(ev, run, stats) {
  if (ev.id) {
    run.lastEventId = ev.id;
    if (!run.requestId) {
      run.requestId = ev.id.slice(0, ev.id.lastIndexOf(":"));
      $("request_id").textContent = run.requestId;
    }
  }
  const data = JSON.parse(ev.data);
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
  }
}

async function errorText(response) {
  try { const j = await response.json(); return (j.error && j.error.message) || response.statusText; }
  catch (e) { return response.statusText; }
}

async function run() {
  const r = { requestId: null, lastEventId: null, controller: null, finished: false, failed: false, stopped: false };
  current = r;
  const stats = { start: performance.now(), first: null, count: 0 };
  for (const id of ["ttft", "rate", "finish", "usage", "request_id"]) $(id).textContent = "–";
  $("count").textContent = "0";
  $("output").textContent = "";
  $("generate").disabled = true;
  $("stop_button").disabled = false;
  setStatus("connecting", "streaming");
  let attempt = 0;
  while (!r.finished && !r.stopped) {
    r.controller = new AbortController();
    try {
      let response;
      if (r.lastEventId === null) {
        response = await fetch("/v1/generate", { method: "POST", headers: headers(), body: JSON.stringify(body()), signal: r.controller.signal });
      } else {
        const h = headers();
        h["Last-Event-ID"] = r.lastEventId;
        response = await fetch(`/v1/generate/${encodeURIComponent(r.requestId)}/events`, { headers: h, signal: r.controller.signal });
      }
      if (!response.ok) {
        $("finish").textContent = `error ${response.status}: ${await errorText(response)}`;
        setStatus("error");
        break;
      }
      setStatus(attempt > 0 ? "resumed" : "streaming");
      await readEvents(response, (ev) => handle(ev, r, stats));
      if (!r.finished && !r.stopped) throw new Error("stream ended early");
    } catch (e) {
      if (r.stopped) break;
      attempt += 1;
      if (attempt > 8 || r.lastEventId === null) { setStatus("error"); $("finish").textContent = String(e); break; }
      setStatus("reconnecting");
      await new Promise((res) => setTimeout(res, Math.min(2000, 100 * 2 ** attempt)));
    }
  }
  if (r.finished && !r.failed) setStatus(r.stopped ? "stopped" : "done", "done");
  if (r.failed) setStatus("error");
  $("generate").disabled = false;
  $("stop_button").disabled = true;
}

async function stop() {
  const r = current;
  if (!r) return;
  r.stopped = true;
  $("stop_button").disabled = true;
  if (r.requestId) {
    try { await fetch(`/v1/generate/${encodeURIComponent(r.requestId)}/cancel`, { method: "POST", headers: headers() }); } catch (e) { /* the stream is ending anyway */ }
  }
  if (r.controller) r.controller.abort();
  $("finish").textContent = "cancelled";
  setStatus("stopped", "done");
}

$("form").addEventListener("submit", (e) => { e.preventDefault(); run(); });
$("stop_button").addEventListener("click", stop);
$("api_key").value = localStorage.getItem("tokenwire_api_key") || "";
$("api_key").addEventListener("change", () => localStorage.setItem("tokenwire_api_key", $("api_key").value));
