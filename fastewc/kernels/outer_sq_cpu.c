/* Squared per-sample gradients of a linear map over a short sequence, summed, on the CPU, fused:
 *
 *     total[o, i] += alpha * sum_s w[s]^2 ( sum_t G[n, t, o] * A[n, t, i] )^2,  n = picks[s]
 *     bias[o]     += alpha * sum_s w[s]^2 ( sum_t G[n, t, o] )^2           (when bias is not NULL)
 *
 * (either alone: total or bias may be NULL).
 *
 * G holds the output gradients and A the inputs of n samples over T positions; the inner sum is
 * sample n's gradient of the weight. Compiled on the user's machine by
 * fastewc.fisher.rules.outer_cpu (with the system C compiler, cached) and called through ctypes.
 *
 * Why C: the same sum in PyTorch forms every sample's [O, I] gradient in memory (a batched
 * product whose inner dimension T is too short for the BLAS to run at speed), then reads it back
 * to square it. Here each 6 x 2W tile of one sample's gradient is built in registers over the T
 * positions, squared and added into the total while still in registers; the sample's inputs and
 * gradients stay in cache while its tiles are visited. Over long sequences the batched product
 * is efficient and the caller keeps it. A bias's gradient is the weight's against an input of
 * ones; its sums are formed from each sample's gradients while they are in cache too.
 *
 * Threads: the rows of total are split into one contiguous share per thread (no two threads
 * write the same row). Built with OpenMP, the parallel region runs on the process's OpenMP
 * runtime; the caller passes threads > 1 only when that runtime is the one PyTorch itself uses
 * (a second runtime's threads would compete with PyTorch's spinning ones for the same cores).
 * Without OpenMP the pragma is ignored and the call runs on the calling thread.
 *
 * Arguments (element counts and strides in elements, not bytes):
 *   n, T, O, I          samples, positions, rows of total (outputs), columns of total (inputs);
 *   G, sgn, sgt, sgo    G[n, t, o] = G[n * sgn + t * sgt + o * sgo];
 *   A, san, sat         A[n, t, i] = A[n * san + t * sat + i] (columns contiguous);
 *   total               [O, I], row-major, contiguous: added into; or NULL for the bias alone;
 *   bias                [O], contiguous: added into; or NULL for no bias;
 *   alpha               the factor of every square (a mean loss's 1 / N^2; 1 for plain sums);
 *   picks               the n samples to sum, by their index in G and A (a tracked subset of a
 *                       batch); or NULL for samples 0 .. n - 1;
 *   weights             [n]: each picked sample's gradient is scaled by its weight (its loss's
 *                       share of a token mean); or NULL for 1;
 *   threads             the most threads to use (1: the calling thread only).
 * Sums are kept in the data's dtype (float32 or float64), as the batched product does.
 */

#include <stdint.h>

#define ROWS 6 /* rows of a register tile: 6 x 2 accumulators + 2 input vectors + 1 broadcast */
#define L1_INPUT_BYTES 16384 /* a column block's inputs: half a typical L1 data cache */
#define BIAS_ROWS 64 /* a bias's rows summed at once, in a local array */

/* One dtype's kernel: V is its vector type of W lanes (32 or 64 bytes, below), aligned as S is (unaligned
 * loads and stores; the GCC and Clang vector extension), SPLAT(x) the vector of W copies of x
 * (written out: compilers turn that into one broadcast, a loop over lanes into W inserts). */
#define DEFINE_OUTER_SQ(NAME, S, V, W, SPLAT)                                                            \
    /* One sample's element (o, i) of the gradient, for the columns the tiles do not cover. */   \
    static inline S NAME##_dot(const S *g, int64_t sgt, const S *a, int64_t sat, int64_t T) {     \
        S s = 0;                                                                                  \
        for (int64_t t = 0; t < T; t++)                                                           \
            s += g[t * sgt] * a[t * sat];                                                         \
        return s;                                                                                 \
    }                                                                                             \
                                                                                                  \
    /* One tile: rows [o, o + R) and columns [i, i + C W) of one sample's gradient (C = 2 vectors   \
     * per row, or 1 for leftover columns), built in registers over the T positions, squared and    \
     * added into total. R and C are constants in each caller, so the loops over rows and vectors  \
     * unroll and the accumulators stay in registers. */                                          \
    static inline __attribute__((always_inline)) void NAME##_tile(                                \
        int R, int C, int64_t T, int64_t I, const S *Gs, int64_t sgt, int64_t sgo, const S *As,   \
        int64_t sat, S *total, S alpha, int64_t o, int64_t i) {                                   \
        V acc[ROWS][2];                                                                           \
        for (int r = 0; r < R; r++)                                                               \
            for (int c = 0; c < C; c++)                                                           \
                acc[r][c] = (V){0};                                                               \
        for (int64_t t = 0; t < T; t++) {                                                         \
            const S *at = As + t * sat + i, *gt = Gs + t * sgt + o * sgo;                         \
            V a[2];                                                                               \
            for (int c = 0; c < C; c++)                                                           \
                a[c] = *(const V *)(at + c * W);                                                  \
            for (int r = 0; r < R; r++) {                                                         \
                V g = SPLAT(gt[r * sgo]);                                                         \
                for (int c = 0; c < C; c++)                                                       \
                    acc[r][c] += g * a[c];                                                        \
            }                                                                                     \
        }                                                                                         \
        for (int r = 0; r < R; r++)                                                               \
            for (int c = 0; c < C; c++) {                                                         \
                S *dst = total + (o + r) * I + i + c * W;                                         \
                *(V *)dst += SPLAT(alpha) * acc[r][c] * acc[r][c];                                \
            }                                                                                     \
    }                                                                                             \
                                                                                                  \
    /* The tiles of rows [o, o + rows) and C vectors of columns from i: a constant row count per  \
     * call of NAME##_tile. */                                                                    \
    static inline __attribute__((always_inline)) void NAME##_tiles(                               \
        int rows, int C, int64_t T, int64_t I, const S *Gs, int64_t sgt, int64_t sgo,             \
        const S *As, int64_t sat, S *total, S alpha, int64_t o, int64_t i) {                      \
        switch (rows) {                                                                           \
        case 6: NAME##_tile(6, C, T, I, Gs, sgt, sgo, As, sat, total, alpha, o, i); break;        \
        case 5: NAME##_tile(5, C, T, I, Gs, sgt, sgo, As, sat, total, alpha, o, i); break;        \
        case 4: NAME##_tile(4, C, T, I, Gs, sgt, sgo, As, sat, total, alpha, o, i); break;        \
        case 3: NAME##_tile(3, C, T, I, Gs, sgt, sgo, As, sat, total, alpha, o, i); break;        \
        case 2: NAME##_tile(2, C, T, I, Gs, sgt, sgo, As, sat, total, alpha, o, i); break;        \
        default: NAME##_tile(1, C, T, I, Gs, sgt, sgo, As, sat, total, alpha, o, i); break;       \
        }                                                                                         \
    }                                                                                             \
                                                                                                  \
    /* Rows [o0, o1) of total, every sample. A sample's columns are visited in blocks whose      \
     * inputs (T x block) stay in the L1 cache while every row tile passes over them. */          \
    static void NAME##_rows(int64_t n, int64_t T, int64_t I, const S *G, int64_t sgn,             \
                            int64_t sgt, int64_t sgo, const S *A, int64_t san, int64_t sat,       \
                            S *total, S *bias, S alpha, const int64_t *picks, const S *weights,   \
                            int64_t o0, int64_t o1) {                                             \
        int64_t block = L1_INPUT_BYTES / ((int64_t)sizeof(S) * (T > 0 ? T : 1)) / (2 * W) * (2 * W); \
        if (block < 2 * W)                                                                        \
            block = 2 * W;                                                                        \
        for (int64_t s = 0; s < n; s++) {                                                         \
            const int64_t at = picks ? picks[s] : s;                                              \
            const S *Gs = G + at * sgn, *As = A + at * san;                                       \
            const S a = weights ? alpha * weights[s] * weights[s] : alpha;                        \
            if (bias) /* BIAS_ROWS rows at once: the positions' rows added a vector at a time */  \
                for (int64_t o = o0; o < o1; o += BIAS_ROWS) {                                    \
                    const int64_t m = o1 - o < BIAS_ROWS ? o1 - o : BIAS_ROWS;                    \
                    S v[BIAS_ROWS];                                                               \
                    for (int64_t r = 0; r < m; r++)                                               \
                        v[r] = 0;                                                                 \
                    for (int64_t t = 0; t < T; t++) {                                             \
                        const S *g = Gs + t * sgt + o * sgo;                                      \
                        for (int64_t r = 0; r < m; r++)                                           \
                            v[r] += g[r * sgo];                                                   \
                    }                                                                             \
                    for (int64_t r = 0; r < m; r++)                                               \
                        bias[o + r] += a * v[r] * v[r];                                           \
                }                                                                                 \
            if (!total)                                                                           \
                continue;                                                                         \
            for (int64_t i0 = 0; i0 < I; i0 += block) {                                           \
                int64_t i1 = I - i0 < block ? I : i0 + block;                                     \
                for (int64_t o = o0; o < o1; o += ROWS) {                                         \
                    int64_t i = i0;                                                               \
                    int rows = o1 - o < ROWS ? (int)(o1 - o) : ROWS;                              \
                    for (; i + 2 * W <= i1; i += 2 * W)                                           \
                        NAME##_tiles(rows, 2, T, I, Gs, sgt, sgo, As, sat, total, a, o, i);       \
                    if (i + W <= i1) { /* leftover columns: a tile one vector wide */             \
                        NAME##_tiles(rows, 1, T, I, Gs, sgt, sgo, As, sat, total, a, o, i);       \
                        i += W;                                                                   \
                    }                                                                             \
                    for (; i < i1; i++)                                                           \
                        for (int r = 0; r < rows; r++) {                                          \
                            S v = NAME##_dot(Gs + (o + r) * sgo, sgt, As + i, sat, T);            \
                            total[(o + r) * I + i] += a * v * v;                                  \
                        }                                                                         \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
    }                                                                                             \
                                                                                                  \
    void NAME(int64_t n, int64_t T, int64_t O, int64_t I, const S *G, int64_t sgn, int64_t sgt,   \
              int64_t sgo, const S *A, int64_t san, int64_t sat, S *total, S *bias,               \
              double alpha, const int64_t *picks, const S *weights, int64_t threads) {            \
        int64_t tiles = (O + ROWS - 1) / ROWS;                                                    \
        int64_t parts = threads < tiles ? threads : tiles;                                        \
        if (parts < 1)                                                                            \
            parts = 1;                                                                            \
        _Pragma("omp parallel for num_threads(parts) schedule(static) if(parts > 1)")             \
        for (int64_t k = 0; k < parts; k++) {                                                     \
            int64_t lo = tiles * k / parts * ROWS, hi = tiles * (k + 1) / parts * ROWS;           \
            NAME##_rows(n, T, I, G, sgn, sgt, sgo, A, san, sat, total, bias, (S)alpha, picks,     \
                        weights, lo, hi < O ? hi : O);                                            \
        }                                                                                         \
    }

#if defined(__AVX512F__)
/* Built for a CPU with 64-byte vector registers (-march=native on one): tiles twice as wide, so
 * each broadcast and each load feeds twice the multiply-adds; with 32-byte vectors the tiles'
 * loads, not their arithmetic, bound the kernel there. */
typedef float vf __attribute__((vector_size(64), aligned(4)));
typedef double vd __attribute__((vector_size(64), aligned(8)));
#define WF 16
#define WD 8
#define SPLATF(x) ((vf){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x})
#define SPLATD(x) ((vd){x, x, x, x, x, x, x, x})
#else
typedef float vf __attribute__((vector_size(32), aligned(4)));
typedef double vd __attribute__((vector_size(32), aligned(8)));
#define WF 8
#define WD 4
#define SPLATF(x) ((vf){x, x, x, x, x, x, x, x})
#define SPLATD(x) ((vd){x, x, x, x})
#endif

DEFINE_OUTER_SQ(outer_sq_f32, float, vf, WF, SPLATF)
DEFINE_OUTER_SQ(outer_sq_f64, double, vd, WD, SPLATD)
