// The playgrounds of the media models (loaded after app.js, whose helpers it uses):
// transcribe an upload or a recording, read text aloud, make images.
"use strict";

// ---- shared by the media playgrounds ----

const NO_KEY = "Get a test account or paste an API key first.";

// The message of an error answer ({"error": {"message", …}}), or the HTTP status.
async function errorOf(resp) {
  const body = await resp.json().catch(() => null);
  return body && body.error && body.error.message ? body.error.message
                                                  : `HTTP ${resp.status} ${resp.statusText}`;
}

function showError(el, message) {
  el.textContent = message || "";  // text, never HTML
  el.hidden = !message;
}

function networkMessage(e) {
  return e instanceof TypeError ? `coordinator unreachable or the answer broke off (${e.message})`
                                : e.message;
}

// Fill a <select> with values, keeping the chosen one when it is still offered.
function fillSelect(sel, values) {
  const keep = sel.value;
  sel.replaceChildren(...values.map((v) => new Option(v, v)));
  if (values.includes(keep)) sel.value = keep;
}

// Ctrl/Cmd+Enter in a textarea submits its form.
function submitOnCtrlEnter(area) {
  area.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); area.form.requestSubmit(); }
  });
}

// ---- transcription: upload or record, watch the transcript stream in ----

let recorded = null;     // {blob, name} of the last recording, used instead of the file input
let recorder = null;     // the running MediaRecorder
let previewUrl = null;

function openTranscribe(model) {
  select(model);
  $("transcribe-model").textContent = model;
  showPane("transcribe-pane");
  $("transcript").replaceChildren();
  $("transcript").className = "output";
  delete $("transcript").dataset.done;
  $("transcribe-usage").textContent = "";
}

function preview(blob) {
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = blob ? URL.createObjectURL(blob) : null;
  const audio = $("audio-preview");
  if (previewUrl) audio.src = previewUrl; else audio.removeAttribute("src");
  audio.hidden = !previewUrl;
}

// Decode any recording the browser can play and write it as 16-bit mono WAV at `rate` Hz:
// every server reads WAV, and its length is in the header.
async function toWav(blob, rate = 16000) {
  const decoded = await new OfflineAudioContext(1, 1, rate).decodeAudioData(await blob.arrayBuffer());
  const n = decoded.length;
  const mono = new Float32Array(n);
  for (let c = 0; c < decoded.numberOfChannels; c++) {
    const ch = decoded.getChannelData(c);
    for (let i = 0; i < n; i++) mono[i] += ch[i] / decoded.numberOfChannels;
  }
  const view = new DataView(new ArrayBuffer(44 + 2 * n));
  const text = (at, s) => { for (let i = 0; i < s.length; i++) view.setUint8(at + i, s.charCodeAt(i)); };
  text(0, "RIFF"); view.setUint32(4, 36 + 2 * n, true); text(8, "WAVE");
  text(12, "fmt "); view.setUint32(16, 16, true); view.setUint16(20, 1, true);
  view.setUint16(22, 1, true); view.setUint32(24, decoded.sampleRate, true);
  view.setUint32(28, 2 * decoded.sampleRate, true); view.setUint16(32, 2, true);
  view.setUint16(34, 16, true); text(36, "data"); view.setUint32(40, 2 * n, true);
  for (let i = 0; i < n; i++) {
    const x = Math.max(-1, Math.min(1, mono[i]));
    view.setInt16(44 + 2 * i, x < 0 ? x * 0x8000 : x * 0x7fff, true);
  }
  return { blob: new Blob([view], { type: "audio/wav" }), seconds: n / decoded.sampleRate };
}

async function toggleRecording() {
  const button = $("record");
  const status = $("record-status");
  if (recorder) { recorder.stop(); return; }
  if (!navigator.mediaDevices || !window.MediaRecorder) {
    status.textContent = "This browser cannot record here (the page needs HTTPS or localhost).";
    return;
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (e) {
    status.textContent = `No microphone: ${e.message}`;
    return;
  }
  const chunks = [];
  const rec = new MediaRecorder(stream);
  const started = Date.now();
  const tick = setInterval(() => {
    status.textContent = `recording… ${Math.round((Date.now() - started) / 1000)} s`;
  }, 500);
  rec.ondataavailable = (e) => { if (e.data.size) chunks.push(e.data); };
  rec.onstop = async () => {
    clearInterval(tick);
    for (const t of stream.getTracks()) t.stop();
    recorder = null;
    button.textContent = "Record from microphone";
    button.setAttribute("aria-pressed", "false");
    const raw = new Blob(chunks, { type: rec.mimeType });
    try {
      const wav = await toWav(raw);
      recorded = { blob: wav.blob, name: "recording.wav" };
      status.textContent = `recorded ${wav.seconds.toFixed(1)} s`;
    } catch (e) {  // not decodable here: send what was recorded
      const ext = (rec.mimeType.split(";")[0].split("/")[1] || "webm");
      recorded = { blob: raw, name: `recording.${ext}` };
      status.textContent = `recorded ${((Date.now() - started) / 1000).toFixed(1)} s`;
    }
    $("audio-file").value = "";
    preview(recorded.blob);
    $("transcribe-form").requestSubmit();
  };
  recorder = rec;
  rec.start();
  button.textContent = "Stop recording";
  button.setAttribute("aria-pressed", "true");
  status.textContent = "recording…";
}

async function transcribe(ev) {
  ev.preventDefault();
  const out = $("transcript");
  const usage = $("transcribe-usage");
  out.className = "output";
  delete out.dataset.done;
  usage.textContent = "";
  const file = $("audio-file").files[0];
  const audio = recorded || (file && { blob: file, name: file.name });
  const fail = (message) => { out.className = "output error"; out.textContent = message; out.dataset.done = "true"; };
  if (!audio) { fail("Choose an audio file or record one first."); return; }
  if (!apiKey()) { fail(NO_KEY); return; }
  const form = new FormData();
  form.append("file", audio.blob, audio.name);
  form.append("model", current);
  form.append("stream", "true");
  $("transcribe").disabled = true;
  out.textContent = "";
  out.classList.add("pending");
  let text = "";
  try {
    const resp = await fetch("/v1/audio/transcriptions", { method: "POST", headers: authHeaders(), body: form });
    if (!resp.ok) throw new Error(await errorOf(resp));
    await readSSE(resp, (data) => {
      if (data === "[DONE]") return;
      const event = JSON.parse(data);
      if (event.error) throw new Error(event.error.message);
      if (event.type === "transcript.text.delta") {
        text += event.delta;
        out.textContent = text.trimStart();
      } else if (event.type === "transcript.text.done") {
        out.textContent = event.text;
        if (!event.text) { out.classList.add("muted"); out.textContent = "(no speech heard)"; }
        if (event.usage) usage.textContent = `${event.usage.seconds} second${event.usage.seconds === 1 ? "" : "s"} billed`;
      }
    });
    out.classList.remove("pending");
    out.dataset.done = "true";
  } catch (e) {
    fail(networkMessage(e));
  } finally {
    $("transcribe").disabled = false;
    showAccount();
  }
}

// ---- speech: text in, audio out ----

let speechUrl = null;

function openSpeech(model) {
  select(model);
  $("speech-model").textContent = model;
  fillSelect($("voice"), (models[model] && models[model].voices) || []);
  showPane("speech-pane");
  showError($("speech-error"), "");
  $("speech-usage").textContent = "";
}

async function speak(ev) {
  ev.preventDefault();
  const err = $("speech-error");
  showError(err, "");
  const input = $("speech-input").value;
  if (!input.trim()) return;
  if (!apiKey()) { showError(err, NO_KEY); return; }
  const fmt = $("speech-format").value;
  $("speak").disabled = true;
  $("speech-usage").textContent = "synthesizing…";
  try {
    const resp = await fetch("/v1/audio/speech", {
      method: "POST",
      headers: { ...authHeaders(), "Content-Type": "application/json" },
      body: JSON.stringify({ model: current, input, voice: $("voice").value,
                             response_format: fmt, speed: Number($("speed").value) }),
    });
    if (!resp.ok) throw new Error(await errorOf(resp));
    const blob = await resp.blob();  // the whole file; a stream that breaks off rejects
    if (speechUrl) URL.revokeObjectURL(speechUrl);
    speechUrl = URL.createObjectURL(blob);
    const audio = $("speech-audio");
    audio.src = speechUrl;
    $("speech-download").href = speechUrl;
    $("speech-download").download = `speech.${fmt}`;
    $("speech-result").hidden = false;
    const chars = [...input].length;  // code points, as the server counts
    $("speech-usage").textContent = `${chars} character${chars === 1 ? "" : "s"} billed`;
    audio.play().catch(() => {});  // a browser may refuse to play on its own
  } catch (e) {
    $("speech-usage").textContent = "";
    showError(err, networkMessage(e));
  } finally {
    $("speak").disabled = false;
    showAccount();
  }
}

// ---- images: prompt in, pictures out ----

function openImage(model) {
  select(model);
  $("image-model").textContent = model;
  fillSelect($("image-size"), (models[model] && models[model].sizes) || []);
  showPane("image-pane");
  showError($("image-error"), "");
}

async function paint(ev) {
  ev.preventDefault();
  const err = $("image-error");
  showError(err, "");
  const prompt = $("image-prompt").value.trim();
  if (!prompt) return;
  if (!apiKey()) { showError(err, NO_KEY); return; }
  const request = { model: current, prompt, n: Number($("image-n").value) || 1, size: $("image-size").value };
  const seed = $("image-seed").value.trim();
  if (seed !== "") request.seed = Number(seed);
  $("paint").disabled = true;
  $("image-status").textContent = `generating ${request.n} image${request.n === 1 ? "" : "s"}…`;
  const started = performance.now();
  try {
    const resp = await fetch("/v1/images/generations", {
      method: "POST",
      headers: { ...authHeaders(), "Content-Type": "application/json" },
      body: JSON.stringify(request),
    });
    if (!resp.ok) throw new Error(await errorOf(resp));
    const body = await resp.json();
    const [width] = String(body.size).split("x").map(Number);
    const figures = body.data.map((d, i) => {
      const fig = document.createElement("figure");
      const img = document.createElement("img");
      img.src = `data:image/png;base64,${d.b64_json}`;
      img.alt = `${prompt} (seed ${body.seed + i})`;
      // Small images are shown larger, pixel for pixel; none wider than the pane.
      if (width < 256) { img.style.width = `${256}px`; img.classList.add("pixelated"); }
      const cap = document.createElement("figcaption");
      const link = document.createElement("a");
      link.href = img.src;
      link.download = `covey-${body.seed + i}.png`;
      link.textContent = "Download";
      cap.append(`${body.size} · seed ${body.seed + i} · `, link);
      fig.append(img, cap);
      return fig;
    });
    $("images").replaceChildren(...figures);
    $("image-seed-used").textContent = `seed ${body.seed}`;
    $("image-seed-used").dataset.seed = body.seed;
    $("image-usage").textContent = `${body.usage.tiles} tile${body.usage.tiles === 1 ? "" : "s"} billed`;
    $("image-status").textContent = `${((performance.now() - started) / 1000).toFixed(1)} s`;
  } catch (e) {
    $("image-status").textContent = "";
    showError(err, networkMessage(e));
  } finally {
    $("paint").disabled = false;
    showAccount();
  }
}

$("transcribe-form").addEventListener("submit", transcribe);
$("record").addEventListener("click", toggleRecording);
$("audio-file").addEventListener("change", () => {
  recorded = null;
  $("record-status").textContent = "";
  preview($("audio-file").files[0] || null);
});
$("speech-form").addEventListener("submit", speak);
$("speed").addEventListener("input", () => {
  $("speed-value").textContent = `${Number($("speed").value).toFixed(2)}×`;
});
$("image-form").addEventListener("submit", paint);
submitOnCtrlEnter($("speech-input"));
submitOnCtrlEnter($("image-prompt"));

// ---- embeddings: compare two sentences ----

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
  if (!apiKey()) { out.textContent = NO_KEY; return; }
  $("compare").disabled = true;
  out.textContent = "…";
  try {
    const body = await api("/v1/embeddings", {
      body: { model: current, input: [$("sentence-a").value, $("sentence-b").value] } });
    const sim = cosine(body.data[0].embedding, body.data[1].embedding);
    out.dataset.value = sim.toFixed(4);
    out.textContent = `cosine similarity: ${sim.toFixed(3)}`;
    $("compare-usage").textContent = `${body.usage.prompt_tokens} input tokens`;
    showAccount();
  } catch (e) {
    out.className = "error";
    out.textContent = failureText(e);
  } finally {
    $("compare").disabled = false;
  }
}

$("compare-form").addEventListener("submit", compare);
Object.assign(PLAYGROUNDS, { embedding: openCompare, transcription: openTranscribe,
                             speech: openSpeech, image: openImage });
