// The Account view (#/account). Signed out: sign up (with an invite code where the
// coordinator asks for one) or use an existing key. Signed in: balance and held credits,
// API keys (create, list, revoke), usage per UTC day as a stacked bar chart, and the
// transaction history page by page. A new key is shown once, with a copy button.
"use strict";

const acct = {
  gen: 0,            // render generation: answers for an older render are dropped
  renderedFor: undefined, // the API key the view was last drawn for
  revealed: null,    // {key, id, what}: a key shown once, until dismissed
  notice: null,      // a message kept across a re-render (e.g. after revoking this key)
  metric: "cost",    // the chart shows "cost" or "tokens"
  usage: null,       // last GET /v1/account/usage
  pages: [null],     // `before` cursors of the transaction pages seen; last = shown
  busy: false,       // a sign-up or revoke of ours is changing the key: no redraw from the header
};
const TX_PAGE = 20;
const CHART_COLORS = ["#3a6ee8", "#e0823d", "#1f9d55", "#b84fc2", "#c9a100", "#1aa3b5",
                      "#d0455c", "#6b7a99"];

// Credits with the trailing zeros trimmed: 0.25, 0.000004.
function acctCredits(ucr) { return String(Number((ucr / 1e6).toFixed(6))); }
function compact(n) { return n.toLocaleString("en", { notation: "compact", maximumFractionDigits: 1 }); }
function plural(n, word) { return `${n.toLocaleString("en")} ${word}${n === 1 ? "" : "s"}`; }

function panel(title, id, ...children) {
  return el("section", { className: "panel", "aria-labelledby": id },
    el("h3", { id }, title), ...children);
}
// Replace a node's children, leaving out the nulls of optional parts.
function put(node, ...children) { node.replaceChildren(...children.filter(Boolean)); }
function errorLine(id) { return el("p", { id, className: "error", role: "alert", hidden: true }); }
function showFailure(node, e) { node.textContent = e ? failureText(e) : ""; node.hidden = !e; }

// ---- the key shown once ----

function revealPanel() {
  const r = acct.revealed;
  const status = el("span", { className: "muted small", role: "status" });
  const field = el("input", { id: "account-new-key", className: "mono acct-key", readOnly: true,
                              value: r.key, onfocus: (e) => e.target.select() });
  async function copy() {
    status.textContent = await copyToClipboard(r.key) ? "Copied." : "Select the key and copy it.";
  }
  return el("section", { className: "panel acct-reveal", "aria-labelledby": "account-new-key-title" },
    el("h3", { id: "account-new-key-title" }, r.what),
    r.browser
      ? el("p", { className: "acct-warn" }, "The key this browser signs in with, to use the same account from ",
        el("code", {}, "curl"), ", the ", el("code", {}, "openai"), " SDK or ", el("code", {}, "covey"),
        ". Anyone who has it can spend this account's credits.")
      : el("p", { className: "acct-warn" }, el("strong", {}, "Shown once: "),
        "copy it now and keep it somewhere safe. The coordinator stores only its hash, so nobody can show it to you again."),
    el("label", { htmlFor: "account-new-key" }, "API key"),
    el("div", { className: "row wrap" }, field,
      el("button", { type: "button", id: "account-copy", onclick: copy }, "Copy"),
      el("button", { type: "button", onclick: (e) => {
        acct.revealed = null;
        e.currentTarget.closest(".acct-reveal").remove();
        $("account-title").focus();
      } }, "I saved it"), status));
}

// ---- signed out ----

function signedOut(refused) {
  const invite = Boolean(health && health.invite_only);
  // Not `required`: without a code the API's own message says what is missing.
  const code = el("input", { id: "invite-code", type: "text", autocomplete: "off", spellcheck: false });
  const err = errorLine("account-signup-error");
  const button = el("button", { id: "account-signup", type: "submit" }, "Sign up");
  async function submit(e) {
    e.preventDefault();
    showFailure(err, null);
    button.disabled = true;
    acct.busy = true;
    try {
      const a = await signUp(code.value.trim());
      acct.notice = null;
      acct.revealed = { key: a.api_key, what: `Your API key for account ${a.id}` };
      renderAccount();
    } catch (ex) {
      showFailure(err, ex);
      if (ex instanceof ApiFailure && ex.param === "invite_code") code.focus();
    } finally { button.disabled = false; acct.busy = false; }
  }
  const key = el("input", { id: "account-key", type: "password", autocomplete: "off" });
  const useKey = (e) => {
    e.preventDefault();
    const k = key.value.trim();
    if (k) { acct.notice = null; setApiKey(k); renderAccount(); }
  };
  return [
    refused ? el("div", { className: "panel acct-notice", role: "alert" },
      el("p", {}, `This browser's API key was refused: ${refused}`),
      el("button", { type: "button", onclick: () => setApiKey(null) }, "Forget this key")) : null,
    el("div", { className: "acct-grid" },
      panel("Sign up", "account-signup-title",
        el("p", {}, invite
          ? "This network is invite-only: sign-up needs an invite code from its operator."
          : "Make an account with test credits and an API key, no e-mail needed."),
        el("form", { id: "account-signup-form", onsubmit: submit },
          el("label", { htmlFor: "invite-code" }, invite ? "Invite code" : "Invite code (optional)"),
          el("div", { className: "row wrap" }, code, button)),
        err),
      panel("Use an existing API key", "account-use-title",
        el("p", {}, "Paste a key of your account (the header's field does the same). It stays in this browser only."),
        el("form", { onsubmit: useKey },
          el("label", { htmlFor: "account-key" }, "API key"),
          el("div", { className: "row wrap" }, key, el("button", { type: "submit" }, "Use key"))))),
  ];
}

// ---- signed in: balance ----

function balancePanel(a) {
  const stat = (label, value, id) => el("div", { className: "acct-stat" },
    el("dt", {}, label), el("dd", { id }, value));
  return panel("Balance", "account-balance-title",
    el("dl", { className: "acct-stats" },
      stat("Available", `${credits(a.balance)} credits`, "account-balance"),
      stat("Held for running requests", `${credits(a.held)} credits`, "account-held"),
      stat("Account", el("span", { className: "mono" }, a.id), "account-id")));
}

// ---- signed in: API keys ----

function isCurrent(k, list) {
  if (k.current !== undefined) return Boolean(k.current);
  const mine = list.filter((x) => apiKey() && apiKey().startsWith(x.prefix));
  return mine.length === 1 && mine[0] === k;
}

function keysPanel(list) {
  const err = errorLine("account-keys-error");
  const tbody = el("tbody");
  function confirmRow(k, row, current) {
    const cancel = el("button", { type: "button", onclick: () => { box.remove(); row.querySelector("button").focus(); } }, "Cancel");
    const go = el("button", { type: "button", className: "acct-danger", dataset: { confirm: k.id },
                              onclick: () => revoke(k, current, go) }, "Revoke key");
    const box = el("tr", { className: "acct-confirm" }, el("td", { colSpan: 4 },
      el("p", {}, `Revoke “${k.name}” (${k.prefix}…)? Programs using it stop working at once.`),
      current ? el("p", { className: "acct-warn" }, el("strong", {}, "This is the key this browser uses: "),
        "after revoking it, this page is signed out until you paste another key of this account.") : null,
      el("div", { className: "row wrap" }, go, cancel)));
    return box;
  }
  async function revoke(k, current, button) {
    button.disabled = true;
    showFailure(err, null);
    acct.busy = true;
    try {
      await api(`/v1/account/keys/${encodeURIComponent(k.id)}`, { method: "DELETE" });
      if (acct.revealed && (current || acct.revealed.id === k.id)) acct.revealed = null;
      if (current) {
        acct.notice = `You revoked “${k.name}”, the key this browser used; it was removed from this page. Paste another key of this account, or sign up again.`;
        setApiKey(null);
      }
      renderAccount();
    } catch (e) {
      showFailure(err, e);
      button.disabled = false;
    } finally { acct.busy = false; }
  }
  for (const k of list) {
    const current = isCurrent(k, list);
    const row = el("tr", { dataset: { key: k.id, name: k.name, current: String(current) } },
      el("td", {}, k.name, current ? el("span", { className: "acct-badge" }, "this browser") : null),
      el("td", { className: "mono" }, `${k.prefix}…`),
      el("td", {}, el("time", { dateTime: new Date(k.created * 1000).toISOString() }, since(k.created))),
      el("td", {}, el("button", { type: "button", className: "acct-revoke", "aria-label": `Revoke ${k.name}`,
        onclick: () => {
          const open = tbody.querySelector(".acct-confirm");
          if (open) open.remove();
          const box = confirmRow(k, row, current);
          row.after(box);
          box.querySelector("button").focus();
        } }, "Revoke")));
    tbody.append(row);
  }
  const name = el("input", { id: "account-key-name", type: "text", required: true, maxLength: 64,
                             autocomplete: "off", placeholder: "laptop" });
  async function create(e) {
    e.preventDefault();
    showFailure(err, null);
    try {
      const k = await api("/v1/account/keys", { body: { name: name.value.trim() } });
      acct.revealed = { key: k.api_key, id: k.id, what: `New API key “${k.name}”` };
      renderAccount();
    } catch (ex) { showFailure(err, ex); }
  }
  return panel("API keys", "account-keys-title",
    el("div", { className: "table-wrap" }, el("table", { id: "account-keys" },
      el("caption", { className: "acct-sr" }, "Your active API keys"),
      el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Name"), el("th", { scope: "col" }, "Key"),
        el("th", { scope: "col" }, "Created"), el("th", { scope: "col" }, el("span", { className: "acct-sr" }, "Actions")))),
      tbody)),
    err,
    el("button", { type: "button", id: "account-show-key", onclick: () => {
      acct.revealed = { key: apiKey(), what: "This browser's API key", browser: true };
      renderAccount();
    } }, "Show this browser's key"),
    el("form", { id: "account-key-form", onsubmit: create },
      el("label", { htmlFor: "account-key-name" }, "New key's name"),
      el("div", { className: "row wrap" }, name, el("button", { type: "submit" }, "Create key"))));
}

// ---- signed in: usage chart ----

const SVG_NS = "http://www.w3.org/2000/svg";
function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const c of children) node.append(c instanceof Node ? c : String(c));
  return node;
}
function valueOf(r) { return acct.metric === "cost" ? r.cost : r.prompt_tokens + r.completion_tokens; }
function metricText(v) { return acct.metric === "cost" ? `${acctCredits(v)} credits` : `${v.toLocaleString("en")} tokens`; }
function niceCeil(v) {
  if (v <= 0) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  return [1, 2, 2.5, 5, 10].map((m) => m * p).find((m) => m >= v);
}

// The UTC days shown: `days` of them ending today (or the newest day in the data).
function dayList(u) {
  const newest = u.data.reduce((d, r) => (r.date > d ? r.date : d), new Date().toISOString().slice(0, 10));
  const end = Date.parse(`${newest}T00:00:00Z`);
  return Array.from({ length: u.days }, (_, i) => new Date(end - (u.days - 1 - i) * 86400e3).toISOString().slice(0, 10));
}

function drawChart(box) {
  const u = acct.usage;
  const models = [...new Set(u.data.map((r) => r.model))];
  const total = (m, f = valueOf) => u.data.filter((r) => r.model === m).reduce((s, r) => s + f(r), 0);
  // One order (and so one colour per model) for both metrics: by cost, most first.
  const cost = Object.fromEntries(models.map((m) => [m, total(m, (r) => r.cost)]));
  models.sort((a, b) => cost[b] - cost[a] || a.localeCompare(b));
  const color = (m) => CHART_COLORS[models.indexOf(m) % CHART_COLORS.length];
  const days = dayList(u);
  const byDay = new Map(days.map((d) => [d, []]));
  for (const r of u.data) if (byDay.has(r.date)) byDay.get(r.date).push(r);
  const sums = days.map((d) => byDay.get(d).reduce((s, r) => s + valueOf(r), 0));
  const W = Math.max(260, Math.floor(box.clientWidth || 600)), H = 200;
  const L = acct.metric === "cost" ? 72 : 48, R = 8, T = 10, B = 26;
  const top = niceCeil(Math.max(...sums));
  const y = (v) => T + (H - T - B) * (1 - v / top), step = (W - L - R) / days.length;
  const all = u.data.reduce((s, r) => s + valueOf(r), 0);
  const chart = svg("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img", id: "account-chart",
    "aria-label": `${acct.metric === "cost" ? "Cost" : "Tokens"} per UTC day over the last ${u.days} days, stacked by model: ${metricText(all)} in all. The table below has the numbers.` });
  // Grid lines at 0, the top and (where it is a whole number of µcr or tokens) the middle.
  for (const f of Number.isInteger(top / 2) ? [0, 0.5, 1] : [0, 1]) {
    chart.append(svg("line", { x1: L, x2: W - R, y1: y(top * f), y2: y(top * f), class: "acct-grid-line" }),
      svg("text", { x: L - 6, y: y(top * f) + 4, "text-anchor": "end", class: "acct-axis" },
        acct.metric === "cost" ? acctCredits(top * f) : compact(top * f)));
  }
  days.forEach((d, i) => {
    let base = 0;
    const x = L + i * step + step * 0.15, w = Math.max(1, step * 0.7);
    for (const r of byDay.get(d).sort((a, b) => models.indexOf(a.model) - models.indexOf(b.model))) {
      const v = valueOf(r);
      if (v <= 0) continue;
      chart.append(svg("rect", { x, width: w, y: y(base + v), height: Math.max(1, y(base) - y(base + v)),
        fill: color(r.model), "data-model": r.model }, svg("title", {},
        `${d} · ${r.model}: ${metricText(v)} (${plural(r.requests, "request")})`)));
      base += v;
    }
    if (i === 0 || i === days.length - 1 || (days.length > 10 && i === Math.floor(days.length / 2))) {
      chart.append(svg("text", { x: L + i * step + step / 2, y: H - 8, class: "acct-axis",
        "text-anchor": i === 0 ? "start" : i === days.length - 1 ? "end" : "middle" }, d.slice(5)));
    }
  });
  const legend = el("ul", { className: "acct-legend", "aria-label": "Models" }, models.map((m) =>
    el("li", {}, el("span", { className: "acct-swatch", style: `background:${color(m)}`, "aria-hidden": "true" }),
      el("span", { className: "mono" }, m), el("span", { className: "muted" }, ` ${metricText(total(m))}`))));
  box.replaceChildren(chart, legend);
}

function usageTable(u) {
  const rows = [...u.data].sort((a, b) => b.date.localeCompare(a.date) || a.model.localeCompare(b.model));
  const th = (t, num) => el("th", { scope: "col", className: num ? "num" : "" }, t);
  return el("details", { className: "acct-details" }, el("summary", {}, "Usage as a table"),
    el("div", { className: "table-wrap" }, el("table", { id: "account-usage-table" },
      el("caption", { className: "acct-sr" }, `Usage per UTC day and model, last ${u.days} days`),
      el("thead", {}, el("tr", {}, th("Day (UTC)"), th("Model"), th("Requests", 1), th("Prompt tokens", 1),
        th("Completion tokens", 1), th("Cost (credits)", 1))),
      el("tbody", {}, rows.map((r) => el("tr", {}, el("td", {}, r.date), el("td", { className: "mono" }, r.model),
        el("td", { className: "num" }, r.requests.toLocaleString("en")),
        el("td", { className: "num" }, r.prompt_tokens.toLocaleString("en")),
        el("td", { className: "num" }, r.completion_tokens.toLocaleString("en")),
        el("td", { className: "num" }, acctCredits(r.cost))))))));
}

function usagePanel(u) {
  if (!u.data.length) {
    return panel("Usage", "account-usage-title", el("p", { className: "muted", id: "account-usage-empty" },
      `No requests in the last ${u.days} days.`));
  }
  const box = el("div", { className: "acct-chart", id: "account-chart-box" });
  const chips = el("div", { className: "chips", role: "group", "aria-label": "Chart shows" },
    [["cost", "Cost"], ["tokens", "Tokens"]].map(([m, label]) => el("button", {
      type: "button", className: "chip", "aria-pressed": String(acct.metric === m), dataset: { metric: m },
      onclick: (e) => {
        acct.metric = m;
        for (const b of chips.children) b.setAttribute("aria-pressed", String(b === e.currentTarget));
        drawChart(box);
      } }, label)));
  requestAnimationFrame(() => drawChart(box));
  return panel(`Usage, last ${u.days} days`, "account-usage-title", chips, box, usageTable(u));
}

// ---- signed in: transactions ----

function txPanel(page) {
  const th = (t, num) => el("th", { scope: "col", className: num ? "num" : "" }, t);
  const at = acct.pages.length;
  const nav = el("div", { className: "row wrap acct-pager", hidden: at === 1 && !page.has_more },
    el("button", { type: "button", id: "account-tx-newer", disabled: at === 1,
      onclick: () => { acct.pages.pop(); refreshTx("account-tx-newer"); } }, "← Newer"),
    el("span", { className: "muted small", id: "account-tx-page" }, `Page ${at}`),
    el("button", { type: "button", id: "account-tx-older", disabled: !page.has_more,
      onclick: () => { acct.pages.push(page.data[page.data.length - 1].seq); refreshTx("account-tx-older"); } }, "Older →"));
  const rows = page.data.map((t) => el("tr", { dataset: { seq: t.seq } },
    el("td", {}, el("time", { dateTime: new Date(t.created * 1000).toISOString(),
                              title: new Date(t.created * 1000).toISOString() }, since(t.created))),
    el("td", {}, t.kind),
    el("td", { className: `num ${t.direction === "in" ? "ok" : "bad"}` },
      `${t.direction === "in" ? "+" : "−"}${credits(t.amount)}`),
    el("td", { className: "mono" }, t.counterparty),
    el("td", { className: "num mono" }, t.seq)));
  return panel("Transactions", "account-tx-title",
    page.data.length ? el("div", { className: "table-wrap" }, el("table", { id: "account-tx" },
      el("caption", { className: "acct-sr" }, `Transactions, newest first, page ${at}`),
      el("thead", {}, el("tr", {}, th("When"), th("Kind"), th("Credits", 1), th("Counterparty"), th("#", 1))),
      el("tbody", {}, rows))) : el("p", { className: "muted" }, "No transactions yet."),
    nav);
}

async function refreshTx(focusId) {
  const before = acct.pages[acct.pages.length - 1];
  const q = `limit=${TX_PAGE}${before ? `&before=${before}` : ""}`;
  const slot = $("account-tx-slot");
  try {
    const page = await api(`/v1/account/transactions?${q}`);
    if (slot.isConnected) slot.replaceChildren(txPanel(page));
    // Keep the keyboard on the pager: the button pressed, or the other one once it is off.
    const pressed = focusId && $(focusId);
    if (pressed) (pressed.disabled ? pressed.parentNode.querySelector("button:not(:disabled)") || pressed : pressed).focus();
  } catch (e) {
    slot.replaceChildren(panel("Transactions", "account-tx-title", el("p", { className: "error" }, failureText(e))));
  }
}

// ---- the view ----

async function renderAccount() {
  const my = ++acct.gen;
  const body = $("account-body");
  const key = apiKey();
  acct.renderedFor = key;
  $("account-refresh").hidden = !key;
  const notice = acct.notice ? el("p", { className: "panel acct-notice", role: "status" }, acct.notice) : null;
  if (!key) {
    if (!health) await loadHealth();
    if (my === acct.gen) put(body, notice, acct.revealed ? revealPanel() : null, ...signedOut());
    return;
  }
  body.setAttribute("aria-busy", "true");
  const got = await Promise.allSettled([api("/v1/account"), api("/v1/account/keys"),
                                        api("/v1/account/usage?days=30")]);
  if (my !== acct.gen) return;
  body.removeAttribute("aria-busy");
  const [a, keys, usage] = got;
  if (a.status === "rejected") {
    const e = a.reason;
    if (e instanceof ApiFailure && e.status === 401) put(body, ...signedOut(e.message));
    else put(body, el("p", { className: "panel error", role: "alert" }, `Could not load the account: ${failureText(e)}`));
    return;
  }
  const failed = (r, what) => panel(what, `account-${what.toLowerCase().replace(/\W+/g, "-")}-title`,
    el("p", { className: "error" }, failureText(r.reason)));
  acct.usage = usage.status === "fulfilled" ? usage.value : null;
  showAccount(); // the header's balance too
  put(body, notice, acct.revealed ? revealPanel() : null,
    el("div", { className: "acct-top" }, balancePanel(a.value),
      keys.status === "fulfilled" ? keysPanel(keys.value.data) : failed(keys, "API keys")),
    acct.usage ? usagePanel(acct.usage) : failed(usage, "Usage"),
    el("div", { id: "account-tx-slot" }));
  acct.pages = [null];
  await refreshTx();
  if (my === acct.gen) body.dataset.ready = String(my);
}

function setupAccountPane() {
  const pane = $("account-pane");
  pane.replaceChildren(
    el("div", { className: "view-head" }, el("h2", { id: "account-title", tabIndex: -1 }, "Account"),
      el("button", { type: "button", id: "account-refresh", onclick: () => renderAccount() }, "Refresh")),
    el("div", { id: "account-body" }));
  // The header's buttons change the key too (use, forget, sign up): draw the view again.
  new MutationObserver(() => {
    if (!pane.hidden && !acct.busy && apiKey() !== acct.renderedFor) renderAccount();
  }).observe($("forget"), { attributes: true, attributeFilter: ["hidden"] });
  let resize = null; // the chart is drawn to the width it has
  window.addEventListener("resize", () => { clearTimeout(resize); resize = setTimeout(() => {
    if ($("account-chart-box") && !pane.hidden) drawChart($("account-chart-box"));
  }, 50); });
}

setupAccountPane();
registerView("account", "account-pane", () => { renderAccount(); });
