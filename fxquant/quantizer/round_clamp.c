/* fxquant's fused CPU kernels of the straight-through round-clamp (fxquant/quantizer/fused_cpu.py builds and
 * loads this file; docs/decisions.md, "A fused CPU kernel for per-tensor quantizers").
 *
 * One pass forward and one pass backward over a float32 tensor quantized with one clamp pair [lo, hi] and one
 * step (a per-tensor activation quantizer), where torch's ops make five passes forward and about as many
 * backward. The values are those of `numerics._RoundClamp`, with u = clamp(x, lo, hi) / step:
 *
 *   forward:  out = step * round_half_even(u)
 *   backward: grad_in = grad where lo <= x <= hi, 0 elsewhere (NaN included); and four sums: grad where x < lo,
 *             grad where x > hi, sum(grad_in * (u - round(u))) (the step's gradient is its negation), sum(grad_in^2) where
 *             x != 0 (the dither's variance: 0 is on every grid, its rounding error is exactly 0). It reads x again and recomputes u - round(u) (the same arithmetic as the
 *             forward): storing it would cost a write and a tensor of x's size, and x is kept for the backward
 *             anyway (by the op that made it, and by autograd here).
 *
 * The `_rows` variants do the same for a tensor whose rows (its first axis, e.g. a weight's output channels) each
 * have their own step and clamp pair (a per-channel weight quantizer): the arrays step, lo and hi hold one value
 * per row, and the backward writes the four sums of each row (sums[4 * row + k]).
 *
 * `fxq_grid_rows` computes a learnable quantizer's training grid (`numerics.GridValues`) from its bits parameter and
 * clamps, and `fxq_grid_rows_backward` chains the backward's sums through it (`numerics._FusedRounding`): a few
 * float operations per row, which as numpy calls cost ~2 us each and dominated the steps of small models.
 * Their float32 operations are numpy's, one by one (compiled with -ffp-contract=off: no fused multiply-adds).
 *
 * `fxq_noise_forward` / `fxq_noise_backward` are DiffQ's pseudo-quantization noise on the same clamps
 * (`numerics._ClampWithNoise`): out = clamp(x, lo, hi) + step * eps with eps uniform in [-1/2, 1/2), drawn from a
 * counter-based generator (`fxq_noise_uniform`: a 64-bit seed and the element's index), so the backward draws the
 * same eps again instead of storing them, and the values do not depend on the number of threads.
 *
 * Built with OpenMP: inside a process that imported torch, the loader finds torch's own libgomp.so.1 already
 * loaded, so both share one thread pool. No -ffast-math: the rounding below relies on IEEE float arithmetic.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define FXQ_PARALLEL_MIN 32768     /* fewer elements run on one thread */
#define FXQ_BLOCK 256              /* float partial sums over blocks, added up in double */

/* round half to even, as torch.round (the sign of a zero kept), without a libm call so that the loop vectorises
 * on any x86-64: adding and subtracting 2^23 rounds a magnitude below 2^23 to an integer in the current rounding
 * mode (to nearest, ties to even); from 2^23 up every float is an integer already. NaN stays NaN. */
static inline float fxq_round_half_even(float u) {
    float magnitude = fabsf(u);
    float rounded = (magnitude + 0x1p23f) - 0x1p23f;
    return copysignf(magnitude < 0x1p23f ? rounded : magnitude, u);
}

int fxq_abi_version(void) { return 11; }

/* the clamped element (NaN stays NaN, as torch.clamp) */
static inline float fxq_clamped(float v, float lo, float hi) {
    float c = v < lo ? lo : v;
    return c > hi ? hi : c;
}

/* the clamped element divided by the step, as the forward computes it */
static inline float fxq_scaled(float v, float step, float lo, float hi) { return fxq_clamped(v, lo, hi) / step; }

void fxq_round_clamp_forward(const float *x, float *out, int64_t n, float step, float lo, float hi, int threads) {
#pragma omp parallel for simd num_threads(threads) schedule(static) if (n >= FXQ_PARALLEL_MIN)
    for (int64_t i = 0; i < n; ++i) {
        out[i] = fxq_round_half_even(fxq_scaled(x[i], step, lo, hi)) * step;
    }
}

/* the backward of elements [start, end) (at most FXQ_BLOCK): grad_in there, and the block's four float sums added
 * to partial[0..3] in double */
static inline void fxq_backward_block(const float *grad, const float *x, float *grad_in, int64_t start, int64_t end,
                                      float step, float lo, float hi, double *partial) {
    float block_below = 0.0f, block_above = 0.0f, block_dot = 0.0f, block_square = 0.0f;
#pragma omp simd reduction(+ : block_below, block_above, block_dot, block_square)
    for (int64_t i = start; i < end; ++i) {
        float v = x[i], g = grad[i];
        int is_below = v < lo, is_above = v > hi;
        float u = fxq_scaled(v, step, lo, hi);
        float inside = (v >= lo && v <= hi) ? g : 0.0f; /* a NaN is outside, as the torch path's mask has it */
        grad_in[i] = inside;
        block_below += is_below ? g : 0.0f;
        block_above += is_above ? g : 0.0f;
        block_dot += inside * (u - fxq_round_half_even(u));
        block_square += v != 0.0f ? inside * inside : 0.0f; /* an exact 0 has no rounding error to dither */
    }
    partial[0] += block_below;
    partial[1] += block_above;
    partial[2] += block_dot;
    partial[3] += block_square;
}

/* A backward's element pass in blocks of FXQ_BLOCK: `block(state, row, start, end, partial)` writes grad_in on
 * [start, end) of row `row` and adds that block's float sums (at most FXQ_SUMS of them) to `partial` in double. One
 * clamp pair for the tensor (rows == 1): the blocks on several threads, their sums reduced into sums[0..k); one per
 * row: a row per iteration, its sums into sums[k * row + j]. Shared by the round-clamp and the noise backward. */
#define FXQ_SUMS 4
typedef void (*fxq_block_pass)(const void *state, int64_t row, int64_t start, int64_t end, double *partial);

static void fxq_blocks_backward(fxq_block_pass block, const void *state, int64_t rows, int64_t row_len, int k,
                                double *sums, int threads) {
    if (rows == 1) {
        double total[FXQ_SUMS] = {0.0, 0.0, 0.0, 0.0};
        int64_t blocks = (row_len + FXQ_BLOCK - 1) / FXQ_BLOCK;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : total[:FXQ_SUMS]) \
    if (row_len >= FXQ_PARALLEL_MIN)
        for (int64_t b = 0; b < blocks; ++b) {
            int64_t start = b * FXQ_BLOCK;
            double partial[FXQ_SUMS] = {0.0, 0.0, 0.0, 0.0};
            block(state, 0, start, start + FXQ_BLOCK < row_len ? start + FXQ_BLOCK : row_len, partial);
            for (int j = 0; j < FXQ_SUMS; ++j) {
                total[j] += partial[j];
            }
        }
        for (int j = 0; j < k; ++j) {
            sums[j] = total[j];
        }
        return;
    }
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * row_len >= FXQ_PARALLEL_MIN)
    for (int64_t r = 0; r < rows; ++r) {
        double partial[FXQ_SUMS] = {0.0, 0.0, 0.0, 0.0};
        int64_t row_end = (r + 1) * row_len;
        for (int64_t start = r * row_len; start < row_end; start += FXQ_BLOCK) {
            block(state, r, start, start + FXQ_BLOCK < row_end ? start + FXQ_BLOCK : row_end, partial);
        }
        for (int j = 0; j < k; ++j) {
            sums[k * r + j] = partial[j];
        }
    }
}

/* the round-clamp backward's arrays: one step and clamp pair per row (one for the tensor when rows == 1) */
struct fxq_round_state {
    const float *grad, *x, *step, *lo, *hi;
    float *grad_in;
};

static void fxq_round_block(const void *state, int64_t row, int64_t start, int64_t end, double *partial) {
    const struct fxq_round_state *s = (const struct fxq_round_state *)state;
    fxq_backward_block(s->grad, s->x, s->grad_in, start, end, s->step[row], s->lo[row], s->hi[row], partial);
}

void fxq_round_clamp_backward(const float *grad, const float *x, float *grad_in, int64_t n, float step, float lo,
                              float hi, double *sums, int threads) {
    struct fxq_round_state state = {grad, x, &step, &lo, &hi, grad_in};
    fxq_blocks_backward(fxq_round_block, &state, 1, n, 4, sums, threads);
}

void fxq_round_clamp_rows_forward(const float *x, float *out, int64_t rows, int64_t row_len, const float *step,
                                  const float *lo, const float *hi, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * row_len >= FXQ_PARALLEL_MIN)
    for (int64_t r = 0; r < rows; ++r) {
        const float s = step[r], l = lo[r], h = hi[r];
        const float *xr = x + r * row_len;
        float *outr = out + r * row_len;
#pragma omp simd
        for (int64_t i = 0; i < row_len; ++i) {
            outr[i] = fxq_round_half_even(fxq_scaled(xr[i], s, l, h)) * s;
        }
    }
}

void fxq_round_clamp_rows_backward(const float *grad, const float *x, float *grad_in, int64_t rows, int64_t row_len,
                                   const float *step, const float *lo, const float *hi, double *sums, int threads) {
    struct fxq_round_state state = {grad, x, step, lo, hi, grad_in};
    fxq_blocks_backward(fxq_round_block, &state, rows, row_len, 4, sums, threads);
}

/* NaN propagates, as through numpy's maximum and minimum (of two equal values the first is kept: the sign of a zero
 * may differ from numpy's there, never in the step or the grid) */
static inline float fxq_maximum(float a, float b) { return (a >= b || isnan(a)) ? a : b; }
static inline float fxq_minimum(float a, float b) { return (a <= b || isnan(a)) ? a : b; }

/* The code range of a grid (`numerics.GridConstants.code_range`): an asymmetric grid with a zero point, or a symmetric
 * one (zero point 0) with narrow codes -L..L or full-range codes -(L + 1)..L. */
enum { FXQ_ASYMMETRIC = 0, FXQ_NARROW = 1, FXQ_FULL_RANGE = 2 };

/* The codes a symmetric grid has below -L: 1 for full-range codes, else 0. */
static inline float fxq_extra_negative(int code_range) { return code_range == FXQ_FULL_RANGE ? 1.0f : 0.0f; }

enum { FXQ_LO_V, FXQ_RATIO, FXQ_STEP, FXQ_ZERO_POINT, FXQ_LO_GRID, FXQ_HI_GRID, FXQ_HI_FREE, FXQ_LO_FREE, FXQ_GRID_ROWS };

/* The training grid of clamps hi (and lo; NULL when symmetric) per row, at the integer bits of the bits parameter
 * *p_value, as `numerics.grid_values` defines it: B = round(min_bits + span * clamp(p, 0, 1)) (Python's min/max: NaN
 * stays NaN), L = 2^(B-1) - 1 (symmetric) or 2^B - 1; lo_v = min(lo, 0) (0 symmetric), ratio = (max(hi, 0) - lo_v) / L,
 * step = max(ratio, min_step); symmetric (FXQ_NARROW or FXQ_FULL_RANGE): zero point 0, grid [-step (L + e), step L]
 * with e = 1 for full-range codes -(L + 1)..L and 0 for narrow ones -L..L; else (FXQ_ASYMMETRIC) zp = round(-lo_v /
 * step), [-zp step, -zp step + step L]; hi_free = hi >= 0, lo_free = lo <= 0 (1 symmetric). grid holds FXQ_GRID_ROWS
 * arrays of `rows` floats in the enum's order; bits_levels receives B and L.
 * The parameters' values (p, then hi, then lo) are copied to `values` (1 + 2 rows floats); when `previous` (such a
 * copy from an earlier call, or NULL) holds the same bits, nothing else is written and 0 is returned (the grid of
 * that call still holds); else the grid is computed and 1 returned. */
int fxq_grid_rows(const float *hi, const float *lo, int64_t rows, const float *p_value, float min_bits, float span,
                  float min_step, int code_range, const float *previous, float *values, float *grid,
                  float *bits_levels) {
    int symmetric = code_range != FXQ_ASYMMETRIC;
    float below = fxq_extra_negative(code_range);
    values[0] = *p_value;
    memcpy(values + 1, hi, (size_t)rows * sizeof(float));
    if (symmetric) {
        memset(values + 1 + rows, 0, (size_t)rows * sizeof(float));
    } else {
        memcpy(values + 1 + rows, lo, (size_t)rows * sizeof(float));
    }
    if (previous != NULL && memcmp(previous, values, (size_t)(1 + 2 * rows) * sizeof(float)) == 0) {
        return 0;
    }
    float p = values[0];
    float clamped = 0.0f > p ? 0.0f : p;
    clamped = 1.0f < clamped ? 1.0f : clamped;
    float product = span * clamped;
    float bits = fxq_round_half_even(min_bits + product);
    float levels = (float)(pow(2.0, symmetric ? (double)bits - 1.0 : (double)bits) - 1.0);
    bits_levels[0] = bits;
    bits_levels[1] = levels;
    for (int64_t r = 0; r < rows; ++r) {
        float hi_v = fxq_maximum(hi[r], 0.0f);
        float lo_v = symmetric ? 0.0f : fxq_minimum(lo[r], 0.0f);
        float ratio = symmetric ? hi_v / levels : (hi_v - lo_v) / levels;
        float step = fxq_maximum(ratio, min_step);
        float zero_point, lo_grid, hi_grid;
        if (symmetric) {
            float span_grid = step * levels;
            zero_point = 0.0f;
            lo_grid = -step * (levels + below);
            hi_grid = span_grid;
        } else {
            float negated = -lo_v;
            zero_point = fxq_round_half_even(negated / step);
            lo_grid = -zero_point * step;
            float span_grid = step * levels;
            hi_grid = lo_grid + span_grid;
        }
        grid[FXQ_LO_V * rows + r] = lo_v;
        grid[FXQ_RATIO * rows + r] = ratio;
        grid[FXQ_STEP * rows + r] = step;
        grid[FXQ_ZERO_POINT * rows + r] = zero_point;
        grid[FXQ_LO_GRID * rows + r] = lo_grid;
        grid[FXQ_HI_GRID * rows + r] = hi_grid;
        grid[FXQ_HI_FREE * rows + r] = hi[r] >= 0.0f ? 1.0f : 0.0f;
        grid[FXQ_LO_FREE * rows + r] = symmetric || lo[r] <= 0.0f ? 1.0f : 0.0f;
    }
    return 1;
}

/* The backward of the grid (`numerics._FusedRounding.numbers_backward`), in double from the round-clamp backward's
 * sums (4 per row: below lo, above hi, the residual dot product, the square sum): the step's gradient -dot plus the
 * dither (draws: one float32 Gaussian per row, scaled by sqrt(square / 12) in float32, the correctly rounded square
 * root, which torch's vectorised one matches but for an ulp in <1% of values; or extra: a dither already computed,
 * per row; both NULL without dither), chained through the grid with straight-through
 * roundings and the clamps' gradient scale. Writes d_hi and d_lo (float32, per row; d_lo NULL when not wanted) and
 * d_bits (NULL when not wanted): the one bits parameter's gradient, ((d_levels (L + 1)) ln2) span in double, with
 * d_levels the gradient of L summed over the rows, which is returned. */
double fxq_grid_rows_backward(const double *sums, const float *draws, const double *extra, const float *grid,
                              int64_t rows, float levels_f, float min_step, int code_range, double clamp_grad_scale,
                              float *d_hi, float *d_lo, float *d_bits, double ln2, double span) {
    double levels = (double)levels_f, d_levels_sum = 0.0;
    int symmetric = code_range != FXQ_ASYMMETRIC;
    double below = (double)fxq_extra_negative(code_range);
    for (int64_t r = 0; r < rows; ++r) {
        double g_lo = sums[4 * r], g_hi = sums[4 * r + 1], dot = sums[4 * r + 2], square = sums[4 * r + 3];
        double g_step = -dot;
        if (draws != NULL) {
            float variance = (float)square / 12.0f;
            float dither = draws[r] * sqrtf(variance);
            g_step = g_step + (double)dither;
        } else if (extra != NULL) {
            g_step = g_step + extra[r];
        }
        double step = (double)grid[FXQ_STEP * rows + r];
        double d_step, d_levels, d_lo_v;
        if (symmetric) {
            /* hi_grid = step L, lo_grid = -step (L + e) */
            double difference = g_hi - g_lo;
            double levels_part = levels * difference - below * g_lo;
            d_step = g_step + levels_part;
            d_levels = step * difference;
            d_lo_v = 0.0;
        } else {
            double g_lo_total = g_lo + g_hi;
            double d_zero_point = -step * g_lo_total;
            double lo_v = (double)grid[FXQ_LO_V * rows + r];
            double zero_point = (double)grid[FXQ_ZERO_POINT * rows + r];
            double zero_point_part = zero_point * g_lo_total;
            double levels_part = levels * g_hi;
            double numerator = d_zero_point * lo_v;
            double step_square = step * step;
            double lo_v_part = numerator / step_square;
            d_step = ((g_step - zero_point_part) + levels_part) + lo_v_part;
            d_levels = step * g_hi;
            d_lo_v = -d_zero_point / step;
        }
        float ratio_f = grid[FXQ_RATIO * rows + r];
        double d_ratio = ratio_f >= min_step ? d_step : 0.0;
        double ratio_part = d_ratio * (double)ratio_f;
        d_levels = d_levels - ratio_part / levels;
        d_levels_sum += d_levels;
        double d_hi_v = d_ratio / levels;
        double scaled_hi = d_hi_v * clamp_grad_scale;
        d_hi[r] = grid[FXQ_HI_FREE * rows + r] != 0.0f ? (float)scaled_hi : 0.0f;
        if (d_lo != NULL) {
            double shifted = d_lo_v - d_hi_v;
            double scaled_lo = shifted * clamp_grad_scale;
            d_lo[r] = grid[FXQ_LO_FREE * rows + r] != 0.0f ? (float)scaled_lo : 0.0f;
        }
    }
    if (d_bits != NULL) {
        double value = d_levels_sum * (levels + 1.0);
        value = value * ln2;
        value = value * span;
        d_bits[0] = (float)value;
    }
    return d_levels_sum;
}

/* The int32 bias of `BiasQuantizer._rounded` in float32: scale = input_scale * weight_scale[c] (one weight scale, or
 * one per channel), codes = round_half_even(bias / scale); out = codes * scale when every code is finite and below
 * 2^31 in magnitude (fits int32), else the bias unchanged. Returns whether the codes fit. */
int fxq_round_bias(const float *bias, int64_t n, float input_scale, const float *weight_scale, int64_t scales,
                   float *out) {
    int fits = 1;
    for (int64_t c = 0; c < n; ++c) {
        float scale = input_scale * weight_scale[scales == 1 ? 0 : c];
        float code = fxq_round_half_even(bias[c] / scale);
        if (!(fabsf(code) < 0x1p31f)) {
            fits = 0;
        }
        out[c] = code * scale;
    }
    if (!fits) {
        for (int64_t c = 0; c < n; ++c) {
            out[c] = bias[c];
        }
    }
    return fits;
}

/* One quantizer's training forward on its grid (`numerics._FusedRounding`): the round-clamp of x, one step and clamp
 * pair for the tensor (rows == 1: the element loop, on several threads) or one per row, read from `grid`
 * (fxq_grid_rows' arrays of `rows` floats each). One call instead of a Python wrapper's per-row or per-tensor choice. */
void fxq_quantize_forward(const float *x, float *out, int64_t rows, int64_t row_len, const float *grid, int threads) {
    const float *step = grid + FXQ_STEP * rows, *lo = grid + FXQ_LO_GRID * rows, *hi = grid + FXQ_HI_GRID * rows;
    if (rows == 1) {
        fxq_round_clamp_forward(x, out, row_len, step[0], lo[0], hi[0], threads);
    } else {
        fxq_round_clamp_rows_forward(x, out, rows, row_len, step, lo, hi, threads);
    }
}

/* Its backward: grad_in and the four sums of each row into `sums` (as fxq_round_clamp_backward / _rows_backward);
 * then, when `chain` is set, the sums chained through the grid by fxq_grid_rows_backward (`draws`: NULL without
 * dither), which writes d_hi, d_lo and d_bits; without `chain` (a dither that draws every sign needs grad_in first)
 * the caller chains the sums. */
void fxq_quantize_backward(const float *grad, const float *x, float *grad_in, int64_t rows, int64_t row_len,
                           const float *grid, float levels, float min_step, int code_range, double clamp_grad_scale,
                           const float *draws, float *d_hi, float *d_lo, float *d_bits, double ln2, double span,
                           double *sums, int chain, int threads) {
    const float *step = grid + FXQ_STEP * rows, *lo = grid + FXQ_LO_GRID * rows, *hi = grid + FXQ_HI_GRID * rows;
    if (rows == 1) {
        fxq_round_clamp_backward(grad, x, grad_in, row_len, step[0], lo[0], hi[0], sums, threads);
    } else {
        fxq_round_clamp_rows_backward(grad, x, grad_in, rows, row_len, step, lo, hi, sums, threads);
    }
    if (chain) {
        fxq_grid_rows_backward(sums, draws, NULL, grid, rows, levels, min_step, code_range, clamp_grad_scale, d_hi, d_lo,
                               d_bits, ln2, span);
    }
}

/* ---- DiffQ's pseudo-quantization noise ------------------------------------------------------------------------- */

/* splitmix64's finaliser (Steele, Lea and Flood, "Fast splittable pseudorandom number generators", 2014): a
 * bijective mix of 64 bits, whose outputs for consecutive counters pass BigCrush */
static inline uint64_t fxq_mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* eps for element i of a draw seeded `seed`: the top 24 bits of the mixed counter as a float in [0, 1), less 1/2
 * (exact: every value is a multiple of 2^-24) */
static inline float fxq_noise_uniform(uint64_t seed, int64_t i) {
    uint64_t r = fxq_mix64(seed + (uint64_t)i * 0x9E3779B97F4A7C15ULL);
    return (float)(r >> 40) * 0x1p-24f - 0.5f;
}

/* out = clamp(x, lo, hi) + step * eps: one step and clamp pair for the tensor when rows == 1, else one per row of
 * row_len elements */
void fxq_noise_forward(const float *x, float *out, int64_t rows, int64_t row_len, const float *step, const float *lo,
                       const float *hi, uint64_t seed, int threads) {
    if (rows == 1) {
        const float s = step[0], l = lo[0], h = hi[0];
#pragma omp parallel for simd num_threads(threads) schedule(static) if (row_len >= FXQ_PARALLEL_MIN)
        for (int64_t i = 0; i < row_len; ++i) {
            out[i] = fxq_clamped(x[i], l, h) + s * fxq_noise_uniform(seed, i);
        }
        return;
    }
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * row_len >= FXQ_PARALLEL_MIN)
    for (int64_t r = 0; r < rows; ++r) {
        const float s = step[r], l = lo[r], h = hi[r];
        const int64_t start = r * row_len;
#pragma omp simd
        for (int64_t i = start; i < start + row_len; ++i) {
            out[i] = fxq_clamped(x[i], l, h) + s * fxq_noise_uniform(seed, i);
        }
    }
}

/* elements [start, end): grad_in = grad where lo <= x <= hi (NaN: 0), and three float sums added to partial in
 * double: grad where x < lo, grad where x > hi, grad * eps (the step's gradient) */
static inline void fxq_noise_block(const float *grad, const float *x, float *grad_in, int64_t start, int64_t end,
                                   float lo, float hi, uint64_t seed, double *partial) {
    float block_below = 0.0f, block_above = 0.0f, block_dot = 0.0f;
#pragma omp simd reduction(+ : block_below, block_above, block_dot)
    for (int64_t i = start; i < end; ++i) {
        float v = x[i], g = grad[i];
        grad_in[i] = (v >= lo && v <= hi) ? g : 0.0f;
        block_below += v < lo ? g : 0.0f;
        block_above += v > hi ? g : 0.0f;
        block_dot += g * fxq_noise_uniform(seed, i);
    }
    partial[0] += block_below;
    partial[1] += block_above;
    partial[2] += block_dot;
}

/* the noise backward's arrays and seed */
struct fxq_noise_state {
    const float *grad, *x, *lo, *hi;
    float *grad_in;
    uint64_t seed;
};

static void fxq_noise_rows_block(const void *state, int64_t row, int64_t start, int64_t end, double *partial) {
    const struct fxq_noise_state *s = (const struct fxq_noise_state *)state;
    fxq_noise_block(s->grad, s->x, s->grad_in, start, end, s->lo[row], s->hi[row], s->seed, partial);
}

/* the backward of fxq_noise_forward (the same seed): grad_in, and per row (sums[3 * row + k]) the three sums */
void fxq_noise_backward(const float *grad, const float *x, float *grad_in, int64_t rows, int64_t row_len,
                        const float *lo, const float *hi, uint64_t seed, double *sums, int threads) {
    struct fxq_noise_state state = {grad, x, lo, hi, grad_in, seed};
    fxq_blocks_backward(fxq_noise_rows_block, &state, rows, row_len, 3, sums, threads);
}
