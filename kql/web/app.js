// The KQL viewer's page: plain JavaScript, no build step, nothing fetched but this server's API.
"use strict";

const $ = (id) => document.getElementById(id);
const FIT_W = 480, FIT_H = 360;              // the largest size an image is drawn at
const CELL_HINT = "Click a cell of a map to see its value.";
const POLL_MS = 300;                          // how often a run's progress is asked for
const state = { picture: null, scale: 1, region: null, drag: null, token: "", header: "X-KQL-Token",
                volumes: {} };                // a volume's name -> its slices (depth)
const REGION_HINT = "Drag on the image to draw a region.";
const VOLUME_HINT = "A volume: the slider browses its slices; its map covers the whole volume.";

const isVolume = () => $("image").value in state.volumes;

// A picture the server draws: an image, or a volume's slice along its first axis.
function pictureOf(name, slice) {
  const query = slice === undefined ? "" : `?slice=${slice}`;
  return new Promise((resolve, reject) => {
    const picture = new Image();
    picture.onload = () => resolve(picture);
    picture.onerror = () => reject(new Error("cannot load this image"));
    picture.src = `/api/image/${encodeURIComponent(name)}.png${query}`;
  });
}

// -- talking to the server -------------------------------------------------------------------

// Every POST carries the server's token (GET /api/session): a page of another origin can
// neither read it nor send the header, so the server refuses its requests.
async function api(path, options) {
  options = Object.assign({}, options);
  if (options.method && options.method !== "GET") {
    options.headers = Object.assign({}, options.headers, { [state.header]: state.token });
  }
  const response = await fetch(path, options);
  const data = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) throw new Error(data.error || `HTTP ${response.status}`);
  return data;
}

function status(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function option(select, value, text) {
  const item = document.createElement("option");
  item.value = value;
  item.textContent = text;
  select.appendChild(item);
  return item;
}

async function loadLists() {
  const session = await api("/api/session");
  state.token = session.token;
  state.header = session.header;
  const models = (await api("/api/models")).models;
  for (const m of models) option($("model"), m.name, `${m.name} (${m.source})`);
  const lists = await api("/api/images");
  for (const im of lists.images) {
    if (im.depth) state.volumes[im.name] = im.depth;
    option($("image"), im.name, im.depth ? `${im.name} (volume ${im.depth}x${im.height}x${im.width})`
                                        : `${im.name} (${im.width}x${im.height})`);
  }
  for (const name of lists.samples) option($("image"), `sample:${name}`, `sample('${name}')`);
  if (!lists.images.length) $("image").value = "sample:chelsea";
  await loadPicture();
}

async function loadPicture(keepSlice) {
  state.region = null;
  showRegion();
  const name = $("image").value, depth = state.volumes[name];
  $("slice-row").hidden = !depth;
  $("hint").textContent = depth ? VOLUME_HINT : REGION_HINT;
  if (depth && keepSlice !== true) {
    $("slice").max = depth - 1;
    $("slice").value = Math.floor(depth / 2);
  }
  if (depth) $("slice-at").textContent = `${$("slice").value} of ${depth}`;
  try {
    state.picture = await pictureOf(name, depth ? Number($("slice").value) : undefined);
    drawSource();
  } catch (err) {
    status(err.message, true);
  }
}

async function upload() {
  const file = $("upload").files[0];
  if (!file) return;
  const form = new FormData();
  form.append("file", file);
  status(`uploading ${file.name} ...`);
  try {
    const data = await api("/api/upload", { method: "POST", body: form });
    option($("image"), data.name, `${data.name}: ${file.name} (${data.width}x${data.height})`);
    $("image").value = data.name;
    status(`uploaded as ${data.name}`);
    await loadPicture();
  } catch (err) {
    status(err.message, true);
  }
}

// -- the source image and its region ------------------------------------------------------------

function fitScale(w, h) { return Math.min(FIT_W / w, FIT_H / h); }

function drawPicture(canvas, p, scale) {
  canvas.width = Math.round(p.naturalWidth * scale);
  canvas.height = Math.round(p.naturalHeight * scale);
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = scale < 1;
  ctx.drawImage(p, 0, 0, canvas.width, canvas.height);
  return ctx;
}

function drawSource() {
  if (!state.picture) return;
  state.scale = fitScale(state.picture.naturalWidth, state.picture.naturalHeight);
  const ctx = drawPicture($("source"), state.picture, state.scale);
  const r = state.drag || state.region;
  if (r) {
    ctx.strokeStyle = "#00e5ff";
    ctx.lineWidth = 2;
    ctx.strokeRect(r[0] * state.scale, r[1] * state.scale, r[2] * state.scale, r[3] * state.scale);
  }
}

function pixelAt(canvas, event, scale) {
  const box = canvas.getBoundingClientRect();
  const shown = canvas.width / box.width;          // CSS may shrink the canvas
  return [(event.clientX - box.left) * shown / scale, (event.clientY - box.top) * shown / scale];
}

function rectOf(a, b) {
  const w = state.picture.naturalWidth, h = state.picture.naturalHeight;
  const clamp = (v, hi) => Math.max(0, Math.min(hi, Math.round(v)));
  const x0 = clamp(Math.min(a[0], b[0]), w), y0 = clamp(Math.min(a[1], b[1]), h);
  const x1 = clamp(Math.max(a[0], b[0]), w), y1 = clamp(Math.max(a[1], b[1]), h);
  return [x0, y0, x1 - x0, y1 - y0];
}

function showRegion() {
  $("region").textContent = state.region ? `(${state.region.join(", ")})` : "whole image";
}

function regionEvents() {
  const canvas = $("source");
  let start = null;
  canvas.addEventListener("mousedown", (e) => { if (!isVolume()) start = pixelAt(canvas, e, state.scale); });
  canvas.addEventListener("mousemove", (e) => {
    if (!start) return;
    state.drag = rectOf(start, pixelAt(canvas, e, state.scale));
    drawSource();
  });
  window.addEventListener("mouseup", (e) => {
    if (!start) return;
    const r = rectOf(start, pixelAt(canvas, e, state.scale));
    start = null;
    state.drag = null;
    state.region = r[2] >= 2 && r[3] >= 2 ? r : null;
    showRegion();
    drawSource();
  });
  $("clear-region").addEventListener("click", () => { state.region = null; showRegion(); drawSource(); });
}

// -- running a query ----------------------------------------------------------------------------

function request() {
  const body = {
    model: $("model").value, image: $("image").value,
    patch: Number($("patch").value), stride: Number($("stride").value),
    region: isVolume() ? null : state.region, compare: $("compare").checked,
  };
  if ($("ssim-on").checked || body.compare) body.ssim = Number($("ssim").value);
  return body;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// While a run is on: the server's progress line (positions done, rate, time left).
async function watchProgress(run) {
  while (!run.done) {
    await sleep(POLL_MS);
    try {
      const progress = await api("/api/progress");
      if (!run.done && progress.running) status(progress.text);
    } catch (err) { /* the run's own answer says what went wrong */ }
  }
}

function doneText(maps) {
  const positions = maps.reduce((n, m) => n + m.positions, 0);
  const seconds = maps.reduce((s, m) => s + m.seconds, 0);
  return `done: ${positions.toLocaleString("en")} positions in ${seconds.toFixed(2)} s`;
}

async function run() {
  const picture = state.picture;
  $("run").disabled = true;
  $("cell").textContent = CELL_HINT;            // the last run's read-out is gone with its maps
  $("ssim-result").textContent = "";
  $("panels").innerHTML = "";
  status("running ...");
  const running = { done: false };
  watchProgress(running);
  try {
    const data = await api("/api/occlude", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(request()),
    });
    running.done = true;
    if (data.exact && !data.approx) {           // the approximate query planned the exact map
      addPanel("Exact (run once)", data.exact, picture);
      $("ssim-result").textContent = data.note;
      status(doneText([data.exact]));
    } else if (data.exact) {
      addPanel("Exact", data.exact, picture);
      addPanel("Approximate (WITH SSIM)", data.approx, picture);
      $("ssim-result").textContent = data.ssim === null ? "" :
        `SSIM of the approximate map vs the exact one: ${data.ssim.toFixed(4)}`;
      status(doneText([data.exact, data.approx]));
    } else {
      if (data.volume) addVolumePanel("Heat map", data, $("image").value);
      else addPanel("Heat map", data, picture);
      status(doneText([data]));
    }
  } catch (err) {
    status(err.message, true);
  } finally {
    running.done = true;
    $("run").disabled = false;
  }
}

// -- drawing and reading a map ------------------------------------------------------------------

// Red where the patch lowers the score below its unoccluded value, blue where it raises
// it, clear at no change; the scale is symmetric, like the PNG overlay's colour bar.
function diverging(value, base, spread) {
  const t = Math.max(-1, Math.min(1, (value - base) / spread));
  const [r, g, b] = t < 0 ? [178, 24, 43] : [33, 102, 172];
  const mix = (c) => Math.round(255 + (c - 255) * Math.abs(t));
  return `rgba(${mix(r)},${mix(g)},${mix(b)},${(0.25 + 0.5 * Math.abs(t)).toFixed(3)})`;
}

function geometry(map) {
  const b = map.boxes, first = b[0][0];
  return {
    cx: first[0] + first[2] / 2, cy: first[1] + first[3] / 2,
    dx: map.cols > 1 ? b[0][1][0] - first[0] : first[2],
    dy: map.rows > 1 ? b[1][0][1] - first[1] : first[3],
  };
}

// The half-width of the colour range: the map's largest change from the unoccluded score.
function spreadOf(map) {
  return map.values.flat(2).reduce((m, v) => Math.max(m, Math.abs(v - map.probability)), 0) || 1;
}

function drawMap(canvas, map, picture, picked, slice) {
  const scale = fitScale(map.width, map.height);
  const ctx = drawPicture(canvas, picture, scale);
  const g = geometry(map), spread = spreadOf(map);
  const values = map.volume ? map.values[slice] : map.values;     // a volume's: one slice
  for (let i = 0; i < map.rows; i++) {
    for (let j = 0; j < map.cols; j++) {
      ctx.fillStyle = diverging(values[i][j], map.probability, spread);
      const x = g.cx + j * g.dx - g.dx / 2, y = g.cy + i * g.dy - g.dy / 2;
      ctx.fillRect(x * scale, y * scale, g.dx * scale, g.dy * scale);
    }
  }
  if (picked) {
    const box = map.boxes[picked[0]][picked[1]];
    ctx.strokeStyle = "#fff";
    ctx.lineWidth = 2;
    ctx.strokeRect(box[0] * scale, box[1] * scale, box[2] * scale, box[3] * scale);
  }
}

// The colour legend under a map: low (red: covering that spot lowers the score) to high
// (blue), the unoccluded score marked in the middle.
function drawLegend(panel, map) {
  const spread = spreadOf(map), base = map.probability;
  const canvas = panel.querySelector(".legend-bar"), ctx = canvas.getContext("2d");
  for (let x = 0; x < canvas.width; x++) {
    ctx.fillStyle = "#fff";
    ctx.fillRect(x, 0, 1, canvas.height);
    ctx.fillStyle = diverging(base - spread + (2 * spread * (x + 0.5)) / canvas.width, base, spread);
    ctx.fillRect(x, 0, 1, canvas.height);
  }
  ctx.fillStyle = "#000";
  ctx.fillRect(canvas.width / 2 - 1, 0, 2, canvas.height);
  const what = map.output === "logits" ? "logit" : "P";
  panel.querySelector(".legend-low").textContent = `${(base - spread).toFixed(4)}: the patch lowers ${what}`;
  panel.querySelector(".legend-mid").textContent = `${base.toFixed(4)} unoccluded`;
  panel.querySelector(".legend-high").textContent = `${(base + spread).toFixed(4)}: raises it`;
}

function cellAt(map, x, y) {
  const g = geometry(map);
  const i = Math.round((y - g.cy) / g.dy), j = Math.round((x - g.cx) / g.dx);
  return i >= 0 && j >= 0 && i < map.rows && j < map.cols ? [i, j] : null;
}

function showCell(title, map, cell) {
  const [i, j] = cell, box = map.boxes[i][j], v = map.values[i][j];
  const what = map.output === "logits" ? "logit" : "P";
  $("cell").textContent = `${title}: cell (${i}, ${j}): ${what}(${map.label}) = ${v.toFixed(4)} ` +
    `with the patch here (unoccluded ${map.probability.toFixed(4)}, drop ${(map.probability - v).toFixed(4)}); ` +
    `patch box x=${box[0]}, y=${box[1]}, w=${box[2]}, h=${box[3]}`;
}

function addPanel(title, map, picture) {
  const panel = $("panel").content.firstElementChild.cloneNode(true);
  panel.querySelector("h2").textContent = title;
  panel.querySelector(".summary").textContent =
    `${map.rows}x${map.cols} map of class ${map.target} '${map.label}' ` +
    `(unoccluded ${map.probability.toFixed(4)}) in ${map.seconds.toFixed(2)} s` +
    `; tau ${map.tau}` + (map.tuning ? ` (${map.tuning})` : "") +
    (map.predicted_ssim !== null ? `; predicted SSIM >= ${map.predicted_ssim.toFixed(3)}` : "");
  panel.querySelector(".plan").textContent = map.plan;
  panel.querySelector(".overlay").src = map.overlay_url;
  const canvas = panel.querySelector(".map-canvas");
  drawMap(canvas, map, picture, null);
  drawLegend(panel, map);
  canvas.addEventListener("click", (e) => {
    const [x, y] = pixelAt(canvas, e, fitScale(map.width, map.height));
    const cell = cellAt(map, x, y);
    if (!cell) { $("cell").textContent = `${title}: no cell there`; return; }
    drawMap(canvas, map, picture, cell);
    showCell(title, map, cell);
  });
  $("panels").appendChild(panel);
}

// A volume's map: a slider over its slices; each drawn over the scan's slice through the
// middle of that map slice's cubes (the page asks the server for it).
function strongestSlice(map) {
  let best = 0, low = Infinity;
  map.values.forEach((plane, s) => plane.flat().forEach((v) => { if (v < low) { low = v; best = s; } }));
  return best;
}

function addVolumePanel(title, map, name) {
  const panel = $("panel").content.firstElementChild.cloneNode(true);
  panel.querySelector("h2").textContent = title;
  panel.querySelector(".summary").textContent =
    `${map.slices}x${map.rows}x${map.cols} map of class ${map.target} '${map.label}' ` +
    `(unoccluded ${map.probability.toFixed(4)}) in ${map.seconds.toFixed(2)} s, over a ` +
    `${map.depth}x${map.height}x${map.width} volume`;
  panel.querySelector(".plan").textContent = map.plan;
  panel.querySelector(".overlay").src = map.overlay_url;
  const canvas = panel.querySelector(".map-canvas"), slider = panel.querySelector(".map-slice");
  panel.querySelector(".map-slice-row").hidden = false;
  slider.max = map.slices - 1;
  slider.value = strongestSlice(map);
  const view = { picture: null, picked: null };
  const voxelSlice = (s) => map.slice_first[s] + Math.floor(map.slice_patch / 2);
  async function show() {
    const s = Number(slider.value);
    panel.querySelector(".map-slice-at").textContent =
      `${s} of ${map.slices} (volume slice ${voxelSlice(s)})`;
    try {
      view.picture = await pictureOf(name, voxelSlice(s));
    } catch (err) {
      status(err.message, true);
      return;
    }
    if (Number(slider.value) === s) drawMap(canvas, map, view.picture, view.picked, s);
  }
  slider.addEventListener("input", () => { view.picked = null; show(); });
  drawLegend(panel, map);
  canvas.addEventListener("click", (e) => {
    if (!view.picture) return;
    const [x, y] = pixelAt(canvas, e, fitScale(map.width, map.height));
    const cell = cellAt(map, x, y), s = Number(slider.value);
    if (!cell) { $("cell").textContent = `${title}: no cell there`; return; }
    view.picked = cell;
    drawMap(canvas, map, view.picture, cell, s);
    const [i, j] = cell, box = map.boxes[i][j], v = map.values[s][i][j];
    const what = map.output === "logits" ? "logit" : "P";
    $("cell").textContent = `${title}: cell (${s}, ${i}, ${j}): ${what}(${map.label}) = ${v.toFixed(4)} ` +
      `with the cube here (unoccluded ${map.probability.toFixed(4)}, drop ${(map.probability - v).toFixed(4)}); ` +
      `cube from slice ${map.slice_first[s]}, x=${box[0]}, y=${box[1]}, ` +
      `${map.slice_patch}x${box[3]}x${box[2]} voxels`;
  });
  $("panels").appendChild(panel);
  return show();
}

// -- start ------------------------------------------------------------------------------------

$("image").addEventListener("change", () => loadPicture());
$("slice").addEventListener("input", () => loadPicture(true));
$("upload").addEventListener("change", upload);
$("run").addEventListener("click", run);
regionEvents();
loadLists().catch((err) => status(err.message, true));
