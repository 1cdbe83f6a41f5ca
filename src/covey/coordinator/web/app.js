// Covey's first page: list the models and try one in the playground of its kind: chat over
// the streaming API, compare two sentences with an embedding model, transcribe an upload or a
// recording, read text aloud, or make images.
"use strict";

const $ = (id) => document.getElementById(id);
let current = null;      // selected model id
let models = {};         // id -> entry of GET /v1/models
let history = [];        // chat messages sent so far
let controller = null;   // AbortController of the running request
// A cap per answer: small models can ramble until the context is full.
const MAX_TOKENS = 512;
const KEY_STORE = "covey.api_key";

function apiKey() { return localStorage.getItem(KEY_STORE); }
function authHeaders() { return { Authorization: `Bearer ${apiKey()}` }; }
function credits(ucr) { return (ucr / 1e6).toFixed(6); }

async function showAccount() {
  const has = Boolean(apiKey());
  $("key-form").hidden = has;
  $("forget").hidden = !has;
  if (!has) { $("account-info").textContent = "no API key"; return; }
  const resp = await fetch("/v1/account", { headers: authHeaders() });
  if (!resp.ok) { $("account-info").textContent = "key refused"; return; }
  const a = await resp.json();
  $("account-info").textContent = `account ${a.id}: ${credits(a.balance)} credits`;
}

async function signUp() {
  const resp = await fetch("/v1/accounts", { method: "POST" });
  const body = await resp.json();
  if (!resp.ok) { $("account-info").textContent = body.error.message; return; }
  localStorage.setItem(KEY_STORE, body.api_key);
  showAccount();
}

async function loadModels() {
  try {
    const resp = await fetch("/v1/models");
    const body = await resp.json();
    models = Object.fromEntries(body.data.map((m) => [m.id, m]));
    const list = $("models");
    list.replaceChildren();
    for (const m of body.data) {
      const li = document.createElement("li");
      const b = document.createElement("button");
      b.dataset.model = m.id;
      b.dataset.kind = m.kind;
      b.textContent = `${m.id} — ${m.miners} miner${m.miners === 1 ? "" : "s"}`;
      const kind = document.createElement("span");
      kind.className = "kind";
      kind.textContent = m.kind;
      b.append(kind);
      b.disabled = m.miners === 0;
      if (m.id === current) b.classList.add("active");
      b.addEventListener("click", () => openModel(models[m.id] || m));
      li.append(b);
      list.append(li);
    }
    // One miner may serve several models: count miners, not (model, miner) pairs.
    const health = await (await fetch("/healthz")).json();
    $("status").textContent = `${body.data.length} model(s), ${health.miners} miner(s)`;
  } catch (e) {
    $("status").textContent = "coordinator unreachable";
  }
}

const PANES = ["chat-pane", "compare-pane", "transcribe-pane", "speech-pane", "image-pane"];

function showPane(id) {
  for (const pane of PANES) $(pane).hidden = pane !== id;
  // One column on a phone: bring the playground up from below the list.
  if (window.matchMedia("(max-width: 720px)").matches) $(id).scrollIntoView({ block: "start" });
}

function openModel(m) {
  const open = { embedding: openCompare, transcription: openTranscribe, speech: openSpeech,
                 image: openImage }[m.kind] || openChat;
  open(m.id);
}

function select(model) {
  current = model;
  for (const b of document.querySelectorAll("#models button")) {
    b.classList.toggle("active", b.dataset.model === model);
  }
}

function openCompare(model) {
  select(model);
  $("compare-model").textContent = model;
  showPane("compare-pane");
  $("similarity").textContent = "";
  $("compare-usage").textContent = "";
}

function cosine(a, b) {
  let dot = 0, na = 0, nb = 0;
  for (let i = 0; i < a.length; i++) { dot += a[i] * b[i]; na += a[i] * a[i]; nb += b[i] * b[i]; }
  return na && nb ? dot / Math.sqrt(na * nb) : 0;
}

async function compare(ev) {
  ev.preventDefault();
  const out = $("similarity");
  out.className = "";
  if (!apiKey()) { out.textContent = "Get a test account or paste a key first."; return; }
  $("compare").disabled = true;
  out.textContent = "…";
  try {
    const resp = await fetch("/v1/embeddings", {
      method: "POST",
      headers: { ...authHeaders(), "Content-Type": "application/json" },
      body: JSON.stringify({ model: current, input: [$("sentence-a").value, $("sentence-b").value] }),
    });
    const body = await resp.json();
    if (!resp.ok) { out.className = "error"; out.textContent = body.error.message; return; }
    const sim = cosine(body.data[0].embedding, body.data[1].embedding);
    out.dataset.value = sim.toFixed(4);
    out.textContent = `cosine similarity: ${sim.toFixed(3)}`;
    $("compare-usage").textContent = `${body.usage.prompt_tokens} input tokens`;
    showAccount();
  } catch (e) {
    out.className = "error";
    out.textContent = "coordinator unreachable";
  } finally {
    $("compare").disabled = false;
  }
}

function openChat(model) {
  if (current !== model) { history = []; $("log").replaceChildren(); }
  select(model);
  $("chat-model").textContent = model;
  showPane("chat-pane");
  $("prompt").focus();
}

function addMessage(role, text) {
  const p = document.createElement("p");
  p.className = `msg ${role}`;
  p.textContent = text;
  $("log").append(p);
  $("log").scrollTop = $("log").scrollHeight;
  return p;
}

// Parse a server-sent event stream, calling onData for every `data:` payload.
async function readSSE(resp, onData) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data: ")) onData(line.slice(6));
      }
    }
  }
}

async function send(ev) {
  ev.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || !current || controller) return;
  if (!apiKey()) { addMessage("error", "Get a test account or paste an API key first."); return; }
  $("prompt").value = "";
  addMessage("user", text);
  history.push({ role: "user", content: text });
  const out = addMessage("assistant", "");
  controller = new AbortController();
  $("send").disabled = true; $("stop").disabled = false; $("usage").textContent = "";
  let answer = "";
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify({ model: current, messages: history, stream: true,
                             max_tokens: MAX_TOKENS, stream_options: { include_usage: true } }),
      signal: controller.signal,
    });
    if (!resp.ok) {
      const body = await resp.json().catch(() => ({}));
      throw new Error(body.error ? body.error.message : `HTTP ${resp.status}`);
    }
    await readSSE(resp, (data) => {
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      for (const c of chunk.choices) {
        if (c.delta && c.delta.content) { answer += c.delta.content; out.textContent = answer; }
      }
      if (chunk.usage) {
        $("usage").textContent = `${chunk.usage.prompt_tokens} prompt + ` +
          `${chunk.usage.completion_tokens} completion tokens`;
      }
      $("log").scrollTop = $("log").scrollHeight;
    });
    history.push({ role: "assistant", content: answer });
    out.dataset.done = "true";
  } catch (e) {
    if (e.name !== "AbortError") { out.classList.add("error"); out.textContent = `error: ${e.message}`; }
    else { history.push({ role: "assistant", content: answer }); }
    out.dataset.done = "true";
  } finally {
    showAccount();
    controller = null;
    $("send").disabled = false; $("stop").disabled = true;
  }
}

$("chat-form").addEventListener("submit", send);
$("compare-form").addEventListener("submit", compare);
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("chat-form").requestSubmit(); }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("signup").addEventListener("click", signUp);
$("use-key").addEventListener("click", () => {
  const key = $("key").value.trim();
  if (key) { localStorage.setItem(KEY_STORE, key); $("key").value = ""; showAccount(); }
});
$("forget").addEventListener("click", () => { localStorage.removeItem(KEY_STORE); showAccount(); });
showAccount();
loadModels();
setInterval(loadModels, 5000);
