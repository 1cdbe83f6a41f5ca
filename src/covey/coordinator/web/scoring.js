// The scoring playground (loaded after app.js and media.js, whose helpers it uses): one row
// of a tabular model's features in, the model's probability out, with a zero-knowledge proof
// when asked. Encrypted scoring needs keys this page cannot make; the pane says where to go.
"use strict";

// Two rows of scikit-learn's breast-cancer data set (rows 0 and 19), for the bundled models
// trained on it: a person trying the model rarely has a biopsy's 30 measurements at hand.
const SCORE_EXAMPLES = {
  malignant: [17.99, 10.38, 122.8, 1001, 0.1184, 0.2776, 0.3001, 0.1471, 0.2419, 0.07871,
              1.095, 0.9053, 8.589, 153.4, 0.006399, 0.04904, 0.05373, 0.01587, 0.03003,
              0.006193, 25.38, 17.33, 184.6, 2019, 0.1622, 0.6656, 0.7119, 0.2654, 0.4601,
              0.1189],
  benign: [13.54, 14.36, 87.46, 566.3, 0.09779, 0.08129, 0.06664, 0.04781, 0.1885, 0.05766,
           0.2699, 0.7886, 2.058, 23.56, 0.008462, 0.0146, 0.02387, 0.01315, 0.0198, 0.0023,
           15.11, 19.26, 99.7, 711.2, 0.144, 0.1773, 0.239, 0.1288, 0.2977, 0.07259],
};
// The data set's first and last columns: a card that starts and ends with them (and has
// 30) lists its features in the examples' order.
const SCORE_EXAMPLE_ENDS = ["mean radius", "worst fractal dimension"];

let scoreFeatures = [];   // the feature names the form's fields are built for
let scoreTimer = null;    // ticks the seconds of a running proof

function scoreCard(model) { return (models[model] && models[model].card) || null; }

function scoreHasExamples(features) {
  return features.length === SCORE_EXAMPLES.malignant.length
    && features[0] === SCORE_EXAMPLE_ENDS[0] && features[features.length - 1] === SCORE_EXAMPLE_ENDS[1];
}

function scorePercent(score) { return `${(score * 100).toFixed(1)} %`; }

// ---- the pane ----

function scoreCardRows(m) {
  const card = m.card;
  const rows = [["Output", card.output]];
  if (card.training_data) rows.push(["Training data", card.training_data]);
  if (card.accuracy !== null && card.accuracy !== undefined) {
    rows.push(["Accuracy", `${(card.accuracy * 100).toFixed(1)} % correct on ${card.test_rows.toLocaleString("en")} held-out rows`]);
  }
  if (m.proof) rows.push(["Proofs", `available (verifying key sha256 ${m.proof_vk_sha256})`]);
  if (m.encrypted && card.encrypted_error !== null) {
    rows.push(["Encrypted scores", `within ±${card.encrypted_error} of the plain score`]);
  }
  return rows.flatMap(([term, text]) => [el("dt", {}, term), el("dd", {}, text)]);
}

// One labelled number field per feature; its error line sits under it.
function scoreField(name, i) {
  const id = `score-f${i}`;
  return el("div", { className: "score-field" },
    el("label", { htmlFor: id }, name),
    el("input", { id, type: "number", step: "any", inputMode: "decimal",
                  autocomplete: "off", dataset: { index: i },
                  "aria-describedby": `${id}-error` }),
    el("span", { id: `${id}-error`, className: "error small", hidden: true }));
}

// Models with the same features (the two bundled ones) share the fields, so a row typed
// for one can be scored, or proved, by the other.
function scoreBuildFields(features) {
  if (features.length === scoreFeatures.length && features.every((f, i) => f === scoreFeatures[i])) return;
  scoreFeatures = features.slice();
  $("score-grid").replaceChildren(...features.map(scoreField));
}

function openScoring(model) {
  select(model);
  const m = models[model];
  $("score-model").textContent = model;
  showPane("score-pane");
  scoreClearErrors();
  $("score-result").replaceChildren();
  $("score-status").textContent = "";
  const card = scoreCard(model);
  $("score-form").hidden = !card;
  if (!card) {
    $("score-card").replaceChildren(el("dt", {}, "Status"),
                                    el("dd", {}, "No miner serves this model now: its card comes with one."));
    return;
  }
  $("score-card").replaceChildren(...scoreCardRows(m));
  scoreBuildFields(card.features);
  $("score-examples").hidden = !scoreHasExamples(card.features);
  $("score-proof-row").hidden = !m.proof;
  if (!m.proof) $("score-proof").checked = false;
  $("score-encrypted").hidden = !m.encrypted;
  const row = scoreHasExamples(card.features) ? `${SCORE_EXAMPLES.malignant.slice(0, 2).join(",")},…` : "…";
  $("score-encrypted-cli").textContent = `covey score ${model} --encrypted --input ${row}`;
}

// ---- filling the form ----

function scoreFill(values) {
  scoreClearErrors();
  values.forEach((v, i) => { $(`score-f${i}`).value = String(v); });
}

// A pasted row: numbers separated by commas, semicolons, tabs or spaces (a spreadsheet's
// copy gives tabs); the first line only.
function scoreFillFromCsv() {
  const err = $("score-csv-error");
  const line = $("score-csv").value.trim().split(/\r?\n/)[0];
  const parts = line ? line.split(/[,;\t ]+/).filter((p) => p !== "") : [];
  const bad = parts.find((p) => !Number.isFinite(Number(p)));
  let message = "";
  if (bad !== undefined) message = `"${bad}" is not a number.`;
  else if (parts.length !== scoreFeatures.length) {
    message = `The model takes ${scoreFeatures.length} numbers; this row has ${parts.length}.`;
  }
  $("score-csv").setAttribute("aria-invalid", String(Boolean(message)));
  if (message) { showError(err, message); return; }
  scoreFill(parts.map(Number));
  showError(err, "");
}

// ---- errors: the API's message by the field its `param` names ----

function scoreClearErrors() {
  for (const id of ["score-error", "score-inputs-error", "score-proof-error", "score-csv-error"]) showError($(id), "");
  for (const input of document.querySelectorAll("#score-pane [aria-invalid=true]")) {
    input.setAttribute("aria-invalid", "false");
  }
  for (const span of document.querySelectorAll("#score-grid .error")) showError(span, "");
}

// `param` is e.g. "inputs[0][3]" (row 0, feature 3: a value that is not a number),
// "inputs", "proof" or "model". The card's own checks (a value outside the range a proof
// takes) answer "inputs" and name the cell in the message: "row 0, feature 3 ('mean area')".
function scoreShowFailure(param, message) {
  const cell = /^inputs\[0\]\[(\d+)\]/.exec(param || "")
    || (param === "inputs" && /^row 0, feature (\d+) /.exec(message));
  const input = cell && $(`score-f${cell[1]}`);
  if (input) {
    input.setAttribute("aria-invalid", "true");
    showError($(`${input.id}-error`), `${scoreFeatures[Number(cell[1])]}: ${message}`);
    input.focus();
  } else if (param && param.startsWith("inputs")) {
    showError($("score-inputs-error"), message);
  } else if (param === "proof") {
    $("score-proof").setAttribute("aria-invalid", "true");
    showError($("score-proof-error"), message);
  } else {
    showError($("score-error"), message);
  }
}

// ---- scoring ----

// µcr of an answer at the catalog's price (the coordinator's arithmetic: rounded up).
function scoreCost(m, usage) {
  const p = m.price;
  return Math.ceil((usage.rows * p.prompt + usage.work_ms * p.completion) / p.per);
}

function scoreResultView(m, body) {
  const item = body.data[0];
  const fill = el("span", { className: "score-bar-fill" });
  fill.style.width = `${Math.max(0, Math.min(1, item.score)) * 100}%`;  // CSSOM: the CSP allows it
  const usage = body.usage;
  const parts = [`${usage.rows} row${usage.rows === 1 ? "" : "s"}`];
  if (usage.work_ms) parts.push(`${(usage.work_ms / 1000).toFixed(1)} s of proving`);
  if (m.price) parts.push(`${credits(scoreCost(m, usage))} credits`);
  if (body.miner) parts.push(`scored by miner ${body.miner.slice(0, 12)}…`);
  const nodes = [
    el("p", { className: "score-value" },
      el("span", { id: "score-percent", dataset: { score: item.score } }, scorePercent(item.score))),
    el("div", { className: "score-bar", "aria-hidden": "true" }, fill),
    el("p", { className: "score-output" },
      `${m.card.output.charAt(0).toUpperCase()}${m.card.output.slice(1)}: ${item.score.toFixed(4)}`),
  ];
  if (body.proof) {
    nodes.push(el("p", { id: "score-proved", className: "ok" },
      `Proof verified by the coordinator (verifying key sha256 `,
      el("span", { className: "mono" }, body.proof.vk_sha256), ")."));
    nodes.push(el("div", { className: "row wrap" },
      el("button", { id: "score-download", type: "button",
                     onclick: () => download("answer.json", "application/json", JSON.stringify(body, null, 2)) },
        "Download answer (JSON)"),
      el("span", { className: "muted small" }, "then check it yourself: ",
        el("code", {}, "covey proofs verify answer.json --vk vk.key"),
        " with the model owner's verifying key")));
  }
  nodes.push(el("p", { id: "score-usage", className: "muted small" }, parts.join(" · ")));
  return nodes;
}

function scoreBusy(busy, proof) {
  const button = $("score");
  button.disabled = busy;
  button.textContent = busy ? (proof ? "Proving…" : "Scoring…") : "Score";
  $("score-form").setAttribute("aria-busy", String(busy));
  clearInterval(scoreTimer);
  scoreTimer = null;
  if (busy && proof) {
    const started = Date.now();
    const tick = () => {
      $("score-status").textContent = `proving… ${Math.round((Date.now() - started) / 1000)} s (a proof takes a few seconds)`;
    };
    tick();
    scoreTimer = setInterval(tick, 1000);
  } else {
    $("score-status").textContent = busy ? "scoring…" : "";
  }
}

async function scoreSubmit(ev) {
  ev.preventDefault();
  scoreClearErrors();
  const model = current;
  const m = models[model];
  if (!m || !m.card) { showError($("score-error"), "No miner serves this model now."); return; }
  if (!apiKey()) { showError($("score-error"), NO_KEY); return; }
  // An empty field goes as null: the API names the cell it refuses, and the message lands
  // by that field.
  const row = scoreFeatures.map((_, i) => {
    const v = $(`score-f${i}`).value;
    return v === "" ? null : Number(v);
  });
  const proof = Boolean(m.proof && $("score-proof").checked);
  $("score-result").replaceChildren();
  scoreBusy(true, proof);
  try {
    const body = await api("/v1/scores", { body: { model, inputs: [row], proof } });
    if (current === model) $("score-result").replaceChildren(...scoreResultView(m, body));
  } catch (e) {
    if (e instanceof ApiFailure) scoreShowFailure(e.param, e.message);
    else showError($("score-error"), failureText(e));
  } finally {
    scoreBusy(false, proof);
    showAccount();
  }
}

$("score-form").addEventListener("submit", scoreSubmit);
$("score-malignant").addEventListener("click", () => scoreFill(SCORE_EXAMPLES.malignant));
$("score-benign").addEventListener("click", () => scoreFill(SCORE_EXAMPLES.benign));
$("score-csv-fill").addEventListener("click", scoreFillFromCsv);
$("score-csv").addEventListener("keydown", (e) => {
  // Enter here fills the form from the row; it must not score a half-filled form.
  if (e.key === "Enter") { e.preventDefault(); scoreFillFromCsv(); }
});
PLAYGROUNDS.scoring = openScoring;
