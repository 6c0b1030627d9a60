// verispec playground: one streamed request at a time against this server's OpenAI endpoints,
// with `provisional: true`, so each round shows its drafts before the verifier's verdict.
//
// Generated text only ever reaches the page through `textContent` (never as markup), and every
// request goes to this origin: the page's Content-Security-Policy allows nothing else.
"use strict";

const $ = (id) => document.getElementById(id);
const MIN_BAR_SCALE = 4; // a bar is full height at this many drafts, or at the most any round proposed

let info = null; // /playground/info: model, chat, proposers, default_proposer
let controller = null; // aborts the request under way

function headers() {
  const key = $("key").value.trim();
  const out = { "Content-Type": "application/json" };
  if (key) out.Authorization = "Bearer " + key;
  return out;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

// The API's own message, from an error response (OpenAI's {"error": {"message", "code"}}).
async function describeFailure(response) {
  let message = "";
  let code = null;
  try {
    const body = await response.json();
    message = (body.error && body.error.message) || JSON.stringify(body);
    code = body.error && body.error.code;
  } catch (_) {
    message = response.statusText || "no message";
  }
  let text = `Error ${response.status}${code ? ` (${code})` : ""}: ${message}`;
  const retry = response.headers.get("Retry-After");
  if (retry) text += ` — retry after ${retry} s`;
  return text;
}

async function loadInfo() {
  let response;
  try {
    response = await fetch("/playground/info", { headers: headers() });
  } catch (exc) {
    showError(`could not reach the server: ${exc.message}`);
    return false;
  }
  if (!response.ok) {
    $("model").textContent = response.status === 401 ? "enter an API key" : "not connected";
    showError(await describeFailure(response));
    return false;
  }
  info = await response.json();
  clearError();
  $("model").textContent = `model ${info.model}`;
  const chat = $("endpoint").querySelector('option[value="chat"]');
  chat.disabled = !info.chat;
  chat.textContent = info.chat ? "/v1/chat/completions" : "/v1/chat/completions (the model has no chat template)";
  if (!info.chat) $("endpoint").value = "completions";
  const proposer = $("proposer");
  const chosen = proposer.value;
  proposer.replaceChildren();
  const auto = document.createElement("option");
  auto.value = "";
  auto.textContent = info.default_proposer ? `default (${info.default_proposer})` : "server's choice";
  proposer.append(auto);
  for (const name of info.proposers) {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = name;
    proposer.append(option);
  }
  if (info.proposers.includes(chosen)) proposer.value = chosen;
  return true;
}

// The request body from the controls; throws Error with a message for the user.
function requestBody() {
  const number = (id) => {
    const value = $(id).value.trim();
    return value === "" ? undefined : Number(value);
  };
  const body = {
    model: info.model,
    max_tokens: number("max-tokens"),
    temperature: number("temperature"),
    top_p: number("top-p"),
    seed: number("seed"),
    depth: $("depth").value === "auto" ? "auto" : Number($("depth").value),
    proposer: $("proposer").value || undefined,
    stream: true,
    provisional: true,
    speculation_stats: true,
    stream_options: { include_usage: true },
  };
  const prompt = $("prompt").value;
  if ($("endpoint").value === "chat") body.messages = [{ role: "user", content: prompt }];
  else body.prompt = prompt;
  const extra = $("extra").value.trim();
  if (extra) {
    let fields;
    try {
      fields = JSON.parse(extra);
    } catch (exc) {
      throw new Error(`More request fields: not valid JSON (${exc.message})`);
    }
    if (fields === null || typeof fields !== "object" || Array.isArray(fields)) {
      throw new Error("More request fields: give a JSON object, e.g. {\"stop\": [\"\\n\\n\"]}");
    }
    Object.assign(body, fields);
  }
  return body;
}

// Server-sent events from a fetch response: {name, data}, `name` "message" for unnamed events.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) yield { name, data: data.join("\n") };
    }
  }
}

function span(kind, text, round) {
  const node = document.createElement("span");
  node.className = kind;
  node.textContent = text; // generated text is never parsed as markup
  if (round !== undefined) node.dataset.round = String(round);
  return node;
}

function commonPrefix(a, b) {
  let i = 0;
  while (i < a.length && i < b.length && a[i] === b[i]) i++;
  return i;
}

// One streamed answer: the output pane, the round strip and the figures.
class Run {
  constructor(chat, prompt) {
    this.chat = chat;
    this.output = $("answer");
    this.pane = $("output");
    this.strip = $("rounds");
    this.draft = null; // the span of the current round's drafts
    this.verdict = null; // the current round's verdict, until its verified text arrives
    this.bars = new Map(); // round -> [its element, proposed, accepted or null]
    this.scale = MIN_BAR_SCALE;
    this.rounds = 0;
    this.proposed = 0;
    this.accepted = 0;
    this.tokens = 0; // estimated from verdicts (accepted drafts + the verifier's token) until usage says
    this.started = performance.now();
    this.stats = null;
    this.finish = null;
    $("echo").textContent = chat ? "" : prompt; // completions continue the prompt: show where from
    this.output.replaceChildren();
    this.strip.replaceChildren();
    for (const id of ["f-tokens", "f-rate", "f-acceptance", "f-per-call", "f-proposer", "f-finish"]) $(id).textContent = "–";
    $("f-proposer").textContent = $("proposer").value || "…";
  }

  provisional(event) {
    this.dropDraft();
    this.draft = span("draft", event.text, event.round);
    this.output.append(this.draft);
    this.bar(event.round, event.token_ids.length, null);
    this.scroll();
  }

  verdictOf(event) {
    this.verdict = event;
    this.rounds += 1;
    this.proposed += event.proposed;
    this.accepted += event.accepted;
    this.tokens += event.accepted + 1;
    this.bar(event.round, event.proposed, event.accepted);
    if (event.accepted === 0) this.dropDraft(); // rejected whole: it vanishes
    this.figures();
  }

  chunk(body) {
    if (body.error) {
      this.dropDraft();
      throw new Error(`Error: ${body.error.message}`);
    }
    if (body.usage) this.tokens = body.usage.completion_tokens;
    if (body.speculation_stats) this.stats = body.speculation_stats;
    for (const choice of body.choices || []) {
      const text = this.chat ? (choice.delta && choice.delta.content) || "" : choice.text || "";
      if (text) this.verified(text);
      if (choice.finish_reason) this.finish = choice.finish_reason;
    }
    this.figures();
  }

  // Verified text: the part the round's drafts had right turns solid, the rest is the verifier's.
  verified(text) {
    const round = this.verdict ? this.verdict.round : undefined;
    let kept = 0;
    if (this.draft && this.verdict && this.verdict.accepted > 0) {
      kept = commonPrefix(this.draft.textContent, text);
    }
    const parts = [];
    if (kept) parts.push(span("accepted", text.slice(0, kept), round));
    if (kept < text.length) parts.push(span("verifier", text.slice(kept), round));
    this.output.append(...parts);
    this.dropDraft();
    this.verdict = null;
    this.scroll();
  }

  dropDraft() {
    if (this.draft) this.draft.remove();
    this.draft = null;
  }

  // The round's bar: drafts proposed (light), of them accepted (dark), and "accepted/proposed".
  bar(round, proposed, accepted) {
    let entry = this.bars.get(round);
    if (!entry) {
      const node = document.createElement("div");
      const bar = document.createElement("div");
      bar.className = "bar";
      for (const kind of ["proposed", "kept"]) {
        const part = document.createElement("div");
        part.className = kind;
        bar.append(part);
      }
      const count = document.createElement("div");
      count.className = "count";
      node.append(bar, count);
      this.strip.append(node);
      entry = [node, 0, null];
      this.bars.set(round, entry);
    }
    entry[1] = proposed;
    entry[2] = accepted;
    const node = entry[0];
    node.className = "round" + (accepted === null ? " pending" : proposed === 0 ? " verifier-only" : "");
    node.dataset.proposed = String(proposed);
    if (accepted !== null) node.dataset.accepted = String(accepted);
    node.title = accepted === null
      ? `round ${round + 1}: ${proposed} proposed, awaiting the verdict`
      : `round ${round + 1}: ${proposed} proposed, ${accepted} accepted`;
    node.lastChild.textContent = accepted === null ? `?/${proposed}` : `${accepted}/${proposed}`;
    if (proposed > this.scale) {
      this.scale = proposed;
      for (const other of this.bars.values()) this.draw(other);
    } else {
      this.draw(entry);
    }
    this.strip.scrollLeft = this.strip.scrollWidth;
  }

  draw([node, proposed, accepted]) {
    const bar = node.firstChild;
    const height = (n) => `${(100 * n) / this.scale}%`;
    // CSSOM, which the policy allows (no style attributes); a verifier-only round gets a thin mark
    bar.firstChild.style.height = proposed ? height(proposed) : "2px";
    bar.lastChild.style.height = height(accepted || 0);
  }

  figures() {
    const seconds = (performance.now() - this.started) / 1000;
    const stats = this.stats;
    const acceptance = stats ? stats.acceptance_rate : this.proposed ? this.accepted / this.proposed : null;
    const perCall = stats ? stats.tokens_per_verifier_call : this.rounds ? this.tokens / this.rounds : null;
    $("f-tokens").textContent = String(this.tokens);
    $("f-rate").textContent = seconds > 0 ? (this.tokens / seconds).toFixed(1) : "–";
    $("f-acceptance").textContent = acceptance === null || acceptance === undefined ? "–" : `${(100 * acceptance).toFixed(0)}%`;
    $("f-per-call").textContent = perCall ? perCall.toFixed(2) : "–";
    if (stats) $("f-proposer").textContent = stats.proposer || "none (verifier only)";
    if (this.finish) $("f-finish").textContent = this.finish;
  }

  scroll() {
    this.pane.scrollTop = this.pane.scrollHeight;
  }
}

// One request, start to end; `body[data-state]` says "running", then "done" however it ended.
async function generate() {
  if (controller) return; // one request at a time
  controller = new AbortController();
  $("generate").disabled = true;
  $("stop").disabled = false;
  document.body.dataset.state = "running";
  clearError();
  try {
    await stream(controller.signal);
  } finally {
    controller = null;
    $("generate").disabled = false;
    $("stop").disabled = true;
    document.body.dataset.state = "done";
  }
}

async function stream(signal) {
  if (!info && !(await loadInfo())) return;
  let body;
  try {
    body = requestBody();
  } catch (exc) {
    showError(exc.message);
    return;
  }
  const chat = "messages" in body;
  const run = new Run(chat, $("prompt").value);
  try {
    const response = await fetch(chat ? "/v1/chat/completions" : "/v1/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(body),
      signal,
    });
    if (!response.ok) {
      showError(await describeFailure(response));
      return;
    }
    for await (const { name, data } of events(response)) {
      if (name === "provisional") run.provisional(JSON.parse(data));
      else if (name === "verdict") run.verdictOf(JSON.parse(data));
      else if (data === "[DONE]") break;
      else run.chunk(JSON.parse(data));
    }
    if (run.finish === "content_filter") {
      showError("The server's policy gate stopped this answer (finish_reason: content_filter).");
    }
  } catch (exc) {
    if (exc.name === "AbortError") showError("Stopped.");
    else showError(exc.message.startsWith("Error") ? exc.message : `The request failed: ${exc.message}`);
  } finally {
    run.dropDraft();
    run.figures();
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("generate").addEventListener("click", generate);
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) generate();
  });
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("key").addEventListener("change", () => {
    info = null;
    loadInfo();
  });
  loadInfo();
});
