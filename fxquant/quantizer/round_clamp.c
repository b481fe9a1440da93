/* fxquant's fused CPU kernels of the straight-through round-clamp (fxquant/quantizer/fused_cpu.py builds and
 * loads this file; docs/decisions.md, "A fused CPU kernel for per-tensor quantizers").
 *
 * One pass forward and one pass backward over a float32 tensor quantized with one clamp pair [lo, hi] and one
 * step (a per-tensor activation quantizer), where torch's ops make five passes forward and about as many
 * backward. The values are those of `numerics._RoundClamp`, with u = clamp(x, lo, hi) / step:
 *
 *   forward:  out = step * round_half_even(u)
 *   backward: grad_in = grad where lo <= x <= hi, 0 elsewhere (NaN included); and four sums: grad where x < lo,
 *             grad where x > hi, sum(grad_in * (u - round(u))) (the step's gradient is its negation), sum(grad_in^2) (the
 *             dither's variance). It reads x again and recomputes u - round(u) (the same arithmetic as the
 *             forward): storing it would cost a write and a tensor of x's size, and x is kept for the backward
 *             anyway (by the op that made it, and by autograd here).
 *
 * The `_rows` variants do the same for a tensor whose rows (its first axis, e.g. a weight's output channels) each
 * have their own step and clamp pair (a per-channel weight quantizer): the arrays step, lo and hi hold one value
 * per row, and the backward writes the four sums of each row (sums[4 * row + k]).
 *
 * Built with OpenMP: inside a process that imported torch, the loader finds torch's own libgomp.so.1 already
 * loaded, so both share one thread pool. No -ffast-math: the rounding below relies on IEEE float arithmetic.
 */
#include <math.h>
#include <stdint.h>

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

int fxq_abi_version(void) { return 4; }

/* the clamped element divided by the step, as the forward computes it (NaN stays NaN, as torch.clamp) */
static inline float fxq_scaled(float v, float step, float lo, float hi) {
    float c = v < lo ? lo : v;
    c = c > hi ? hi : c;
    return c / step;
}

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
        block_square += inside * inside;
    }
    partial[0] += block_below;
    partial[1] += block_above;
    partial[2] += block_dot;
    partial[3] += block_square;
}

void fxq_round_clamp_backward(const float *grad, const float *x, float *grad_in, int64_t n, float step, float lo,
                              float hi, double *sums, int threads) {
    double below = 0.0, above = 0.0, dot = 0.0, square = 0.0;
    int64_t blocks = (n + FXQ_BLOCK - 1) / FXQ_BLOCK;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : below, above, dot, square) \
    if (n >= FXQ_PARALLEL_MIN)
    for (int64_t b = 0; b < blocks; ++b) {
        int64_t start = b * FXQ_BLOCK;
        double partial[4] = {0.0, 0.0, 0.0, 0.0};
        fxq_backward_block(grad, x, grad_in, start, start + FXQ_BLOCK < n ? start + FXQ_BLOCK : n, step, lo, hi, partial);
        below += partial[0];
        above += partial[1];
        dot += partial[2];
        square += partial[3];
    }
    sums[0] = below;
    sums[1] = above;
    sums[2] = dot;
    sums[3] = square;
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
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * row_len >= FXQ_PARALLEL_MIN)
    for (int64_t r = 0; r < rows; ++r) {
        double partial[4] = {0.0, 0.0, 0.0, 0.0};
        int64_t row_end = (r + 1) * row_len;
        for (int64_t start = r * row_len; start < row_end; start += FXQ_BLOCK) {
            fxq_backward_block(grad, x, grad_in, start, start + FXQ_BLOCK < row_end ? start + FXQ_BLOCK : row_end, step[r],
                               lo[r], hi[r], partial);
        }
        for (int k = 0; k < 4; ++k) {
            sums[4 * r + k] = partial[k];
        }
    }
}
