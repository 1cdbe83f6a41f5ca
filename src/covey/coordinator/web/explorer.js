// The explorer (#/explorer, #/explorer/<request id>): a request's receipt with both of its
// Ed25519 signatures checked here, in the browser, with libsodium (the miner's, and the
// coordinator's countersignature, whose key must be this coordinator's from /healthz); a
// pasted receipt JSON checked the same way; and the ledger's chain head with its signature.
"use strict";

// ---- JSON exactly as the coordinator signs it ----
// The signed bytes are Python's json.dumps(obj, sort_keys=True, separators=(",", ":"),
// ensure_ascii=False) in UTF-8 (covey/protocol/signing.py). JSON.parse loses what that
// needs: integers past 2^53 and the difference between 1 and 1.0. parseExactJson keeps
// them: integers become numbers (or BigInts past 2^53), floats PyFloat values.

class PyFloat {
  constructor(value) { this.value = value; }
  valueOf() { return this.value; }
  toString() { return pyFloatRepr(this.value); }
}

// Python's repr(float) as json.dumps writes it: shortest round-trip digits, fixed notation
// for exponents -4 … 15, else d.ddde±XX; "Infinity" / "NaN" as json.dumps allows them.
function pyFloatRepr(x) {
  if (Number.isNaN(x)) return "NaN";
  if (!Number.isFinite(x)) return x > 0 ? "Infinity" : "-Infinity";
  if (x === 0) return Object.is(x, -0) ? "-0.0" : "0.0";
  const sign = x < 0 ? "-" : "";
  const [mantissa, expText] = Math.abs(x).toExponential().split("e");
  const digits = mantissa.replace(".", "");
  const exp = Number(expText);
  const point = exp + 1; // digits d1d2… mean 0.d1d2… × 10^point
  if (point > -4 && point <= 16) {
    if (point <= 0) return `${sign}0.${"0".repeat(-point)}${digits}`;
    if (point >= digits.length) return `${sign}${digits}${"0".repeat(point - digits.length)}.0`;
    return `${sign}${digits.slice(0, point)}.${digits.slice(point)}`;
  }
  const frac = digits.length > 1 ? `.${digits.slice(1)}` : "";
  const e = String(Math.abs(exp)).padStart(2, "0");
  return `${sign}${digits[0]}${frac}e${exp < 0 ? "-" : "+"}${e}`;
}

const JSON_STRING = /"(?:[^"\\\u0000-\u001f]|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*"/y;
const JSON_NUMBER = /-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?/y;

// A strict JSON parser (RFC 8259, as Python's json.loads reads it) that keeps numbers exact.
function parseExactJson(text) {
  let i = 0;
  const fail = (what) => { throw new SyntaxError(`${what} at character ${i + 1}`); };
  const space = () => { while (i < text.length && " \t\n\r".includes(text[i])) i++; };
  const value = () => {
    space();
    const c = text[i];
    if (c === "{") return object();
    if (c === "[") return array();
    if (c === '"') return string();
    if (c === "-" || (c >= "0" && c <= "9")) return number();
    for (const [word, v] of [["true", true], ["false", false], ["null", null]]) {
      if (text.startsWith(word, i)) { i += word.length; return v; }
    }
    return fail(c === undefined ? "unexpected end" : `unexpected ${JSON.stringify(c)}`);
  };
  const object = () => {
    const out = {};
    i++;
    space();
    if (text[i] === "}") { i++; return out; }
    for (;;) {
      space();
      if (text[i] !== '"') fail("expected a key");
      const key = string();
      space();
      if (text[i] !== ":") fail('expected ":"');
      i++;
      // defineProperty: a "__proto__" key is data, as in JSON.parse
      Object.defineProperty(out, key, { value: value(), enumerable: true, writable: true,
                                        configurable: true });
      space();
      if (text[i] === ",") { i++; continue; }
      if (text[i] === "}") { i++; return out; }
      fail('expected "," or "}"');
    }
  };
  const array = () => {
    const out = [];
    i++;
    space();
    if (text[i] === "]") { i++; return out; }
    for (;;) {
      out.push(value());
      space();
      if (text[i] === ",") { i++; continue; }
      if (text[i] === "]") { i++; return out; }
      fail('expected "," or "]"');
    }
  };
  const token = (pattern) => {
    pattern.lastIndex = i;
    const m = pattern.exec(text);
    if (m) i += m[0].length;
    return m;
  };
  const string = () => {
    const m = token(JSON_STRING);
    if (!m) fail("bad string");
    return JSON.parse(m[0]);
  };
  const number = () => {
    const m = token(JSON_NUMBER);
    if (!m) fail("bad number");
    if (m[1] === undefined && m[2] === undefined) {
      const n = Number(m[0]);
      return Number.isSafeInteger(n) ? (Object.is(n, -0) ? 0 : n) : BigInt(m[0]);
    }
    return new PyFloat(Number(m[0]));
  };
  const result = value();
  space();
  if (i < text.length) fail("unexpected text after the JSON value");
  return result;
}

// Python sorts keys by code point; JavaScript's default sort compares UTF-16 units, which
// orders characters past U+FFFF before U+E000…U+FFFF.
function byCodePoint(a, b) {
  const x = Array.from(a);
  const y = Array.from(b);
  for (let k = 0; k < Math.min(x.length, y.length); k++) {
    const d = x[k].codePointAt(0) - y[k].codePointAt(0);
    if (d) return d;
  }
  return x.length - y.length;
}

// Serialize as json.dumps does: canonical (indent null: sorted keys, no spaces) or, for
// people, indented in the keys' own order.
function toJson(v, indent = null, depth = 0) {
  if (v === null) return "null";
  if (v === true) return "true";
  if (v === false) return "false";
  if (typeof v === "bigint") return v.toString();
  if (v instanceof PyFloat) return pyFloatRepr(v.value);
  if (typeof v === "number") return Number.isInteger(v) ? BigInt(v).toString() : pyFloatRepr(v);
  // JSON.stringify escapes strings as Python does with ensure_ascii=False: \" \\ \b \f \n
  // \r \t, other controls as \u00XX (lower-case), everything else as itself.
  if (typeof v === "string") return JSON.stringify(v);
  const pad = indent === null ? "" : "\n" + " ".repeat(indent * (depth + 1));
  const end = indent === null ? "" : "\n" + " ".repeat(indent * depth);
  const sep = indent === null ? ":" : ": ";
  if (Array.isArray(v)) {
    if (!v.length) return "[]";
    return `[${v.map((x) => pad + toJson(x, indent, depth + 1)).join(",")}${end}]`;
  }
  if (typeof v === "object") {
    const keys = indent === null ? Object.keys(v).sort(byCodePoint) : Object.keys(v);
    if (!keys.length) return "{}";
    return `{${keys.map((k) => `${pad}${JSON.stringify(k)}${sep}${toJson(v[k], indent, depth + 1)}`)
      .join(",")}${end}}`;
  }
  throw new TypeError(`cannot serialize ${typeof v}`);
}

function canonicalJson(v) { return toJson(v); }

// ---- signatures ----

const RECEIPT_DOMAIN = "covey-receipt-v1\n";
const COUNTER_DOMAIN = "covey-countersign-v1\n";
const HEAD_DOMAIN = "covey-ledger-head-v1\n";
const HEX_KEY = /^[0-9a-f]{64}$/;
const HEX_SIG = /^[0-9a-f]{128}$/;

function joinBytes(a, b) {
  const out = new Uint8Array(a.length + b.length);
  out.set(a);
  out.set(b, a.length);
  return out;
}

// Ed25519 check of a hex signature by a hex public key; false (not an exception) on bad hex.
function sigValid(sodium, signature, message, publicKey) {
  if (typeof signature !== "string" || typeof publicKey !== "string") return false;
  signature = signature.toLowerCase(); // hex of either case, as covey receipts verify takes
  publicKey = publicKey.toLowerCase();
  if (!HEX_SIG.test(signature) || !HEX_KEY.test(publicKey)) return false;
  try {
    return sodium.crypto_sign_verify_detached(sodium.from_hex(signature), message,
                                              sodium.from_hex(publicKey));
  } catch (e) {
    return false;
  }
}

// SHA-256 of bytes, by libsodium (loadSodium() has resolved before any check runs).
function sha256(bytes) { return window.sodium.crypto_hash_sha256(bytes); }

const utf8 = (text) => new TextEncoder().encode(text);

// domain ‖ SHA-256(canonical JSON of body), the message a receipt signature covers.
function digestMessage(domain, body) {
  return joinBytes(utf8(domain), sha256(utf8(canonicalJson(body))));
}

// Check a receipt answer {receipt, miner_signature, coordinator, coordinator_signature}
// against this coordinator's key `pinned`: [{ok, text}] for the miner's signature, the
// countersignature, and whose key made it.
async function checkReceipt(answer, pinned) {
  const sodium = await loadSodium();
  const r = answer.receipt;
  const minerSig = answer.miner_signature;
  const minerOk = sigValid(sodium, minerSig, digestMessage(RECEIPT_DOMAIN, r), r.miner);
  const signer = answer.coordinator === undefined ? pinned
    : String(answer.coordinator).toLowerCase();
  const counterOk = sigValid(sodium, answer.coordinator_signature,
    digestMessage(COUNTER_DOMAIN, { receipt: r, miner_signature: minerSig }), signer);
  const checks = [
    { ok: minerOk, text: minerOk ? "Miner signature valid ✓"
      : "Miner signature invalid ✗: the receipt is not what the miner signed" },
    { ok: counterOk, text: counterOk ? "Coordinator signature valid ✓"
      : "Coordinator signature invalid ✗: the receipt or the miner's signature changed " +
        "after it was countersigned, or another key signed it" },
  ];
  if (!pinned) {
    checks.push({ ok: false, text: "This coordinator's key is unknown (/healthz did not answer) ✗" });
  } else if (answer.coordinator === undefined) {
    checks.push({ ok: true, text: "No coordinator key in the JSON: checked against this coordinator's key (/healthz)" });
  } else if (signer === pinned) {
    checks.push({ ok: true, text: "Countersigned by this coordinator ✓ (its key in /healthz)" });
  } else {
    checks.push({ ok: false, text: `Countersigned by another key ✗: ${String(signer)}, not this coordinator's ${pinned}` });
  }
  return checks;
}

// ---- the view ----

let explorerBuilt = false;

function buildExplorer() {
  const pane = $("explorer-pane");
  pane.replaceChildren(
    el("div", { className: "view-head" }, el("h2", { id: "explorer-title" }, "Explorer")),
    el("p", { className: "muted small lead" },
      "Every finished request has a receipt: its miner signs what it did, the coordinator " +
      "countersigns. Both signatures are checked here, in your browser, from the receipt's " +
      "own bytes; covey receipts verify makes the same check with no server at all."),
    el("div", { className: "net-grid" },
      el("section", { className: "panel", "aria-labelledby": "lookup-title" },
        el("h3", { id: "lookup-title" }, "Look up a request"),
        el("form", { id: "receipt-form", onsubmit: onLookup },
          el("label", { htmlFor: "receipt-id" }, "Request id (a completion's id)"),
          el("div", { className: "row" },
            el("input", { id: "receipt-id", type: "text", className: "mono grow", required: true,
                          maxLength: 100, autocomplete: "off", placeholder: "chatcmpl-…" }),
            el("button", { id: "receipt-lookup", type: "submit" }, "Look up"))),
        el("p", { id: "receipt-status", className: "muted small", "aria-live": "polite" },
          "Receipts are private to the account that made the request: this uses your API key.")),
      el("section", { className: "panel", "aria-labelledby": "paste-title" },
        el("h3", { id: "paste-title" }, "Check a receipt someone sent you"),
        el("label", { htmlFor: "receipt-json" },
          "Receipt JSON (from GET /v1/receipts/{id} or covey receipts get)"),
        el("textarea", { id: "receipt-json", className: "mono", rows: 8, autocomplete: "off" }),
        el("div", { className: "row" },
          el("button", { id: "receipt-verify", type: "button", onclick: onPasted },
            "Verify receipt")))),
    el("section", { id: "receipt-result", className: "panel", hidden: true,
                    "aria-labelledby": "result-title" },
      el("h3", { id: "result-title" }, "Receipt"),
      el("p", { id: "receipt-verdict", className: "verdict", "aria-live": "polite" }),
      el("ul", { id: "receipt-checks", className: "check-list" }),
      el("dl", { id: "receipt-fields", className: "fields" })),
    el("section", { id: "ledger-head", className: "panel", "aria-labelledby": "head-title" },
      el("div", { className: "panel-head" },
        el("h3", { id: "head-title" }, "Ledger chain head"),
        el("button", { id: "head-refresh", type: "button", onclick: loadHead }, "Check again")),
      el("p", { className: "muted small" },
        "Every transfer of credits is chained to the one before it by its SHA-256; the " +
        "coordinator signs the last hash after each commit. Whoever audits the ledger " +
        "(covey ledger verify) can check that it ends in this signed head."),
      el("p", { id: "head-verdict", className: "verdict", "aria-live": "polite" }, "checking…"),
      el("dl", { id: "head-fields", className: "fields" })));
  for (const id of ["receipt-id", "receipt-json"]) $(id).spellcheck = false;
  explorerBuilt = true;
}

function onLookup(e) {
  e.preventDefault();
  const id = $("receipt-id").value.trim();
  if (id) navigate(`#/explorer/${encodeURIComponent(id)}`);
}

function showVerdict(node, ok, text) {
  node.className = `verdict ${ok ? "ok" : "bad"}`;
  node.textContent = text;
}

function field(list, name, value, mono = true) {
  list.append(el("div", {}, el("dt", {}, name),
                 el("dd", { className: mono ? "mono" : "" }, value)));
}

// Check and show a parsed receipt answer.
async function showReceipt(answer, title) {
  const box = $("receipt-result");
  const list = $("receipt-checks");
  const fields = $("receipt-fields");
  box.hidden = false;
  $("result-title").textContent = title;
  list.replaceChildren();
  fields.replaceChildren();
  const problem = receiptProblem(answer);
  if (problem) {
    showVerdict($("receipt-verdict"), false, `Not a receipt (invalid): ${problem}`);
    return;
  }
  const h = await loadHealth();
  const checks = await checkReceipt(answer, h ? h.coordinator : null);
  const allOk = checks.every((c) => c.ok);
  showVerdict($("receipt-verdict"), allOk,
              allOk ? "Receipt valid: both signatures check out." : "Receipt invalid.");
  list.replaceChildren(...checks.map((c) => el("li", { className: c.ok ? "ok" : "bad" }, c.text)));
  const r = answer.receipt;
  field(fields, "Request id", String(r.job_id));
  field(fields, "Miner", String(r.miner));
  field(fields, "Model weights SHA-256", String(r.model_sha256));
  field(fields, "Request SHA-256", String(r.request_sha256));
  field(fields, "Output SHA-256", String(r.output_sha256));
  field(fields, "Prompt tokens", String(r.prompt_tokens), false);
  field(fields, "Completion tokens", String(r.completion_tokens), false);
  for (const k of Object.keys(r).filter((k) => !RECEIPT_KEYS.includes(k))) {
    field(fields, k, toJson(r[k]));
  }
  field(fields, "Miner signature", String(answer.miner_signature));
  field(fields, "Coordinator", String(answer.coordinator === undefined ? "(not given)" : answer.coordinator));
  field(fields, "Coordinator signature", String(answer.coordinator_signature));
}

const RECEIPT_KEYS = ["job_id", "miner", "model_sha256", "request_sha256", "output_sha256",
                      "prompt_tokens", "completion_tokens"];

function receiptProblem(a) {
  if (!a || typeof a !== "object" || Array.isArray(a)) return "expected a JSON object";
  if (!a.receipt || typeof a.receipt !== "object" || Array.isArray(a.receipt)) {
    return "the field \"receipt\" (an object) is missing";
  }
  for (const k of ["miner_signature", "coordinator_signature"]) {
    if (typeof a[k] !== "string") return `the field "${k}" (a string) is missing`;
  }
  if (typeof a.receipt.miner !== "string") return "receipt.miner (the miner's key) is missing";
  return null;
}

async function lookup(id) {
  const status = $("receipt-status");
  $("receipt-id").value = id;
  if (!apiKey()) {
    status.className = "bad small";
    status.textContent = "Sign up or paste your API key at the top first: receipts are " +
      "shown only to the account that made the request.";
    return;
  }
  status.className = "muted small";
  status.textContent = `looking up ${id}…`;
  $("receipt-result").hidden = true;
  try {
    // The raw text, not JSON.parse's numbers: the check needs the exact values.
    const resp = await fetch(`/v1/receipts/${encodeURIComponent(id)}`, { headers: authHeaders() });
    const text = await resp.text();
    if (!resp.ok) {
      let error = null;
      try { error = JSON.parse(text).error; } catch (e) { /* not JSON */ }
      throw new ApiFailure(resp.status, error);
    }
    const answer = parseExactJson(text);
    $("receipt-json").value = toJson(answer, 2);
    status.textContent = `Found ${id}. Its JSON is now in the box of "Check a receipt": ` +
      "change any byte of it and verify again to see a signature break.";
    await showReceipt(answer, `Receipt of ${id}`);
  } catch (e) {
    status.className = "bad small";
    status.textContent = failureText(e);
    $("receipt-result").hidden = true;
  }
}

async function onPasted() {
  const text = $("receipt-json").value;
  let answer;
  try {
    answer = parseExactJson(text);
  } catch (e) {
    $("receipt-result").hidden = false;
    $("result-title").textContent = "Pasted receipt";
    $("receipt-checks").replaceChildren();
    $("receipt-fields").replaceChildren();
    showVerdict($("receipt-verdict"), false, `Not JSON (invalid): ${e.message}`);
    return;
  }
  await showReceipt(answer, "Pasted receipt");
}

// Called by other views (a failed check's evidence) to check a receipt here.
function explorerCheck(answer) {
  if (!explorerBuilt) buildExplorer();
  navigate("#/explorer");
  $("receipt-json").value = toJson(answer, 2);
  onPasted();
}

async function loadHead() {
  const verdict = $("head-verdict");
  const fields = $("head-fields");
  try {
    const [head, h, sodium] = await Promise.all([
      api("/v1/ledger/head", { auth: false }), loadHealth(), loadSodium()]);
    const message = utf8(`${HEAD_DOMAIN}${head.seq}\n${head.hash}`);
    const sigOk = sigValid(sodium, head.signature, message, head.coordinator);
    const keyOk = Boolean(h) && head.coordinator === h.coordinator;
    if (sigOk && keyOk) {
      showVerdict(verdict, true, "Head signature valid ✓, by this coordinator's key (/healthz)");
    } else if (!sigOk) {
      showVerdict(verdict, false, "Head signature invalid ✗");
    } else {
      showVerdict(verdict, false, "Head signature valid, but by a key that is not this coordinator's ✗");
    }
    fields.replaceChildren();
    field(fields, "Entries", Number(head.seq).toLocaleString("en"), false);
    field(fields, "Head hash", head.hash);
    field(fields, "Signature", head.signature);
    field(fields, "Coordinator", head.coordinator);
    field(fields, "Checked", new Date().toLocaleTimeString("en-GB"), false);
  } catch (e) {
    showVerdict(verdict, false, `Could not check the head: ${failureText(e)}`);
  }
}

registerView("explorer", "explorer-pane", (args) => {
  if (!explorerBuilt) buildExplorer();
  loadHead();
  if (args[0]) lookup(args[0]);
});
