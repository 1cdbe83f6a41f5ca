// End-to-end encrypted chat from the browser: the page's twin of covey/client/sealed.py,
// over the same /v1/sealed WebSocket and the same boxes (covey/protocol/sealing.py), with
// libsodium (vendored; never crypto of our own):
// - the coordinator routes a request to a miner and sends that miner's X25519 box key signed
//   by the miner's Ed25519 identity; the page checks that signature itself;
// - the page seals the prompt to that key with crypto_box (X25519 + XSalsa20-Poly1305) from a
//   fresh key pair per request; the box's precomputed key is the session key;
// - the miner's answer comes back in crypto_secretbox boxes under the session key;
// - a re-check gets the session key sealed (crypto_box_seal) to the validator's signed key.
// The coordinator sees the model, the sampling settings, sizes and timings, never the words.
"use strict";

const SEALED_PROTOCOL = "covey-sealed.v1";   // covey.protocol.e2e.SUBPROTOCOL
const KEY_PROTOCOL = "bearer.";              // covey.protocol.e2e.KEY_SUBPROTOCOL
const BOX_KEY_DOMAIN = "covey-box-key-v1\n";  // covey.protocol.sealing._BOX_KEY_DOMAIN
const SESSION_KEY_TTL_MS = 300000;           // covey.client.sealed.KEY_TTL

class SealedError extends Error {
  constructor(status, message, code) { super(message); this.status = status; this.code = code; }
}

function concatBytes(a, b) {
  const out = new Uint8Array(a.length + b.length);
  out.set(a, 0);
  out.set(b, a.length);
  return out;
}

class SealedChannel {
  constructor(key) {
    this.key = key;
    this.ws = null;
    this.opening = null;
    this.inbox = new Map();     // request id -> handler(message)
    this.sessionKeys = new Map(); // request id -> {key, until}
    this.next = 1;
  }

  // The open WebSocket (connecting on first use, and again after a loss).
  connect() {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) return Promise.resolve(this.ws);
    if (this.opening) return this.opening;
    const url = location.origin.replace(/^http/, "ws") + "/v1/sealed";
    this.opening = new Promise((resolve, reject) => {
      const ws = new WebSocket(url, [SEALED_PROTOCOL, KEY_PROTOCOL + this.key]);
      ws.addEventListener("open", () => { this.ws = ws; this.opening = null; resolve(ws); });
      ws.addEventListener("message", (ev) => this.receive(ev.data));
      ws.addEventListener("close", (ev) => {
        this.opening = null;
        if (this.ws === ws) this.ws = null;
        const error = ev.code === 4401
          ? new SealedError(401, ev.reason || "Incorrect API key provided.", "invalid_api_key")
          : new SealedError(502, "The connection to the coordinator was lost.", "coordinator_unreachable");
        reject(error);
        for (const handler of [...this.inbox.values()]) handler({ type: "lost", error });
      });
    });
    return this.opening;
  }

  async send(message) {
    const ws = await this.connect();
    ws.send(JSON.stringify(message));
  }

  receive(raw) {
    let message;
    try { message = JSON.parse(raw); } catch (e) { return; }
    if (message.type === "check_route") { this.answerCheck(message); return; }
    const handler = this.inbox.get(message.id);
    if (handler) handler(message);
  }

  // The route's box key, once its signature by the miner checks; throws otherwise.
  static async routeKey(route) {
    const sodium = await loadSodium();
    const boxKey = sodium.from_hex(route.box_key);
    const ok = sodium.crypto_sign_verify_detached(
      sodium.from_hex(route.box_signature),
      concatBytes(sodium.from_string(BOX_KEY_DOMAIN), boxKey),
      sodium.from_hex(route.miner));
    if (!ok) {
      throw new SealedError(502, `The route's box key is not signed by miner ${route.miner.slice(0, 16)}: `
        + "refusing to seal to it. The coordinator may be trying to read this request.",
      "route_signature_invalid");
    }
    return boxKey;
  }

  // Seal content to a box key: [base64(ephemeral public key ‖ nonce ‖ box), session key].
  static async seal(boxKey, content) {
    const sodium = await loadSodium();
    const eph = sodium.crypto_box_keypair();
    const nonce = sodium.randombytes_buf(sodium.crypto_box_NONCEBYTES);
    const box = sodium.crypto_box_easy(sodium.from_string(JSON.stringify(content)), nonce,
                                       boxKey, eph.privateKey);
    const sealed = concatBytes(concatBytes(eph.publicKey, nonce), box);
    return [sodium.to_base64(sealed, sodium.base64_variants.ORIGINAL),
            sodium.crypto_box_beforenm(boxKey, eph.privateKey)];
  }

  // {t: text, i: token ids} of a sealed delta; throws if it does not open.
  static async open(sessionKey, sealed) {
    const sodium = await loadSodium();
    try {
      const raw = sodium.from_base64(sealed, sodium.base64_variants.ORIGINAL);
      const nonce = raw.subarray(0, sodium.crypto_secretbox_NONCEBYTES);
      const plain = sodium.crypto_secretbox_open_easy(
        raw.subarray(sodium.crypto_secretbox_NONCEBYTES), nonce, sessionKey);
      return JSON.parse(sodium.to_string(plain));
    } catch (e) {
      throw new SealedError(502, "A sealed delta does not open under this request's key: the "
        + "answer was altered on its way.", "invalid_ciphertext");
    }
  }

  // A validator was picked to re-check a finished answer: seal it the session key (after
  // checking the validator's key is its own), or decline.
  async answerCheck(route) {
    const now = Date.now();
    for (const [id, entry] of this.sessionKeys) if (entry.until < now) this.sessionKeys.delete(id);
    const entry = this.sessionKeys.get(route.id);
    this.sessionKeys.delete(route.id);
    let sealedKey = null;
    if (entry) {
      try {
        const sodium = await loadSodium();
        const boxKey = await SealedChannel.routeKey(route);
        sealedKey = sodium.to_base64(sodium.crypto_box_seal(entry.key, boxKey),
                                     sodium.base64_variants.ORIGINAL);
      } catch (e) { sealedKey = null; }
    }
    this.send({ type: "check_key", id: route.id, sealed_key: sealedKey }).catch(() => {});
  }

  // Run one chat request sealed. job: {model, messages, params: {max_tokens, temperature,
  // top_p}}; on: {route(route), started(promptTokens), delta(text, tokens)}; signal: an
  // AbortSignal (Stop). Resolves with the coordinator's done message ({finish_reason,
  // prompt_tokens, completion_tokens}) plus job_id and miner; rejects with a SealedError.
  chat(job, on = {}, signal = null) {
    const id = `w${this.next++}`;
    const content = { messages: job.messages };
    const size = new TextEncoder().encode(JSON.stringify(content)).length;
    const state = { key: null, tokenIds: [], chars: 0, jobId: "", miner: "" };
    let chain = Promise.resolve();  // handle messages one at a time, in order
    return new Promise((resolve, reject) => {
      const finish = (fn, value) => {
        this.inbox.delete(id);
        if (signal) signal.removeEventListener("abort", abort);
        fn(value);
      };
      // Stop: the coordinator cancels the task (the miner stops, the escrow settles what
      // was sent) and answers done ("cancelled") with the tokens it bills; text sent before
      // the cancel arrived still comes, and shows: it is paid for.
      const abort = () => {
        this.send({ type: "cancel", id }).catch(() => {});
        setTimeout(() => {
          if (this.inbox.get(id) === handler) finish(resolve, { ...usageOf(state), finish_reason: "cancelled" });
        }, 3000);
      };
      const usageOf = (s) => ({ prompt_tokens: s.promptTokens || 0, completion_tokens: s.tokenIds.length,
                                job_id: s.jobId, miner: s.miner });
      const handle = async (m) => {
        if (m.type === "route") {
          const boxKey = await SealedChannel.routeKey(m);
          const body = state.tokenIds.length
            ? { ...content, resume: { token_ids: state.tokenIds, text_chars: state.chars } } : content;
          const [sealed, key] = await SealedChannel.seal(boxKey, body);
          state.key = key; state.jobId = m.job_id; state.miner = m.miner;
          if (on.route) on.route(m);
          await this.send({ type: "job", id, sealed });
        } else if (m.type === "started") {
          state.promptTokens = state.promptTokens || m.prompt_tokens;
          if (on.started) on.started(m.prompt_tokens);
        } else if (m.type === "delta") {
          const { t, i } = await SealedChannel.open(state.key, m.sealed);
          if (i.length !== m.tokens) {
            throw new SealedError(502, "A sealed delta holds another number of tokens than the "
              + "miner declared for billing.", "invalid_ciphertext");
          }
          state.tokenIds.push(...i);
          state.chars += [...t].length;  // code points, as the miner counts them
          if (on.delta && t) on.delta(t, i.length);
        } else if (m.type === "done") {
          if (job.check !== false && state.key) {
            this.sessionKeys.set(id, { key: state.key, until: Date.now() + SESSION_KEY_TTL_MS });
          }
          finish(resolve, { ...m, job_id: state.jobId, miner: state.miner });
        } else if (m.type === "error") {
          finish(reject, new SealedError(m.status, m.error.message, m.error.code));
        } else if (m.type === "lost") {
          finish(reject, m.error);
        }
      };
      const handler = (m) => {
        chain = chain.then(() => handle(m)).catch((e) => {
          this.send({ type: "cancel", id }).catch(() => {});
          finish(reject, e);
        });
      };
      this.inbox.set(id, handler);
      if (signal) {
        if (signal.aborted) { finish(resolve, { ...usageOf(state), finish_reason: "cancelled" }); return; }
        signal.addEventListener("abort", abort);
      }
      const params = { max_tokens: job.params.max_tokens, temperature: job.params.temperature,
                       top_p: job.params.top_p };
      this.send({ type: "request", id, model: job.model, params, size: Math.max(size, 1),
                  chat: true, check: job.check !== false })
        .catch((e) => finish(reject, e));
    });
  }
}

let sealedChannel = null;

// The page's sealed channel for the current API key (a new one after the key changes).
function sealedChannelFor(key) {
  if (!sealedChannel || sealedChannel.key !== key) {
    if (sealedChannel && sealedChannel.ws) sealedChannel.ws.close();
    sealedChannel = new SealedChannel(key);
  }
  return sealedChannel;
}
