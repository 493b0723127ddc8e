// The chords-mq playground: POST /v1/images/generations with stream: true, read the server-sent
// events from fetch's body as they come (EventSource cannot POST), one tile per core's hit, and
// the request's CHORDS schedule (GET /v1/schedule) drawn beside them. No framework, no build.
"use strict";

// matplotlib's tab10, as chords_mq.media's plot_schedule colours the cores
const CORE_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
  "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
const SVG_NS = "http://www.w3.org/2000/svg";

const $ = (id) => document.getElementById(id);
let running = null; // the AbortController of the request in flight
let schedule = null; // the last /v1/schedule answer drawn

function colourOf(core) {
  return core === 0 ? "#1b1f24" : CORE_COLOURS[(core - 1) % CORE_COLOURS.length];
}

function headers(json) {
  const result = {};
  if (json) result["Content-Type"] = "application/json";
  const key = $("api-key").value.trim();
  if (key) result["Authorization"] = "Bearer " + key;
  return result;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function setStatus(text) {
  $("status").textContent = text;
}

// The message of an OpenAI-shaped error answer ({"error": {"message", "param", ...}}).
async function errorOf(response) {
  let detail = response.statusText || "";
  try {
    const body = await response.json();
    if (body && body.error) {
      detail = body.error.message + (body.error.param ? " (parameter: " + body.error.param + ")" : "");
    }
  } catch (_) { /* not JSON: keep the status text */ }
  return "HTTP " + response.status + ": " + detail;
}

async function loadModels() {
  const select = $("model");
  const previous = select.value;
  try {
    const response = await fetch("/v1/models", { headers: headers(false) });
    if (!response.ok) {
      showError("models: " + await errorOf(response));
      return;
    }
    const answer = await response.json();
    const names = answer.data.map((model) => model.id);
    select.replaceChildren(...names.map((name) => new Option(name, name)));
    if (names.includes(previous)) select.value = previous;
    else if (names.includes("digits")) select.value = "digits";
    if (!names.length) showError("no model is served: no worker is connected to the broker");
    else if ($("error").textContent.startsWith("models:")) showError("");
  } catch (error) {
    showError("models: the gateway cannot be reached (" + error.message + ")");
  }
}

// -- the schedule --------------------------------------------------------------------------------

function svg(name, attributes, parent) {
  const node = document.createElementNS(SVG_NS, name);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  if (parent) parent.appendChild(node);
  return node;
}

function tickStep(span) {
  for (const step of [1, 2, 5, 10, 20, 50, 100, 200]) if (span / step <= 10) return step;
  return 500;
}

function drawSchedule(plan) {
  schedule = plan;
  const width = 560, height = 400, left = 42, right = 72, top = 30, bottom = 34;
  const plotW = width - left - right, plotH = height - top - bottom;
  const rounds = plan.rounds, steps = plan.steps;
  const x = (round) => left + (round / rounds) * plotW;
  const y = (step) => top + ((steps - step) / steps) * plotH;
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": `CHORDS schedule, N=${steps}, K=${plan.cores}` });
  svg("line", { x1: x(0), y1: y(0), x2: x(rounds), y2: y(0), stroke: "#333" }, root);
  svg("line", { x1: x(0), y1: y(0), x2: x(0), y2: y(steps), stroke: "#333" }, root);
  for (let r = 0; r <= rounds; r += tickStep(rounds)) {
    svg("line", { x1: x(r), y1: y(0), x2: x(r), y2: y(0) + 4, stroke: "#333" }, root);
    svg("text", { x: x(r), y: y(0) + 16, "text-anchor": "middle" }, root).textContent = r;
  }
  for (let s = 0; s <= steps; s += tickStep(steps)) {
    svg("line", { x1: x(0) - 4, y1: y(s), x2: x(0), y2: y(s), stroke: "#333" }, root);
    svg("text", { x: x(0) - 7, y: y(s) + 4, "text-anchor": "end" }, root).textContent = s;
  }
  svg("text", { x: x(rounds / 2), y: height - 4, "text-anchor": "middle" }, root).textContent = "round";
  svg("text", { x: x(0), y: top - 16, "text-anchor": "middle" }, root).textContent = "step";
  svg("line", { x1: x(0), y1: y(steps), x2: x(rounds), y2: y(steps), stroke: "#ccc",
    "stroke-dasharray": "3 3" }, root);
  for (const lane of plan.lanes) {
    const evals = lane.evaluations;
    if (!evals.length) continue;
    // the task of round r evaluates step s; its result is step s + 1 once round r is over
    const points = evals.map(([r, s]) => `${x(r - 1)},${y(s)}`);
    const [lastR, lastS] = evals[evals.length - 1];
    points.push(`${x(lastR)},${y(lastS + 1)}`);
    svg("polyline", { points: points.join(" "), fill: "none", stroke: colourOf(lane.core),
      "stroke-width": 2, class: "lane", "data-core": lane.core }, root);
    const label = svg("text", { x: width - right + 8, y: top + 14 * lane.core + 4,
      fill: colourOf(lane.core) }, root);
    label.textContent = `core ${lane.core}`;
    label.style.fill = colourOf(lane.core);
  }
  for (const rect of plan.rectifications) {
    svg("circle", { cx: x(rect.round), cy: y(rect.target), r: 2.5, fill: "none",
      stroke: "#555", "stroke-width": 0.8 }, root);
  }
  for (const hit of plan.hits) {
    svg("rect", { x: x(hit.round) - 4, y: y(steps) - 4, width: 8, height: 8,
      fill: "#fff", stroke: colourOf(hit.core), "stroke-width": 2,
      class: "hit-mark", "data-core": hit.core }, root);
  }
  $("schedule").replaceChildren(root);
  $("schedule-caption").textContent =
    `N=${steps}, K=${plan.cores}, init ${JSON.stringify(plan.init_sequence)}`;
}

function markLanded(core) {
  const mark = document.querySelector(`#schedule rect.hit-mark[data-core="${core}"]`);
  if (mark) mark.setAttribute("fill", colourOf(core));
}

async function loadSchedule(steps, cores) {
  const query = new URLSearchParams({ steps: String(steps), cores: String(cores) });
  const response = await fetch("/v1/schedule?" + query, { headers: headers(false) });
  if (!response.ok) throw new Error("schedule: " + await errorOf(response));
  drawSchedule(await response.json());
}

// -- the hits ------------------------------------------------------------------------------------

function tileFor(core) {
  return document.querySelector(`#tiles .hit[data-core="${core}"]`);
}

function addTile(data, started, returned) {
  let tile = tileFor(data.core);
  if (!tile) {
    tile = document.createElement("figure");
    tile.className = "hit";
    tile.dataset.core = data.core;
    tile.dataset.round = data.round;
    tile.style.setProperty("--core-colour", colourOf(data.core));
    const image = document.createElement("img");
    image.alt = `core ${data.core}'s hit`;
    image.src = "data:image/png;base64," + data.b64_json;
    const label = document.createElement("figcaption");
    label.className = "label";
    const name = data.core === 0 ? "core 0 (zero-th)" : `core ${data.core}`;
    const seconds = ((performance.now() - started) / 1000).toFixed(2);
    label.innerHTML = `<strong></strong><br>round <span class="round"></span> · ` +
      `<span class="speedup"></span>×<br>landed at ${seconds} s`;
    label.querySelector("strong").textContent = name;
    label.querySelector(".round").textContent = data.round;
    label.querySelector(".speedup").textContent = Number(data.round_speedup).toFixed(2);
    tile.append(image, label);
    $("tiles").appendChild(tile);
    markLanded(data.core);
  }
  if (returned) {
    tile.classList.add("returned");
    tile.querySelector("strong").textContent += " · returned";
  }
}

// Server-sent events from a fetch body: blocks separated by a blank line, "event:" and "data:"
// lines ("\r\n" or "\n" line ends), ":" comments (pings) skipped.
async function* readEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let kind = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") kind = text;
        else if (field === "data") data.push(text);
      }
      if (data.length) yield { kind, data: JSON.parse(data.join("\n")) };
    }
  }
}

function readFields() {
  const number = (id, low, high) => {
    const value = Number($(id).value);
    if (!Number.isInteger(value) || value < low || value > high) {
      throw new Error(`${$(id).name} must be an integer in ${low}..${high}`);
    }
    return value;
  };
  const fields = {
    prompt: $("prompt").value,
    model: $("model").value,
    cores: number("cores", 1, 16),
    steps: number("steps", 1, 500),
  };
  if (!fields.model) throw new Error("choose a model (none is listed: is a worker connected?)");
  if (fields.cores > fields.steps) throw new Error("cores must be at most steps");
  if ($("seed").value !== "") fields.seed = number("seed", 0, Number.MAX_SAFE_INTEGER);
  return fields;
}

async function generate(event) {
  event.preventDefault();
  if (running) return;
  showError("");
  let fields;
  try {
    fields = readFields();
  } catch (error) {
    showError(error.message);
    return;
  }
  $("tiles").replaceChildren();
  running = new AbortController();
  $("generate").disabled = true;
  $("stop").disabled = false;
  const started = performance.now();
  const elapsed = () => ((performance.now() - started) / 1000).toFixed(2) + " s";
  setStatus("waiting for the first hit…");
  const drawn = loadSchedule(fields.steps, fields.cores).catch((error) => showError(error.message));
  let hits = 0, completed = false;
  try {
    const response = await fetch("/v1/images/generations", {
      method: "POST",
      headers: headers(true),
      body: JSON.stringify({ ...fields, stream: true, partial_images: fields.cores,
        response_format: "b64_json" }),
      signal: running.signal,
    });
    if (!response.ok) throw new Error(await errorOf(response));
    await drawn; // so a hit that lands at once still finds its mark on the schedule
    for await (const { kind, data } of readEvents(response.body)) {
      if (kind === "image_generation.partial_image") {
        hits += 1;
        addTile(data, started, false);
        setStatus(`${hits} hit${hits === 1 ? "" : "s"}, ${elapsed()}`);
      } else if (kind === "image_generation.completed") {
        completed = true;
        addTile(data, started, true);
        setStatus(`done: ${$("tiles").children.length} hits, returned core ${data.core}, ${elapsed()}`);
      } else if (kind === "error") {
        throw new Error(data.error ? data.error.message : JSON.stringify(data));
      }
    }
    if (!completed) throw new Error("the stream ended before the completed image");
  } catch (error) {
    if (error.name === "AbortError") setStatus(`stopped after ${elapsed()}`);
    else {
      showError(error.message);
      setStatus("");
    }
  } finally {
    running = null;
    $("generate").disabled = false;
    $("stop").disabled = true;
  }
}

function redrawSchedule() {
  const steps = Number($("steps").value), cores = Number($("cores").value);
  if (running || !Number.isInteger(steps) || !Number.isInteger(cores)) return;
  if (cores < 1 || cores > 16 || steps < 1 || steps > 500 || cores > steps) return;
  if (schedule && schedule.steps === steps && schedule.cores === cores) return;
  loadSchedule(steps, cores).catch(() => { /* e.g. no key yet: drawn on Generate */ });
}

document.addEventListener("DOMContentLoaded", () => {
  $("request").addEventListener("submit", generate);
  $("stop").addEventListener("click", () => running && running.abort());
  $("reload-models").addEventListener("click", loadModels);
  $("api-key").addEventListener("change", () => { loadModels(); redrawSchedule(); });
  $("cores").addEventListener("change", redrawSchedule);
  $("steps").addEventListener("change", redrawSchedule);
  loadModels().then(redrawSchedule);
});
