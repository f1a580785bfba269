// An exported model for the page: its bytes, its "ddpm" metadata and graph inputs read from the ONNX
// protobuf, checked as ddpm/onnx_model.py checks them, and its schedule rebuilt as ddpm/schedule_math.py
// does (float64 arithmetic, float32 arrays). Timesteps t are indices in [0, T-1].

export class ModelError extends Error {}

const METADATA_KEY = 'ddpm';
const META_KEYS = ['diffusion', 'image_shape', 'class_conditional', 'num_classes', 'step'];
const DIFFUSION_KEYS = ['timesteps', 'schedule', 'beta_start', 'beta_end', 'cosine_s', 'prediction'];
const FLOAT = 1, INT64 = 7;  // onnx.TensorProto element types
const REEXPORT = 're-export it with `ddpm export`';

// ---- A minimal protobuf reader: enough of onnx.proto for metadata_props and the graph's inputs. ----

function varint(buf, pos, url) {
  let value = 0, scale = 1;
  for (let i = 0; i < 10 && pos < buf.length; i++) {
    const b = buf[pos++];
    value += (b & 0x7f) * scale;
    if (b < 0x80) return [value, pos];
    scale *= 128;
  }
  throw new ModelError(`${url} is not an ONNX model (its bytes are not a protobuf message); ${REEXPORT}`);
}

/** The fields of one message in buf[start, end): [{field, value} | {field, start, end}]. */
function fields(buf, start, end, url) {
  const out = [];
  let pos = start;
  while (pos < end) {
    const [key, p] = varint(buf, pos, url);
    const field = Math.floor(key / 8), wire = key % 8;
    pos = p;
    if (wire === 0) {
      const [value, q] = varint(buf, pos, url);
      out.push({ field, value });
      pos = q;
    } else if (wire === 2) {
      const [len, q] = varint(buf, pos, url);
      out.push({ field, start: q, end: q + len });
      pos = q + len;
    } else if (wire === 1 || wire === 5) {
      pos += wire === 1 ? 8 : 4;
    } else {
      pos = Infinity;
    }
    if (pos > end || field === 0) {
      throw new ModelError(`${url} is not an ONNX model (its bytes are not a protobuf message); ${REEXPORT}`);
    }
  }
  return out;
}

const text = (buf, f) => new TextDecoder().decode(buf.subarray(f.start, f.end));
const sub = (buf, f, number, url) => fields(buf, f.start, f.end, url).filter((g) => g.field === number);

function valueInfo(buf, f, url) {  // ValueInfoProto -> {name, elemType, shape: [number | string]}
  const name = text(buf, sub(buf, f, 1, url)[0] || { start: 0, end: 0 });
  const tensor = sub(buf, f, 2, url).flatMap((type) => sub(buf, type, 1, url))[0];
  if (!tensor) return { name, elemType: 0, shape: [] };
  const elemType = (sub(buf, tensor, 1, url)[0] || {}).value || 0;
  const dims = sub(buf, tensor, 2, url).flatMap((shape) => sub(buf, shape, 1, url));
  const shape = dims.map((d) => {
    const [g] = fields(buf, d.start, d.end, url);
    return g === undefined ? '?' : g.field === 1 ? g.value : text(buf, g);
  });
  return { name, elemType, shape };
}

/** ModelProto bytes -> {metadata: {key: string}, inputs: [valueInfo]} (graph inputs that are not weights). */
export function readOnnx(buf, url) {
  const top = fields(buf, 0, buf.length, url);
  const graph = top.find((f) => f.field === 7 && f.end !== undefined);
  if (!top.some((f) => f.field === 1 && f.value !== undefined) || !graph) {
    throw new ModelError(`${url} is not an ONNX model (no IR version or graph); ${REEXPORT}`);
  }
  const metadata = {};
  for (const entry of top.filter((f) => f.field === 14)) {
    const kv = fields(buf, entry.start, entry.end, url);
    const key = kv.find((g) => g.field === 1), value = kv.find((g) => g.field === 2);
    if (key) metadata[text(buf, key)] = value ? text(buf, value) : '';
  }
  const graphFields = fields(buf, graph.start, graph.end, url);
  const weights = new Set(graphFields.filter((f) => f.field === 5)
    .map((t) => sub(buf, t, 8, url)[0]).filter(Boolean).map((n) => text(buf, n)));
  const inputs = graphFields.filter((f) => f.field === 11).map((f) => valueInfo(buf, f, url))
    .filter((v) => !weights.has(v.name));
  return { metadata, inputs };
}

// ---- The checks of ddpm/onnx_model.py. ----

/** The "ddpm" metadata as an object, with the keys a sampler needs. */
export function checkMetadata(metadata, url) {
  const raw = metadata[METADATA_KEY];
  if (raw === undefined) {
    throw new ModelError(`${url}: no '${METADATA_KEY}' metadata, so its schedule and image shape are unknown; ` +
      'export the model with `ddpm export`');
  }
  let meta;
  try { meta = JSON.parse(raw); } catch (e) {
    throw new ModelError(`${url}: its '${METADATA_KEY}' metadata is not JSON (${e.message}); ${REEXPORT}`);
  }
  const d = meta && meta.diffusion;
  const missing = META_KEYS.filter((k) => !meta || !(k in meta))
    .concat(DIFFUSION_KEYS.filter((k) => !d || !(k in d)).map((k) => `diffusion.${k}`));
  if (missing.length) throw new ModelError(`${url}: its '${METADATA_KEY}' metadata lacks ${missing.join(', ')}; ${REEXPORT}`);
  const shape = meta.image_shape;
  if (!Array.isArray(shape) || shape.length !== 3 || !shape.every((s) => Number.isInteger(s) && s > 0 && s <= 256) ||
      ![1, 3].includes(shape[0])) {
    throw new ModelError(`${url}: its metadata gives image shape ${JSON.stringify(shape)}, not [C, H, W] with C 1 or 3`);
  }
  if (!Number.isInteger(d.timesteps) || d.timesteps < 1 || d.timesteps > 100000 ||
      !['linear', 'cosine'].includes(d.schedule) || !['eps', 'v', 'x0'].includes(d.prediction)) {
    throw new ModelError(`${url}: its diffusion metadata is invalid (${JSON.stringify(d)}); ${REEXPORT}`);
  }
  checkSampler(meta, url);
  return meta;
}

/** The "sampler" entry, the DDIM settings the export was checked with (an older export has none): steps an
 * integer in [1, T], eta and guidance_scale finite numbers >= 0, as ddpm/onnx_model.py's _sampler_defaults. */
function checkSampler(meta, url) {
  const s = meta.sampler, T = meta.diffusion.timesteps;
  if (s === undefined) return;
  const number = (v) => typeof v === 'number' && Number.isFinite(v) && v >= 0;
  if (!s || !Number.isInteger(s.steps) || s.steps < 1 || s.steps > T || !number(s.eta) || !number(s.guidance_scale)) {
    throw new ModelError(`${url}: its '${METADATA_KEY}' metadata has an invalid sampler entry ${JSON.stringify(s)}; ` +
      REEXPORT);
  }
}

/** The graph's inputs against the metadata: x float [B, C, H, W], t int64 [B] (and labels int64 [B]). */
export function checkInputs(inputs, meta, url) {
  const expected = { x: [FLOAT, [null, ...meta.image_shape]], t: [INT64, [null]] };
  if (meta.class_conditional) expected.labels = [INT64, [null]];
  const names = inputs.map((i) => i.name).sort(), want = Object.keys(expected).sort();
  if (names.join() !== want.join()) {
    throw new ModelError(`${url}: the model's inputs are [${names}], but a ` +
      `${meta.class_conditional ? 'class-conditional' : 'unconditional'} ddpm model takes [${want}]; ${REEXPORT}`);
  }
  for (const input of inputs) {
    const [type, shape] = expected[input.name];
    if (input.elemType !== type || input.shape.length !== shape.length) {
      throw new ModelError(`${url}: input '${input.name}' has element type ${input.elemType} and rank ` +
        `${input.shape.length}; expected type ${type} (${type === FLOAT ? 'float32' : 'int64'}) of rank ${shape.length}`);
    }
    if (shape.some((s, k) => s !== null && typeof input.shape[k] === 'number' && input.shape[k] !== s)) {
      throw new ModelError(`${url}: input '${input.name}' has shape [${input.shape}], but the metadata's image ` +
        `shape is [${meta.image_shape}]`);
    }
  }
}

// ---- The schedule: float64 as ddpm/schedule_math.py, then float32. ----

function makeBetas(d) {
  const T = d.timesteps, betas = new Float64Array(T);
  if (d.schedule === 'linear') {  // numpy.linspace: start + i * step, the last one exactly beta_end
    const step = T > 1 ? (d.beta_end - d.beta_start) / (T - 1) : 0;
    for (let i = 0; i < T; i++) betas[i] = i * step + d.beta_start;
    betas[T - 1] = d.beta_end;
  } else {  // Nichol & Dhariwal (2021), eq. 17
    const f = (i) => Math.cos((i / T + d.cosine_s) / (1 + d.cosine_s) * Math.PI / 2) ** 2;
    for (let i = 0; i < T; i++) betas[i] = Math.min(1 - f(i + 1) / f(i), 0.999);
  }
  return betas;
}

/** The per-timestep constants the samplers use: Float32Array [T] each, named as in ddpm/schedule_math.py. */
export function makeSchedule(d) {
  const b = makeBetas(d), T = b.length;
  const names = ['betas', 'alphas_cumprod', 'sqrt_alphas_cumprod', 'sqrt_one_minus_alphas_cumprod',
    'sqrt_recip_alphas_cumprod', 'sqrt_recipm1_alphas_cumprod', 'posterior_log_variance_clipped',
    'posterior_mean_coef1', 'posterior_mean_coef2'];
  const s = Object.fromEntries(names.map((n) => [n, new Float32Array(T)]));
  const postVar = new Float64Array(T);
  let acp = 1;
  for (let i = 0; i < T; i++) {
    const prev = acp, alpha = 1 - b[i];
    acp *= alpha;
    postVar[i] = b[i] * (1 - prev) / (1 - acp);  // beta_tilde_t, eq. 7
    s.betas[i] = b[i];
    s.alphas_cumprod[i] = acp;
    s.sqrt_alphas_cumprod[i] = Math.sqrt(acp);
    s.sqrt_one_minus_alphas_cumprod[i] = Math.sqrt(1 - acp);
    s.sqrt_recip_alphas_cumprod[i] = Math.sqrt(1 / acp);
    s.sqrt_recipm1_alphas_cumprod[i] = Math.sqrt(1 / acp - 1);
    s.posterior_mean_coef1[i] = b[i] * Math.sqrt(prev) / (1 - acp);
    s.posterior_mean_coef2[i] = (1 - prev) * Math.sqrt(alpha) / (1 - acp);
  }
  for (let i = 0; i < T; i++) {  // beta_tilde_0 = 0: its log is that of t = 1, as in the paper's code
    s.posterior_log_variance_clipped[i] = Math.log(T > 1 ? postVar[Math.max(i, 1)] : b[0]);
  }
  return s;
}

/** DDIM's timesteps, descending: uniform stride T // steps from 0 (Song et al. 2021, C.2). */
export function ddimTimesteps(T, steps) {
  const stride = Math.floor(T / steps);
  return Array.from({ length: steps }, (_, i) => (steps - 1 - i) * stride);
}

/** Python's round(): halves go to the even neighbour (62.5 -> 62), where Math.round goes up. */
function roundHalfEven(v) {
  const r = Math.round(v);
  return Math.abs(v % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/** The DDIM timesteps of a `steps`-step sampler, as ddpm/schedule_math.py's sampling_timesteps: the
 * uniform grid, or for a student distilled to `distilled` steps its trailing grid round(k T / n) - 1,
 * which it alone was trained on (another step count is a ModelError). */
export function samplingTimesteps(T, steps, distilled = 0) {
  if (!distilled) return ddimTimesteps(T, steps);
  if (steps !== distilled) {
    throw new ModelError(`steps: ${steps} asked of a student distilled to ${distilled} DDIM steps; ` +
      `sample it with exactly ${distilled} steps`);
  }
  return Array.from({ length: steps }, (_, i) => roundHalfEven(((steps - i) * T) / steps) - 1);
}

/** Fetch and check a model: {bytes, meta, schedule}; a ModelError says what is wrong with it. */
export async function fetchModel(url) {
  let response;
  try { response = await fetch(url); } catch (e) {
    throw new ModelError(`could not fetch the model ${url} (${e.message}); start the page with \`ddpm web\``);
  }
  if (!response.ok) {
    throw new ModelError(`the model ${url} could not be fetched (HTTP ${response.status}); start the page with ` +
      '`ddpm web --model PATH` or give ?model=URL');
  }
  const bytes = new Uint8Array(await response.arrayBuffer());
  if (bytes.length === 0) throw new ModelError(`the model ${url} is empty; ${REEXPORT}`);
  const { metadata, inputs } = readOnnx(bytes, url);
  const meta = checkMetadata(metadata, url);
  checkInputs(inputs, meta, url);
  return { bytes, meta, schedule: makeSchedule(meta.diffusion) };
}
