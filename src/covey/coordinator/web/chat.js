// The chat playground: answers rendered as markdown (marked, then DOMPurify: model output is
// untrusted), sealed end to end by default (sealed.js), settings, Stop, regenerate, edit and
// resend, conversations kept in this browser (localStorage), export as JSON or markdown.
"use strict";

const CONVERSATIONS_STORE = "covey.conversations";
const SETTINGS_STORE = "covey.chat_settings";
const MAX_CONVERSATIONS = 100;
const OPEN_STORE = "covey.open_conversation";
const DEFAULTS = { system: "", temperature: 0.7, top_p: 1, max_tokens: 512 };

let conversations = [];   // newest first: {id, model, title, created, messages: [...]}
let conversation = null;  // the one shown
let chatController = null; // AbortController of the answer being written

function loadConversations() {
  try { conversations = JSON.parse(localStorage.getItem(CONVERSATIONS_STORE)) || []; }
  catch (e) { conversations = []; }
}

function saveConversations() {
  conversations = conversations.slice(0, MAX_CONVERSATIONS);
  try { localStorage.setItem(CONVERSATIONS_STORE, JSON.stringify(conversations)); }
  catch (e) { /* storage full: the conversation still shows, it is just not kept */ }
}

function settings() {
  let saved = {};
  try { saved = JSON.parse(localStorage.getItem(SETTINGS_STORE)) || {}; } catch (e) { saved = {}; }
  return { ...DEFAULTS, ...saved };
}

function saveSettings() {
  const s = {
    system: $("system-prompt").value,
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    max_tokens: Number($("max-tokens").value),
  };
  localStorage.setItem(SETTINGS_STORE, JSON.stringify(s));
  // Encryption belongs to the conversation (on in every new one), not to the settings:
  // turning it off once to compare must not leave later chats in the clear.
  return { ...s, sealed: $("sealed-toggle").checked };
}

// ---- markdown ----

// Model output is untrusted: markdown becomes HTML, DOMPurify removes anything that could
// run (scripts, event handlers, javascript: URLs), and links open outside the page.
function renderMarkdown(node, text) {
  const html = DOMPurify.sanitize(marked.parse(text, { gfm: true, breaks: true }),
                                  { USE_PROFILES: { html: true } });
  node.innerHTML = html;
  for (const a of node.querySelectorAll("a[href]")) { a.target = "_blank"; a.rel = "noopener noreferrer"; }
  for (const pre of node.querySelectorAll("pre")) {
    const code = pre.querySelector("code");
    const copy = el("button", { type: "button", className: "copy-code",
                                "aria-label": "Copy code" }, "Copy");
    copy.addEventListener("click", () => copyText(code ? code.textContent : pre.textContent, copy));
    pre.prepend(copy);
  }
}

async function copyText(text, button) {
  if (!await copyToClipboard(text)) return;
  const before = button.textContent;
  button.textContent = "Copied";
  setTimeout(() => { button.textContent = before; }, 1200);
}

// ---- the pane ----

function buildChatPane() {
  const s = settings();
  const num = (id, label, min, max, step, value) => el("div", { className: "field" },
    el("label", { htmlFor: id }, label),
    el("input", { id, type: "number", min, max, step, value, required: true }));
  $("chat-pane").replaceChildren(
    el("div", { className: "chat-layout" },
      el("aside", { className: "conversations", "aria-label": "Conversations" },
        el("button", { id: "new-chat", type: "button" }, "New chat"),
        el("ul", { id: "conversation-list" })),
      el("div", { className: "chat-main" },
        el("div", { className: "view-head" },
          el("h2", { id: "chat-title" }, "Chat with ", el("span", { id: "chat-model" })),
          el("span", { id: "seal-status", className: "seal", "aria-live": "polite" })),
        el("div", { className: "row wrap chat-tools" },
          el("label", { className: "check" },
            el("input", { id: "sealed-toggle", type: "checkbox", checked: true }),
            " End-to-end encrypted"),
          el("button", { id: "export-json", type: "button" }, "Export JSON"),
          el("button", { id: "export-md", type: "button" }, "Export markdown")),
        el("details", { id: "chat-settings" },
          el("summary", {}, "Settings"),
          el("label", { htmlFor: "system-prompt" }, "System prompt"),
          el("textarea", { id: "system-prompt", rows: 2, value: s.system,
                           placeholder: "You are a helpful assistant." }),
          el("div", { className: "controls" },
            num("temperature", "Temperature", 0, 2, 0.1, s.temperature),
            num("top-p", "Top-p", 0.01, 1, 0.01, s.top_p),
            num("max-tokens", "Max tokens", 1, 32768, 1, s.max_tokens))),
        el("div", { id: "log", role: "log", "aria-live": "polite", "aria-label": "Conversation",
                    tabindex: "0" }),
        el("form", { id: "chat-form" },
          el("label", { htmlFor: "prompt", className: "visually-hidden" }, "Message"),
          el("textarea", { id: "prompt", rows: 3, placeholder: "Ask something… (Enter sends, Shift+Enter for a new line)",
                           required: true }),
          el("div", { className: "row wrap" },
            el("button", { id: "send", type: "submit" }, "Send"),
            el("button", { id: "stop", type: "button", disabled: true }, "Stop"),
            el("button", { id: "regenerate", type: "button", disabled: true }, "Regenerate"),
            el("span", { id: "usage", className: "muted small", "aria-live": "polite" }))))));
  $("chat-form").addEventListener("submit", (ev) => { ev.preventDefault(); sendPrompt(); });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("chat-form").requestSubmit(); }
  });
  $("stop").addEventListener("click", () => chatController && chatController.abort());
  $("regenerate").addEventListener("click", regenerate);
  $("new-chat").addEventListener("click", () => {
    conversation = newConversation(current);
    localStorage.removeItem(OPEN_STORE);
    openChat(current);
  });
  $("export-json").addEventListener("click", () => exportConversation("json"));
  $("export-md").addEventListener("click", () => exportConversation("md"));
  for (const id of ["system-prompt", "temperature", "top-p", "max-tokens"]) {
    $(id).addEventListener("change", saveSettings);
  }
  $("sealed-toggle").addEventListener("change", () => {
    conversation.sealed = $("sealed-toggle").checked;
    if (conversations.includes(conversation)) saveConversations();
    showSealStatus();
  });
}

function showSealStatus(miner) {
  const sealed = $("sealed-toggle").checked;
  const status = $("seal-status");
  status.className = `seal ${sealed ? "on" : "off"}`;
  status.replaceChildren(...(sealed
    ? [lockIcon(), miner ? ` sealed to miner ${miner.slice(0, 12)}…` : " end-to-end encrypted"]
    : ["not encrypted: the coordinator can read this chat"]));
  status.title = sealed && miner ? `Only miner ${miner} can read this chat; the coordinator relays ciphertext.` : "";
}

function renderConversationList() {
  const list = $("conversation-list");
  const mine = conversations.filter((c) => c.messages.length);
  list.replaceChildren(...mine.map((c) => el("li", { className: conversation && c.id === conversation.id ? "active" : "" },
    el("button", { type: "button", className: "conv", onclick: () => showConversation(c),
                   "aria-current": conversation && c.id === conversation.id ? "true" : null },
      el("span", { className: "conv-title" }, c.title || "New chat"),
      el("span", { className: "muted small" }, c.model)),
    el("button", { type: "button", className: "conv-delete", "aria-label": `Delete “${c.title}”`,
                   onclick: () => deleteConversation(c) }, "×"))));
}

function deleteConversation(c) {
  conversations = conversations.filter((x) => x.id !== c.id);
  saveConversations();
  if (conversation && conversation.id === c.id) { conversation = null; openChat(current); }
  else renderConversationList();
}

function showConversation(c) {
  conversation = c;
  localStorage.setItem(OPEN_STORE, c.id);
  if (c.model !== current && models[c.model]) { navigate(`#/use/${encodeURIComponent(c.model)}`); return; }
  $("sealed-toggle").checked = c.sealed !== false;
  showSealStatus();
  renderLog();
  renderConversationList();
}

function newConversation(model) {
  return { id: `c${Date.now().toString(36)}${Math.random().toString(36).slice(2, 6)}`,
           model, title: "", created: Date.now() / 1000, messages: [], sealed: true };
}

function openChat(model) {
  if (!$("chat-model")) buildChatPane();
  if (!conversation || conversation.model !== model) {
    const last = conversations.find((c) => c.id === localStorage.getItem(OPEN_STORE));
    conversation = (last && last.model === model ? last : null)
      || conversations.find((c) => c.model === model && !c.messages.length) || newConversation(model);
  }
  $("sealed-toggle").checked = conversation.sealed !== false;
  $("chat-model").textContent = model;
  showPane("chat-pane");
  showSealStatus();
  renderLog();
  renderConversationList();
  $("prompt").focus();
}

// ---- messages ----

function usageText(msg) {
  if (!msg.usage) return "";
  const u = msg.usage;
  const parts = [`${u.prompt_tokens} prompt + ${u.completion_tokens} completion tokens`];
  if (msg.cost !== undefined) parts.push(`${credits(msg.cost)} credits`);
  if (msg.ttft_ms !== undefined) parts.push(`first token ${msg.ttft_ms} ms`);
  if (msg.finish_reason === "cancelled") parts.push("stopped");
  if (msg.miner) parts.push(`${msg.sealed ? "sealed to" : "served by"} miner ${msg.miner.slice(0, 12)}…`);
  return parts.join(" · ");
}

function messageNode(msg, index) {
  const body = el("div", { className: "msg-body" });
  const node = el("div", { className: `msg ${msg.role}`, dataset: { index: String(index) } },
    el("div", { className: "msg-role" }, msg.role === "user" ? "you" : "model"), body);
  if (msg.role === "assistant") {
    if (msg.error) { node.classList.add("error"); body.textContent = `error: ${msg.error}`; }
    else renderMarkdown(body, msg.content);
    node.dataset.done = "true";
    const actions = el("div", { className: "msg-actions" },
      el("button", { type: "button", className: "link", onclick: (e) => copyText(msg.content, e.target) }, "Copy"),
      msg.id && msg.usage && msg.usage.completion_tokens
        ? el("a", { className: "small", href: `#/explorer/${encodeURIComponent(msg.id)}`,
                    title: `The signed receipt of ${msg.id}, checked in your browser` }, "Receipt")
        : null,
      el("span", { className: "muted small msg-usage" }, usageText(msg)));
    node.append(actions);
  } else {
    body.textContent = msg.content;
    node.append(el("div", { className: "msg-actions" },
      el("button", { type: "button", className: "link", onclick: () => editMessage(index) }, "Edit")));
  }
  return node;
}

function renderLog() {
  const log = $("log");
  log.replaceChildren(...conversation.messages.map(messageNode));
  log.scrollTop = log.scrollHeight;
  const last = conversation.messages[conversation.messages.length - 1];
  $("regenerate").disabled = chatController !== null || !last || last.role !== "assistant";
  $("usage").textContent = last && last.role === "assistant" ? usageText(last) : "";
}

function editMessage(index) {
  if (chatController) return;
  const node = $("log").querySelector(`.msg[data-index="${index}"]`);
  const area = el("textarea", { rows: 3, value: conversation.messages[index].content,
                                "aria-label": "Edit message" });
  const save = el("button", { type: "button" }, "Save and send");
  const cancel = el("button", { type: "button" }, "Cancel");
  node.replaceChildren(el("div", { className: "msg-role" }, "you"), area,
                       el("div", { className: "row" }, save, cancel));
  area.focus();
  cancel.addEventListener("click", renderLog);
  save.addEventListener("click", () => {
    const text = area.value.trim();
    if (!text) return;
    // Editing a turn drops what followed it: the answer is written again from there.
    conversation.messages = conversation.messages.slice(0, index);
    if (index === 0) conversation.title = "";  // named after its first question
    ask(text);
  });
}

function regenerate() {
  if (chatController) return;
  const msgs = conversation.messages;
  if (!msgs.length || msgs[msgs.length - 1].role !== "assistant") return;
  msgs.pop();
  const question = msgs.pop();
  ask(question.content);
}

function sendPrompt() {
  const text = $("prompt").value.trim();
  if (!text || !current || chatController) return;
  $("prompt").value = "";
  ask(text);
}

// Cost of an answer at the model's catalog price (the price its escrow was held at).
function costOf(usage) {
  const m = models[conversation.model];
  if (!m || !m.price) return undefined;
  return Math.ceil((usage.prompt_tokens * m.price.prompt + usage.completion_tokens * m.price.completion) / m.price.per);
}

async function ask(text) {
  if (!apiKey()) {
    $("prompt").value = text;
    $("usage").textContent = "Get a test account (top right) or paste an API key first.";
    return;
  }
  const s = saveSettings();
  conversation.messages.push({ role: "user", content: text });
  if (!conversation.title) conversation.title = text.slice(0, 60);
  if (!conversations.includes(conversation)) conversations.unshift(conversation);
  localStorage.setItem(OPEN_STORE, conversation.id);
  renderLog();
  renderConversationList();
  const history = conversation.messages.filter((m) => !m.error).map((m) => ({ role: m.role, content: m.content }));
  const messages = s.system.trim() ? [{ role: "system", content: s.system.trim() }, ...history] : history;
  const answer = { role: "assistant", content: "", sealed: s.sealed };
  const body = el("div", { className: "msg-body" });
  const node = el("div", { className: "msg assistant" }, el("div", { className: "msg-role" }, "model"), body);
  $("log").append(node);
  chatController = new AbortController();
  $("send").disabled = true; $("stop").disabled = false; $("regenerate").disabled = true;
  $("usage").textContent = s.sealed ? "sealing…" : "";
  let pending = false;
  const asked = performance.now();
  const show = () => {
    // Time to first token as the user sees it: from Send to the first text on screen.
    if (answer.ttft_ms === undefined) answer.ttft_ms = Math.round(performance.now() - asked);
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      renderMarkdown(body, answer.content);
      $("log").scrollTop = $("log").scrollHeight;
    });
  };
  const params = { max_tokens: s.max_tokens, temperature: s.temperature, top_p: s.top_p };
  try {
    const done = s.sealed
      ? await sealedAnswer(conversation.model, messages, params, answer, show)
      : await plainAnswer(conversation.model, messages, params, answer, show);
    answer.usage = { prompt_tokens: done.prompt_tokens, completion_tokens: done.completion_tokens };
    answer.finish_reason = done.finish_reason;
    answer.id = done.job_id;
    answer.cost = costOf(answer.usage);
  } catch (e) {
    answer.error = e.message;
  } finally {
    chatController = null;
    conversation.messages.push(answer);
    saveConversations();
    $("send").disabled = false; $("stop").disabled = true;
    renderLog();
    showAccount();
    setTimeout(showAccount, 1500);  // the settlement may land just after the last token
  }
}

async function sealedAnswer(model, messages, params, answer, show) {
  const channel = sealedChannelFor(apiKey());
  return channel.chat({ model, messages, params }, {
    route: (r) => { answer.miner = r.miner; showSealStatus(r.miner); $("usage").textContent = "writing…"; },
    delta: (text) => { answer.content += text; show(); },
  }, chatController.signal);
}

async function plainAnswer(model, messages, params, answer, show) {
  const result = { prompt_tokens: 0, completion_tokens: 0, finish_reason: "stop", job_id: "" };
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify({ model, messages, stream: true, ...params,
                             stream_options: { include_usage: true } }),
      signal: chatController.signal,
    });
    if (!resp.ok) {
      const body = await resp.json().catch(() => ({}));
      throw new Error(body.error ? body.error.message : `HTTP ${resp.status}`);
    }
    await readSSE(resp, (data) => {
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      result.job_id = chunk.id || result.job_id;
      if (chunk.system_fingerprint) answer.miner = chunk.system_fingerprint.replace(/^miner-/, "");
      for (const c of chunk.choices) {
        if (c.delta && c.delta.content) { answer.content += c.delta.content; show(); }
        if (c.finish_reason) result.finish_reason = c.finish_reason;
      }
      if (chunk.usage) {
        result.prompt_tokens = chunk.usage.prompt_tokens;
        result.completion_tokens = chunk.usage.completion_tokens;
      }
    });
  } catch (e) {
    if (e.name !== "AbortError") throw e;
    result.finish_reason = "cancelled";
  }
  return result;
}

// ---- export ----

function exportConversation(format) {
  if (!conversation || !conversation.messages.length) return;
  const name = `covey-chat-${new Date(conversation.created * 1000).toISOString().slice(0, 19).replace(/:/g, "")}`;
  if (format === "json") {
    download(`${name}.json`, "application/json", JSON.stringify(conversation, null, 2));
    return;
  }
  const lines = [`# ${conversation.title || "Chat"}`, "", `Model: ${conversation.model}`, ""];
  for (const m of conversation.messages) {
    lines.push(`## ${m.role === "user" ? "You" : "Model"}`, "", m.error ? `*error: ${m.error}*` : m.content, "");
    if (m.usage) lines.push(`*${usageText(m)}*`, "");
  }
  download(`${name}.md`, "text/markdown", lines.join("\n"));
}

loadConversations();
PLAYGROUNDS.chat = openChat;
registerView("chat", "chat-pane", () => {
  // #/chat: the conversation open last, else the first chat model that is up.
  const model = (conversation && conversation.model)
    || (Object.values(models).find((m) => m.kind === "chat" && m.miners > 0) || {}).id;
  if (model && models[model]) navigate(`#/use/${encodeURIComponent(model)}`);
  else showPane("catalog-pane");
});
