// The counter-based Gaussian noise source of ddpm/counter_noise.py, word for word: see that file for the
// definition (streams: 0 is x_T, 1 + i the noise of the i-th step taken; element j of an image takes words
// 2j and 2j+1 of the image's key). Every 32-bit step is exact here through Math.imul and >>> 0.

const SEED_SALT = 0x9e3779b9, STREAM_SALT = 0x85ebca6b, IMAGE_SALT = 0xc2b2ae35;
const TWO_32 = 4294967296;

/** lowbias32: uint32 -> uint32. */
export function mix32(x) {
  x = (x ^ (x >>> 16)) >>> 0;
  x = Math.imul(x, 0x7feb352d) >>> 0;
  x = (x ^ (x >>> 15)) >>> 0;
  x = Math.imul(x, 0x846ca68b) >>> 0;
  return (x ^ (x >>> 16)) >>> 0;
}

/** The 32-bit key of one image in one stream of one seed (seed and stream in [0, 2**32 - 1]). */
export function imageKey(seed, stream, image) {
  let k = mix32((seed + SEED_SALT) >>> 0);
  k = mix32((k ^ ((stream + STREAM_SALT) >>> 0)) >>> 0);
  return mix32((k ^ ((image + IMAGE_SALT) >>> 0)) >>> 0);
}

function word(key, counter) {
  return mix32((mix32((key + counter) >>> 0) ^ key) >>> 0);
}

/** Standard normal numbers for images firstImage .. firstImage + n - 1 of a stream: Float32Array [n * perImage]. */
export function gaussian(seed, stream, n, perImage, firstImage = 0) {
  const out = new Float32Array(n * perImage);
  for (let i = 0; i < n; i++) {
    const key = imageKey(seed, stream, firstImage + i);
    for (let j = 0; j < perImage; j++) {
      const u1 = (word(key, 2 * j) + 0.5) / TWO_32;
      const u2 = word(key, 2 * j + 1) / TWO_32;
      out[i * perImage + j] = Math.sqrt(-2 * Math.log(u1)) * Math.cos(2 * Math.PI * u2);
    }
  }
  return out;
}
