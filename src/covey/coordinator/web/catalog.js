// The catalog (#/): every model with its kind, status, miners, context, price and measured
// speed, filtered by kind; a card opens the model's playground.
"use strict";

let kindFilter = "all";
const STATUS_LABELS = { up: "up", trial: "on trial", offline: "no miner",
                        incomplete: "incomplete" };

// Credits with the trailing zeros trimmed: 0.25, 0.000004.
function shortCredits(ucr) { return String(Number((ucr / 1e6).toFixed(6))); }

// The price in the unit a person thinks in: per 1M tokens, per minute of audio, per 1,000
// characters, per 256-pixel image tile, per 1,000 scored rows (and per second of proving).
function priceText(m) {
  const p = m.price;
  if (!p) return "price unknown";
  const per = (ucrPerUnit) => shortCredits(ucrPerUnit);
  switch (p.unit) {
    case "seconds": return `${per((p.prompt * 60) / p.per)} credits / minute of audio`;
    case "characters": return `${per((p.prompt * 1000) / p.per)} credits / 1K characters`;
    case "tiles": return `${per(p.prompt / p.per)} credits / 256² tile`;
    case "rows": return `${per((p.prompt * 1000) / p.per)} credits / 1K rows`
      + (m.proof ? ` · ${per((p.completion * 1000) / p.per)} credits / second of proving` : "");
    default:
      return m.kind === "embedding"
        ? `${shortCredits(p.prompt)} credits / 1M tokens`
        : `${shortCredits(p.prompt)} in · ${shortCredits(p.completion)} out credits / 1M tokens`;
  }
}

function speedText(m) {
  const parts = [];
  if (m.ttft_s !== null && m.ttft_s !== undefined) parts.push(`TTFT ${m.ttft_s < 1 ? `${Math.round(m.ttft_s * 1000)} ms` : `${m.ttft_s.toFixed(1)} s`}`);
  if (m.decode_tps !== null && m.decode_tps !== undefined && m.kind === "chat") parts.push(`${m.decode_tps.toFixed(0)} tokens/s`);
  return parts.length ? parts.join(" · ") : "speed not measured yet";
}

// A sharded model: which blocks live miners hold (one cell per block, shaded by how many
// hold it; a gap in red) and, in words, the chain and what is missing.
function shardLines(m) {
  const s = m.shards;
  const held = new Array(s.total).fill(0);
  for (const h of s.held) for (let b = h.start; b < h.end; b++) held[b] += 1;
  const range = ([a, b]) => `${a}–${b - 1}`;
  const words = s.missing.length
    ? `blocks ${s.missing.map(range).join(", ")} of ${s.total} have no miner`
    : `${s.held.length} shard${s.held.length === 1 ? "" : "s"} hold all ${s.total} blocks`;
  return [
    el("span", { className: "blockmap", role: "img",
                 "aria-label": `Sharded model: ${words}` },
       held.map((n, b) => el("span", { className: `block c${Math.min(n, 3)}`,
                                       title: `block ${b}: ${n} miner${n === 1 ? "" : "s"}` }))),
    el("span", { className: `card-line small ${s.missing.length ? "bad" : "muted"}` },
       `sharded · ${words}`)];
}

function card(m) {
  const miners = `${m.miners} miner${m.miners === 1 ? "" : "s"}`;
  const trial = m.miners_on_trial ? ` · ${m.miners_on_trial} on trial` : "";
  const button = el("button", {
    type: "button", className: "card" + (m.id === current ? " active" : ""),
    dataset: { model: m.id, kind: m.kind, status: m.status }, disabled: m.miners === 0,
    onclick: () => openModel(m),
  },
  el("span", { className: "card-top" },
    el("span", { className: "name" }, m.id),
    el("span", { className: "kind" }, m.kind)),
  el("span", { className: "card-line" },
    el("span", { className: `light ${m.status}`, "aria-hidden": "true" }),
    el("span", { className: "status-text" }, STATUS_LABELS[m.status] || m.status),
    el("span", { className: "miners" }, ` · ${miners}${trial}`)),
  el("span", { className: "card-line muted" },
    m.context_length && ["chat", "embedding"].includes(m.kind)
      ? `${m.context_length.toLocaleString("en")} tokens context · ` : "",
    priceText(m)),
  ...(m.shards ? shardLines(m) : []),
  // A scoring model answers in milliseconds; tokens per second mean nothing there.
  m.kind === "scoring" ? null : el("span", { className: "card-line muted speed" }, speedText(m)));
  return el("li", {}, button);
}

function renderFilter(list) {
  const kinds = [...new Set(list.map((m) => m.kind))].sort();
  const box = $("kind-filter");
  if (!kinds.includes(kindFilter)) kindFilter = "all";
  box.replaceChildren(...["all", ...kinds].map((k) => el("button", {
    type: "button", className: "chip", dataset: { kind: k },
    "aria-pressed": String(k === kindFilter),
    onclick: () => { kindFilter = k; renderCatalog(); },
  }, k)));
}

function renderCatalog() {
  const list = Object.values(models).sort((a, b) => (a.miners === 0) - (b.miners === 0)
                                          || a.id.localeCompare(b.id));
  renderFilter(list);
  const shown = list.filter((m) => kindFilter === "all" || m.kind === kindFilter);
  const focused = document.activeElement && document.activeElement.dataset
    ? document.activeElement.dataset.model : null;
  $("models").replaceChildren(...shown.map(card));
  // A refresh must not steal the keyboard user's place in the list.
  if (focused) {
    const again = document.querySelector(`#models button[data-model="${CSS.escape(focused)}"]`);
    if (again) again.focus();
  }
  $("catalog-empty").hidden = list.length > 0;
}

async function loadModels() {
  try {
    const body = await api("/v1/models", { auth: false });
    models = Object.fromEntries(body.data.map((m) => [m.id, m]));
    renderCatalog();
    if (document.body.dataset.catalog !== "ready") {
      // Milliseconds from navigation to the first catalog on screen (bench/web.py reads it).
      window.coveyCatalogMs = performance.now();
      document.body.dataset.catalog = "ready";
    }
    // One miner may serve several models: count miners, not (model, miner) pairs.
    const h = await loadHealth();
    const n = (count, what) => `${count} ${what}${count === 1 ? "" : "s"}`;
    $("status").textContent = h ? `${n(body.data.length, "model")}, ${n(h.miners, "miner")}` : "";
  } catch (e) {
    $("status").textContent = "coordinator unreachable";
  }
}

registerView("catalog", "catalog-pane", () => {});
