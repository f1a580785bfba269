// The page: loads the model (model.js), runs the sampler (sampler.js) on onnxruntime-web's WASM backend and
// draws the batch after every step. ?model=URL picks another model file, ?threads=N the WASM threads.
// window.ddpm exposes the loaded model and the last result, for the tests and bench/bench_browser.py.

import * as ort from './ort/ort.wasm.min.mjs';
import { fetchModel, ModelError } from './model.js';
import { sampleBatch } from './sampler.js';

const $ = (id) => document.getElementById(id);
const query = new URLSearchParams(location.search);
const MAX_BATCH = 64, MAX_SEED = 4294967295, PADDING = 2;
const state = { session: null, model: null, running: false, stop: false, last: null };
window.ddpm = { state, run: null, ready: null };

function showError(message) {
  $('error').textContent = message;
  $('error').hidden = false;
  $('status').textContent = 'error';
}

/** WASM threads need cross-origin isolation (SharedArrayBuffer); without it the page runs on one thread. */
function chooseThreads() {
  const asked = query.get('threads');
  const wanted = asked ? Number(asked) : Math.min(navigator.hardwareConcurrency || 1, 4);
  if (!Number.isInteger(wanted) || wanted < 1 || wanted > 64) {
    throw new ModelError(`?threads=${asked} is not allowed; use an integer from 1 to 64`);
  }
  if (!self.crossOriginIsolated || typeof SharedArrayBuffer === 'undefined') {
    $('note').textContent = 'WASM threads are unavailable here (the page is not cross-origin isolated: its ' +
      'server sends no COOP/COEP headers), so the model runs on one thread. `ddpm web` sends them.';
    $('note').hidden = false;
    return 1;
  }
  return wanted;
}

/** Draw x ([n, C, H, W] in [-1, 1]) as ddpm.fileio.grid_png lays out a grid: 1 canvas pixel per image pixel. */
function draw(x, n, [c, h, w]) {
  const ncol = Math.min(Math.max(Math.floor(Math.sqrt(n)), 1), n), nrow = Math.ceil(n / ncol);
  const canvas = $('grid'), width = ncol * (w + PADDING) + PADDING, height = nrow * (h + PADDING) + PADDING;
  if (canvas.width !== width || canvas.height !== height) [canvas.width, canvas.height] = [width, height];
  canvas.style.width = `${Math.min(width * 4, 720)}px`;
  const img = canvas.getContext('2d').createImageData(width, height);
  img.data.fill(255);
  const plane = h * w;
  for (let i = 0; i < n; i++) {
    const top = Math.floor(i / ncol) * (h + PADDING) + PADDING, left = (i % ncol) * (w + PADDING) + PADDING;
    for (let p = 0; p < plane; p++) {
      const o = 4 * ((top + Math.floor(p / w)) * width + left + (p % w));
      for (let ch = 0; ch < 3; ch++) img.data[o + ch] = toUint8(x[(i * c + (c === 1 ? 0 : ch)) * plane + p]);
    }
  }
  canvas.getContext('2d').putImageData(img, 0, 0);
}

/** float [-1, 1] -> [0, 255], clamped, rounded half to even (ddpm.onnx_sampler.to_uint8). */
function toUint8(v) {
  const y = Math.fround(Math.fround(Math.min(1, Math.max(-1, v)) + 1) * 127.5), r = Math.round(y);
  return r - y === 0.5 && r % 2 === 1 ? r - 1 : r;
}

/** The form's settings, `overrides` taking precedence, checked; a ModelError names a bad one. */
function readOptions(overrides) {
  const meta = state.model.meta, T = meta.diffusion.timesteps, cond = meta.class_conditional;
  const form = { sampler: $('sampler').value, steps: $('steps').value, seed: $('seed').value, batch: $('batch').value,
    label: cond && $('digit').value !== '' ? $('digit').value : null, guidance: cond ? $('guidance').value : 1 };
  const raw = { ...form, ...overrides };
  const number = (v) => (v === null || v === '' ? NaN : Number(v));
  const int = (key, lo, hi, what) => {
    const v = number(raw[key]);
    if (!Number.isInteger(v) || v < lo || v > hi) {
      throw new ModelError(`${what}: ${raw[key] === '' ? '(empty)' : raw[key]} is not allowed; use an integer from ${lo} to ${hi}`);
    }
    return v;
  };
  if (!['ddim', 'ddpm'].includes(raw.sampler)) throw new ModelError(`sampler: ${raw.sampler} is not allowed; choose ddim or ddpm`);
  const distilled = meta.diffusion.distilled_steps || 0;
  if (distilled && raw.sampler !== 'ddim') {
    throw new ModelError(`sampler: a student distilled to ${distilled} DDIM steps samples with ddim and ${distilled} steps only`);
  }
  const opts = { sampler: raw.sampler, steps: raw.sampler === 'ddim' ? int('steps', 1, T, 'steps') : T,
    seed: int('seed', 0, MAX_SEED, 'seed'), batch: int('batch', 1, MAX_BATCH, 'batch size'), label: null, guidance: 1 };
  if (cond) {
    opts.label = raw.label === null ? null : int('label', 0, meta.num_classes - 1, 'digit');
    opts.guidance = number(raw.guidance);
    if (!Number.isFinite(opts.guidance) || opts.guidance < 0) {
      throw new ModelError(`guidance scale: ${raw.guidance === '' ? '(empty)' : raw.guidance} is not allowed; use a number >= 0 (1: none)`);
    }
  }
  return opts;
}

/** Sample with the form's settings (or `overrides`), drawing every step; `stopAfter` steps ends it early. */
async function run(overrides = {}, stopAfter = Infinity) {
  if (state.running) return null;
  $('error').hidden = true;
  let opts;
  try { opts = readOptions(overrides); } catch (e) { showError(e.message); return null; }
  state.running = true;
  state.stop = false;
  $('sample').disabled = true;
  $('stop').disabled = false;
  const shape = state.model.meta.image_shape;
  try {
    const result = await sampleBatch(ort, state.session, state.model, opts, async (i, total, x) => {
      draw(x, opts.batch, shape);
      $('status').textContent = `step ${i + 1} / ${total}`;
      await new Promise((resolve) => requestAnimationFrame(resolve));  // let the browser paint this step
      return state.stop || i + 1 >= stopAfter;
    });
    const ms = result.stepMs.reduce((a, b) => a + b, 0) / result.stepMs.length;
    $('status').textContent = `${result.stopped ? 'stopped' : 'done'}: ${result.stepMs.length} steps, ` +
      `${ms.toFixed(1)} ms per step`;
    state.last = { ...result, opts };
    return state.last;
  } catch (e) {
    showError(`sampling failed: ${e.message}`);
    return null;
  } finally {
    state.running = false;
    $('sample').disabled = false;
    $('stop').disabled = true;
  }
}

function describe(meta, threads) {
  const d = meta.diffusion;
  const kind = meta.class_conditional ? `class-conditional (${meta.num_classes} classes)` : 'unconditional';
  return `${kind}, ${meta.image_shape.join('x')} images, T = ${d.timesteps} (${d.schedule}, predicts ${d.prediction}), ` +
    `trained ${meta.step} steps${d.distilled_steps ? `, distilled to ${d.distilled_steps} DDIM steps` : ''}; onnxruntime-web ${ort.env.versions.web}, WASM, ${threads} thread${threads > 1 ? 's' : ''}`;
}

async function start() {
  const url = query.get('model') || 'model.onnx';
  const threads = chooseThreads();
  ort.env.wasm.numThreads = threads;
  ort.env.wasm.wasmPaths = new URL('./ort/', import.meta.url).href;
  const model = await fetchModel(url);
  try {
    state.session = await ort.InferenceSession.create(model.bytes, { executionProviders: ['wasm'] });
  } catch (e) {
    throw new ModelError(`${url} could not be loaded by onnxruntime-web (${e.message || e}); re-export it with \`ddpm export\``);
  }
  state.model = model;
  $('steps').max = model.meta.diffusion.timesteps;
  // the DDIM settings the export was checked with (checked by model.js; a student's own steps); an older export
  // has none and keeps the form's
  const T = model.meta.diffusion.timesteps, recorded = model.meta.sampler;
  const own = model.meta.diffusion.distilled_steps || recorded?.steps;
  if (Number.isInteger(own) && own >= 1 && own <= T) $('steps').value = own;
  else if (Number($('steps').value) > T) $('steps').value = T;
  if (recorded) $('guidance').value = recorded.guidance_scale;
  $('conditional').hidden = !model.meta.class_conditional;
  for (let k = 0; k < model.meta.num_classes; k++) $('digit').add(new Option(String(k), String(k)));
  $('model').textContent = `${url}: ${describe(model.meta, threads)}`;
  $('sample').disabled = false;
  $('status').textContent = 'ready';
  return { meta: model.meta, threads };
}

$('sample').addEventListener('click', () => run());
$('stop').addEventListener('click', () => { state.stop = true; });
$('sampler').addEventListener('change', () => { $('steps').disabled = $('sampler').value !== 'ddim'; });
window.ddpm.run = run;
window.ddpm.ready = start().catch((e) => {
  showError(e instanceof ModelError ? e.message : `the page failed to start: ${e.message || e}`);
  return null;
});
