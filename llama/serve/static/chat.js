// The chat page: sends the conversation to this server's /v1/chat/completions with stream: true
// and shows the reply as its server-sent events arrive. Whatever the model or the user writes goes
// into the page as text (textContent), never as markup: a model's "<script>" shows as text.
"use strict";

const API = "v1";  // relative to the page, so that a proxy's path prefix is kept

const $ = (id) => document.getElementById(id);

let history = [];  // the conversation so far, {role, content}, without the system prompt
let running = null;  // the running request's AbortController, or null

function headers() {
  const key = $("api-key").value.trim();
  const h = {"Content-Type": "application/json"};
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  document.body.dataset.state = busy ? "busy" : "idle";
}

function addMessage(role, text) {
  const element = document.createElement("div");
  element.className = `message ${role}`;
  element.textContent = text;
  $("log").append(element);
  element.scrollIntoView({block: "end"});
  return element;
}

// What the form asks for: empty fields are left to the server's defaults.
function requestBody() {
  const messages = [];
  const system = $("system").value;
  if (system.trim()) messages.push({role: "system", content: system});
  messages.push(...history);
  const body = {messages, stream: true};
  const temperature = $("temperature").value.trim();
  if (temperature !== "") body.temperature = Number(temperature);
  const maxTokens = $("max-tokens").value.trim();
  if (maxTokens !== "") body.max_tokens = Number(maxTokens);
  const stops = $("stop-at").value.split("\n").filter((line) => line !== "");
  if (stops.length) body.stop = stops;
  return body;
}

// The server's own error message (OpenAI's {"error": {"message": ...}}), else the HTTP status.
async function errorText(response) {
  try {
    const body = await response.json();
    if (body.error && body.error.message) return `${response.status}: ${body.error.message}`;
  } catch (e) { /* not JSON */ }
  return `the server answered ${response.status} ${response.statusText}`;
}

// The JSON of each server-sent event of a response body, until "data: [DONE]". Events are split
// on blank lines, which may fall anywhere in the chunks the network delivers; a stream that ends
// without [DONE] was cut off.
async function* serverEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();  // {stream: true} keeps a character split across chunks whole
  let buffer = "";
  try {
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = event.split("\n").filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, "")).join("\n");
        if (data === "[DONE]") return;
        if (data) yield JSON.parse(data);
      }
    }
  } finally {
    reader.cancel().catch(() => {});  // done, stopped or failed: let go of the connection
  }
  throw new Error("the stream ended before its last event: the server stopped or the connection broke");
}

async function send(text) {
  const conversation = history;  // New chat replaces it: a stopped request then leaves the new one alone
  conversation.push({role: "user", content: text});
  const question = addMessage("user", text);
  const answer = addMessage("assistant", "");
  answer.classList.add("streaming");
  const controller = new AbortController();
  running = controller;
  setBusy(true);
  setStatus("");
  let reply = "";
  let finish = null;
  try {
    const response = await fetch(`${API}/chat/completions`, {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: controller.signal,
    }).catch((error) => {
      if (error.name === "AbortError") throw error;
      throw new Error(`could not reach the server (${error.message})`);
    });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const event of serverEvents(response.body)) {
      if (event.error) throw new Error(event.error.message);  // an error after the stream began
      const choice = event.choices && event.choices[0];
      if (!choice) continue;
      if (choice.delta && choice.delta.content) {
        reply += choice.delta.content;
        answer.textContent = reply;
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    conversation.push({role: "assistant", content: reply});
    answer.dataset.finish = finish || "stop";
    if (finish === "length") answer.dataset.note = "(cut at max tokens)";
  } catch (error) {
    if (conversation !== history) return;  // its chat was left (New chat)
    const stopped = error.name === "AbortError";
    if (stopped && reply) {  // what was shown stays in the conversation
      conversation.push({role: "assistant", content: reply});
      answer.dataset.finish = "stopped";
      answer.dataset.note = "(stopped)";
    } else {  // no answer: the question leaves the conversation and goes back to the message box
      conversation.pop();
      answer.remove();
      question.classList.add("failed");
      question.dataset.note = stopped ? "(stopped before the answer began)" : "(not answered)";
      if (!$("message").value) $("message").value = text;
    }
    setStatus(stopped ? "Stopped." : `Error: ${error.message}`, !stopped);
  } finally {
    answer.classList.remove("streaming");
    if (running === controller) {
      running = null;
      setBusy(false);
    }
  }
}

function stop() {
  if (running) running.abort();  // the server frees the request's slot when the connection closes
}

function newChat() {
  stop();
  running = null;
  history = [];
  $("log").replaceChildren();
  setStatus("");
  setBusy(false);
  $("message").focus();
}

// The served model's name, which also tells whether the API key is right.
async function showModel() {
  try {
    const response = await fetch(`${API}/models`, {headers: headers()});
    if (response.status === 401) {
      $("model").textContent = "";
      setStatus("This server needs an API key: enter it under Settings.", true);
      return;
    }
    if (!response.ok) throw new Error(await errorText(response));
    const models = await response.json();
    $("model").textContent = models.data.map((m) => m.id).join(", ");
    if ($("status").classList.contains("error")) setStatus("");
  } catch (error) {
    setStatus(`Error: could not read the served model: ${error.message}`, true);
  }
}

function submit(event) {
  event.preventDefault();
  const text = $("message").value;
  if (running || !text.trim()) return;
  $("message").value = "";
  send(text);
}

document.addEventListener("DOMContentLoaded", () => {
  $("composer").addEventListener("submit", submit);
  $("message").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) submit(event);
  });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newChat);
  $("api-key").addEventListener("change", showModel);
  setBusy(false);
  showModel();
  $("message").focus();
});
