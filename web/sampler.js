// DDIM and DDPM on an onnxruntime-web session, operation for operation as ddpm/onnx_sampler.py in float32
// (each product and sum rounded by Math.fround, as numpy rounds each float32 operation). Timesteps t are
// indices in [0, T-1]; the noise comes from noise.js: stream 0 is x_T, stream 1 + i the noise of step i.

import { gaussian } from './noise.js';
import { samplingTimesteps } from './model.js';

const f = Math.fround;

/** int64 [n] labels: `label` for every image, or classes 0..numClasses-1 in turn (ddpm.onnx_sampler.class_labels). */
export function classLabels(n, label, numClasses) {
  return Array.from({ length: n }, (_, i) => (label === null ? i % numClasses : label));
}

/** The network as eps = net(x, t, labels), with classifier-free guidance (Ho & Salimans 2022) when asked. */
function denoiser(ort, session, meta, labels, guidance) {
  const shape = meta.image_shape;
  const run = async (x, t, labs, n) => {
    const feeds = {
      x: new ort.Tensor('float32', x, [n, ...shape]),
      t: new ort.Tensor('int64', BigInt64Array.from({ length: n }, () => BigInt(t)), [n]),
    };
    if (meta.class_conditional) feeds.labels = new ort.Tensor('int64', BigInt64Array.from(labs, BigInt), [n]);
    const out = await session.run(feeds);
    return out[session.outputNames[0]].data;
  };
  if (!meta.class_conditional) return (x, t, n) => run(x, t, null, n);
  const nulls = labels.map(() => meta.num_classes);  // the null class
  if (guidance === 1) return (x, t, n) => run(x, t, labels, n);
  if (guidance === 0) return (x, t, n) => run(x, t, nulls, n);
  const s = f(guidance);
  return async (x, t, n) => {  // one batch of 2n: eps = eps_null + s (eps_y - eps_null)
    const both = new Float32Array(2 * x.length);
    both.set(x);
    both.set(x, x.length);
    const out = await run(both, t, labels.concat(nulls), 2 * n);
    const eps = new Float32Array(x.length);
    for (let k = 0; k < x.length; k++) {
      const c = out[k], u = out[x.length + k];
      eps[k] = f(u + f(s * f(c - u)));
    }
    return eps;
  };
}

/** A network output of kind eps, v or x0 -> x0, clipped to [-1, 1], and eps recomputed from it (clip_denoised). */
function predictX0(s, x, t, out, prediction) {
  const x0 = new Float32Array(x.length);
  const a = s.sqrt_recip_alphas_cumprod[t], b = s.sqrt_recipm1_alphas_cumprod[t];
  const sa = s.sqrt_alphas_cumprod[t], sd = s.sqrt_one_minus_alphas_cumprod[t];
  for (let k = 0; k < x.length; k++) {
    let v;
    if (prediction === 'eps') v = f(f(a * x[k]) - f(b * out[k]));
    else if (prediction === 'v') v = f(f(sa * x[k]) - f(sd * out[k]));
    else v = out[k];
    x0[k] = Math.min(1, Math.max(-1, v));
  }
  return x0;
}

/**
 * Sample a batch: opts {sampler: 'ddim' | 'ddpm', steps, seed, batch, label (null: every class in turn),
 * guidance}; onStep(i, total, x) after every step (x Float32Array [batch, C, H, W]), which may return true to
 * stop. Returns {images: x_0 Float32Array, stepMs: [ms per step], stopped}.
 */
export async function sampleBatch(ort, session, model, opts, onStep) {
  const { meta, schedule: s } = model;
  const perImage = meta.image_shape.reduce((p, q) => p * q, 1), n = opts.batch;
  const labels = classLabels(n, opts.label, meta.num_classes);
  const net = denoiser(ort, session, meta, labels, opts.guidance);
  const T = s.betas.length;
  const seq = opts.sampler === 'ddim' ? samplingTimesteps(T, opts.steps, meta.diffusion.distilled_steps || 0)
    : Array.from({ length: T }, (_, i) => T - 1 - i);
  let x = gaussian(opts.seed, 0, n, perImage);
  const stepMs = [];
  for (let i = 0; i < seq.length; i++) {
    const start = performance.now(), t = seq[i];
    const x0 = predictX0(s, x, t, await net(x, t, n), meta.diffusion.prediction);
    x = opts.sampler === 'ddim' ? ddimStep(s, x, x0, t, i + 1 < seq.length ? seq[i + 1] : null)
      : ddpmStep(s, x, x0, t, t > 0 ? gaussian(opts.seed, 1 + i, n, perImage) : null);
    stepMs.push(performance.now() - start);
    if (await onStep(i, seq.length, x)) return { images: x, stepMs, stopped: true };
  }
  return { images: x, stepMs, stopped: false };
}

/** DDIM, eta = 0 (Song et al. 2021, eq. 12): x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps. */
function ddimStep(s, x, x0, t, tPrev) {
  const acp = s.alphas_cumprod, aT = acp[t], aPrev = tPrev === null ? 1 : acp[tPrev];
  const sqrtA = f(Math.sqrt(aT)), sqrtOneMinusA = f(Math.sqrt(f(1 - aT)));
  const cx0 = f(Math.sqrt(aPrev)), ceps = f(Math.sqrt(Math.max(f(1 - aPrev), 0)));
  const out = new Float32Array(x.length);
  for (let k = 0; k < x.length; k++) {
    const eps = f(f(x[k] - f(sqrtA * x0[k])) / sqrtOneMinusA);
    out[k] = f(f(cx0 * x0[k]) + f(ceps * eps));
  }
  return out;
}

/** DDPM ancestral step (Algorithm 2, mean by eq. 7, variance beta_tilde); noise null at t = 0. */
function ddpmStep(s, x, x0, t, noise) {
  const c1 = s.posterior_mean_coef1[t], c2 = s.posterior_mean_coef2[t];
  const sigma = f(Math.exp(f(0.5 * s.posterior_log_variance_clipped[t])));
  const out = new Float32Array(x.length);
  for (let k = 0; k < x.length; k++) {
    const mean = f(f(c1 * x0[k]) + f(c2 * x[k]));
    out[k] = noise === null ? mean : f(mean + f(sigma * noise[k]));
  }
  return out;
}
