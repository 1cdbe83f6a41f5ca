// Covey's web app, core: the API key and account line in the header, calls to the API,
// DOM helpers, and the hash router that shows one view at a time. The views live in their
// own files (catalog.js, chat.js, media.js, account.js, miners.js, explorer.js) and register
// themselves with registerView(); scripts are classic, loaded in order, sharing these names.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "covey.api_key";
let current = null;      // the model open in a playground
let models = {};         // id -> entry of GET /v1/models
let health = null;       // last GET /healthz: {miners, coordinator, invite_only, …}

function apiKey() { return localStorage.getItem(KEY_STORE); }
function setApiKey(key) {
  if (key) localStorage.setItem(KEY_STORE, key); else localStorage.removeItem(KEY_STORE);
  showAccount();
}
function authHeaders() { return { Authorization: `Bearer ${apiKey()}` }; }
// µcr -> credits, with all six decimals (a request often costs a few µcr).
function credits(ucr) { return (ucr / 1e6).toFixed(6); }

// Build an element: el("a", {href: "#", className: "x", dataset: {id: 1}}, "text", child).
// Text goes in as text nodes, never as HTML.
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "dataset") Object.assign(node.dataset, v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k in node && !k.includes("-")) node[k] = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c !== null && c !== undefined && c !== false) node.append(c instanceof Node ? c : String(c));
  }
  return node;
}

// An API error answer: OpenAI's {"error": {message, type, param, code}} and the HTTP status.
class ApiFailure extends Error {
  constructor(status, error) {
    super(error && error.message ? error.message : `HTTP ${status}`);
    this.status = status;
    this.code = error ? error.code : null;
    this.param = error ? error.param : null;
  }
}

// Call the API and return the parsed JSON body; throws ApiFailure on an error answer and
// TypeError when the coordinator is unreachable. opts: {method, body (JSON), auth (default
// true: send the key), signal}.
async function api(path, opts = {}) {
  const headers = {};
  if (opts.auth !== false && apiKey()) Object.assign(headers, authHeaders());
  if (opts.body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, {
    method: opts.method || (opts.body !== undefined ? "POST" : "GET"),
    headers,
    body: opts.body !== undefined ? JSON.stringify(opts.body) : undefined,
    signal: opts.signal,
  });
  const body = await resp.json().catch(() => null);
  if (!resp.ok) throw new ApiFailure(resp.status, body && body.error);
  return body;
}

function failureText(e) {
  return e instanceof TypeError ? "coordinator unreachable" : e.message;
}

// Relative time of a Unix time in seconds, for tables.
function since(unixSeconds) {
  const s = Math.max(0, Date.now() / 1000 - unixSeconds);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return new Date(unixSeconds * 1000).toISOString().slice(0, 10);
}

// Copy text to the clipboard; true when it worked. The Clipboard API needs a secure context
// (https or localhost): on a LAN coordinator over plain http, fall back to a selection copy.
async function copyToClipboard(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch (e) {
    const focused = document.activeElement;
    const area = el("textarea", { className: "offscreen", readOnly: true, value: text,
                                  "aria-hidden": "true" });
    document.body.append(area);
    area.select();
    const done = document.execCommand("copy");
    area.remove();
    if (focused && focused.focus) focused.focus();
    return done;
  }
}

// A small padlock icon (inline SVG: no icon font, no emoji font needed).
function lockIcon() {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", "0 0 16 16");
  svg.setAttribute("width", "12");
  svg.setAttribute("height", "12");
  svg.setAttribute("aria-hidden", "true");
  svg.classList.add("icon");
  const path = document.createElementNS(ns, "path");
  path.setAttribute("d", "M4 7V5a4 4 0 0 1 8 0v2h1v8H3V7zm2 0h4V5a2 2 0 0 0-4 0z");
  path.setAttribute("fill", "currentColor");
  svg.append(path);
  return svg;
}

// Download text as a file (conversation exports).
function download(name, type, text) {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const a = el("a", { href: url, download: name });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

// libsodium (WebAssembly), loaded the first time a view needs it (sealing, verifying), so
// the catalog's first render does not wait for it.
let sodiumReady = null;
function loadSodium() {
  if (!sodiumReady) {
    const script = (src) => new Promise((resolve, reject) => {
      const s = el("script", { src });
      s.addEventListener("load", resolve);
      s.addEventListener("error", () => reject(new Error(`could not load ${src}`)));
      document.head.append(s);
    });
    sodiumReady = script("/static/vendor/libsodium.js")
      .then(() => script("/static/vendor/libsodium-wrappers.js"))
      .then(() => window.sodium.ready)
      .then(() => window.sodium);
  }
  return sodiumReady;
}

// ---- the account line in the header ----

async function showAccount() {
  const has = Boolean(apiKey());
  $("key-form").hidden = has;
  $("forget").hidden = !has;
  if (!has) { $("account-info").textContent = "no API key"; return; }
  try {
    const a = await api("/v1/account");
    $("account-info").replaceChildren(el("span", { className: "account-id" }, `account ${a.id}: `),
                                      `${credits(a.balance)} credits`);
  } catch (e) {
    $("account-info").textContent = e instanceof ApiFailure ? "key refused" : "coordinator unreachable";
  }
}

// Sign up; with an invite-only coordinator the Account view asks for the code.
async function signUp(inviteCode) {
  const body = inviteCode ? { invite_code: inviteCode } : undefined;
  const account = await api("/v1/accounts", { method: "POST", body, auth: false });
  setApiKey(account.api_key);
  return account;
}

async function signUpFromHeader() {
  if (health && health.invite_only) { navigate("#/account"); return; }
  try {
    await signUp();
  } catch (e) {
    if (e instanceof ApiFailure && e.code === "invite_required") navigate("#/account");
    else $("account-info").textContent = failureText(e);
  }
}

// ---- views and the router ----
// A view: {pane: section id, show(args): called with the route's parts after the name}.

const views = {};

function registerView(name, pane, show) { views[name] = { pane, show }; }

function navigate(hash) {
  if (location.hash === hash) route(); else location.hash = hash;
}

// Show one section of <main>, hide the others.
function showPane(id) {
  for (const section of document.querySelectorAll("main > section")) section.hidden = section.id !== id;
  const view = Object.keys(views).find((n) => views[n].pane === id);
  for (const a of document.querySelectorAll("nav a")) {
    // A media playground belongs to the catalog; the chat has its own tab.
    const playground = !Object.values(views).some((v) => v.pane === id);
    if (a.dataset.nav === view || (playground && a.dataset.nav === "catalog")) {
      a.setAttribute("aria-current", "page");
    } else {
      a.removeAttribute("aria-current");
    }
  }
  window.scrollTo(0, 0);
}

// Playground views by model kind; each opener takes a model id.
const PLAYGROUNDS = {};

function select(model) {
  current = model;
  for (const b of document.querySelectorAll("#models button[data-model]")) {
    b.classList.toggle("active", b.dataset.model === model);
  }
}

// Routes: #/ (catalog), #/use/<model> (its playground), #/<view>[/<arg>…].
function route() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  const name = parts[0] || "catalog";
  if (name === "use") {
    const m = models[parts[1]];
    if (!m) { showPane("catalog-pane"); return; }
    const open = PLAYGROUNDS[m.kind] || PLAYGROUNDS.chat;
    select(m.id);
    open(m.id, parts.slice(2));
    return;
  }
  const view = views[name] || views.catalog;
  showPane(view.pane);
  view.show(parts.slice(1));
}

function openModel(m) {
  select(m.id);  // at once: the route runs on the hashchange event, a moment later
  navigate(`#/use/${encodeURIComponent(m.id)}`);
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

async function loadHealth() {
  try { health = await api("/healthz", { auth: false }); } catch (e) { health = null; }
  return health;
}

// Runs once every script has loaded (they are at the end of <body>; no inline script, which
// the page's Content-Security-Policy forbids).
document.addEventListener("DOMContentLoaded", () => start());

async function start() {
  $("signup").addEventListener("click", signUpFromHeader);
  $("use-key").addEventListener("click", () => {
    const key = $("key").value.trim();
    if (key) { $("key").value = ""; setApiKey(key); }
  });
  $("key").addEventListener("keydown", (e) => { if (e.key === "Enter") $("use-key").click(); });
  $("forget").addEventListener("click", () => setApiKey(null));
  window.addEventListener("hashchange", route);
  showAccount();
  await loadModels();  // reads /healthz too
  route();
  setInterval(loadModels, 5000);
}
