// The sfumato web page: a plain client of /api/jobs and the A1111 listing routes.
// Credentials, if the server wants them, come from the browser's own Basic-auth prompt.
"use strict";

const $ = (id) => document.getElementById(id);
let lastSeed = -1;
let currentJob = null;

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: { "Content-Type": "application/json", ...(options.headers || {}) },
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const detail = Array.isArray(body.detail)
      ? body.detail.map((d) => `${d.loc.slice(-1)[0]}: ${d.msg}`).join("\n")
      : body.detail || response.statusText;
    throw new Error(detail);
  }
  return body;
}

function fillSelect(select, values, chosen) {
  select.replaceChildren(...values.map((v) => new Option(v, v, false, v === chosen)));
}

async function loadChoices() {
  const [models, samplers, schedulers, options, loras] = await Promise.all([
    api("/sdapi/v1/sd-models"), api("/sdapi/v1/samplers"), api("/sdapi/v1/schedulers"),
    api("/sdapi/v1/options"), api("/sdapi/v1/loras"),
  ]);
  fillSelect($("model"), models.map((m) => m.title), options.sd_model_checkpoint);
  fillSelect($("sampler"), samplers.map((s) => s.name), "DPM++ 2M");
  fillSelect($("scheduler"), schedulers.map((s) => s.name).filter((n) => n !== "automatic"), "karras");
  $("loras").dataset.names = JSON.stringify(loras.map((l) => l.path));
  $("lora-add").disabled = loras.length === 0;
}

function addLoraRow(name, weight = 1) {
  const names = JSON.parse($("loras").dataset.names || "[]");
  const row = document.createElement("div");
  row.className = "lora-row";
  const select = document.createElement("select");
  fillSelect(select, names, name);
  const strength = Object.assign(document.createElement("input"),
    { type: "number", step: "0.05", value: weight, className: "lora-weight" });
  const remove = Object.assign(document.createElement("button"), { type: "button", textContent: "×" });
  remove.onclick = () => row.remove();
  row.append(select, strength, remove);
  $("loras").append(row);
}

function formParams() {
  const number = (id) => Number($(id).value);
  return {
    prompt: $("prompt").value, negative_prompt: $("negative").value, seed: number("seed"),
    steps: number("steps"), cfg_scale: number("cfg"), width: number("width"), height: number("height"),
    sampler: $("sampler").value, scheduler: $("scheduler").value, batch_size: number("batch"),
    model: $("model").value || null,
    loras: [...document.querySelectorAll(".lora-row")].map((row) => ({
      name: row.querySelector("select").value, weight: Number(row.querySelector("input").value),
    })),
  };
}

function useSettings(params, seed) {
  $("prompt").value = params.prompt;
  $("negative").value = params.negative_prompt;
  $("seed").value = seed ?? params.seed;
  $("steps").value = params.steps;
  $("cfg").value = params.cfg_scale;
  $("width").value = params.width;
  $("height").value = params.height;
  $("batch").value = params.batch_size;
  $("sampler").value = params.sampler;
  $("scheduler").value = params.scheduler;
  if (params.model) $("model").value = params.model;
  document.querySelectorAll(".lora-row").forEach((row) => row.remove());
  const names = JSON.parse($("loras").dataset.names || "[]");
  for (const [path, weight] of params.loras || []) {
    const name = names.find((n) => path.endsWith(n));
    if (name) addLoraRow(name, weight);
  }
}

function card(job, image) {
  const node = $("card").content.firstElementChild.cloneNode(true);
  node.querySelector("img").src = image.url;
  node.querySelector("img").alt = job.params.prompt;
  node.querySelector(".infotext").textContent = image.infotext;
  node.querySelector(".use-settings").onclick = () => useSettings(job.params, image.seed);
  const link = node.querySelector(".download");
  link.href = image.url;
  link.download = `${job.id}-${image.index}.png`;
  return node;
}

async function loadGallery() {
  const jobs = await api("/api/jobs?status=done&limit=30");
  $("gallery").replaceChildren(...jobs.flatMap((job) => job.images.map((image) => card(job, image))));
}

function showJob(job) {
  $("status").textContent = `job ${job.id}: ${job.status}`;
  if (job.status === "queued" || job.status === "running") return false;
  $("progress-box").hidden = true;
  $("generate").disabled = false;
  $("preview").hidden = true;
  currentJob = null;
  if (job.status === "failed") $("error").textContent = job.error;
  if (job.images.length) lastSeed = job.images[0].seed;
  $("results").replaceChildren(...job.images.map((image) => card(job, image)));
  loadGallery();
  return true;
}

function follow(jobId) {
  const events = new EventSource(`/api/jobs/${jobId}/events`);
  events.addEventListener("progress", (e) => {
    const data = JSON.parse(e.data);
    $("progress").value = data.progress;
    if (data.preview) {
      $("preview").src = data.preview;
      $("preview").hidden = false;
    }
  });
  events.addEventListener("status", (e) => {
    if (showJob(JSON.parse(e.data))) events.close();
  });
  events.onerror = () => { // the server went away: poll until it is back
    events.close();
    setTimeout(async () => {
      const job = await api(`/api/jobs/${jobId}`).catch(() => null);
      if (!job || !showJob(job)) follow(jobId);
    }, 1000);
  };
}

async function generate(event) {
  event.preventDefault();
  $("error").textContent = "";
  $("generate").disabled = true;
  try {
    const job = await api("/api/jobs", { method: "POST", body: JSON.stringify(formParams()) });
    currentJob = job.id;
    $("progress").value = 0;
    $("progress-box").hidden = false;
    follow(job.id);
  } catch (error) {
    $("error").textContent = error.message;
    $("generate").disabled = false;
  }
}

$("form").addEventListener("submit", generate);
$("dice").onclick = () => { $("seed").value = -1; };
$("reuse").onclick = () => { $("seed").value = lastSeed; };
$("lora-add").onclick = () => addLoraRow();
$("cancel").onclick = () => currentJob && api(`/api/jobs/${currentJob}/cancel`, { method: "POST" });

loadChoices().then(loadGallery).catch((error) => { $("error").textContent = error.message; });
