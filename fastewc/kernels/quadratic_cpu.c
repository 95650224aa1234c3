/* The EWC quadratic on the CPU, fused: sum_i A_i (theta_i - m_i)^2 and its gradient in one pass.
 *
 * The C twin of ewc_penalty.py's tile kernel, compiled on the user's machine by
 * fastewc.penalty.backends.cpu_backend (with the system C compiler, cached) and called through
 * ctypes. It knows nothing of EWC beyond the quadratic: A (importance) and m (anchor) are one
 * group's flat buffers in the storage dtype, the live parameters and their gradients are reached
 * through per-segment address tables.
 *
 * Why C: with stock torch ops each cache block of a step is read and written several times
 * (conversions, sub, mul, dot, add, the conversion back); here every element is loaded once,
 * converted in registers and the gradient stored once, so a step moves only the bytes it must.
 *
 * One function per (parameter dtype, storage dtype): float32 or bfloat16 each. Arithmetic is in
 * float32, as in the PyTorch backend; the sum is kept in float32 lanes over short chunks and
 * added into a double per chunk, so long sums lose no more than the chunked float32 dots do.
 * Gradients are rounded to bfloat16 by round-to-nearest-even, NaN to the quiet NaN 0x7FC0 (the
 * rule of torch's scalar conversion).
 *
 * Arguments (all element counts and offsets in elements, addresses as int64):
 *   nseg                number of segments (parameters), sorted by flat offset, not overlapping;
 *   theta[s], grad[s]   addresses of segment s's parameter and gradient (grad unused in mode 0),
 *                       the gradient's relative to grad_base;
 *   offset[s], numel[s] where segment s lies in the flat buffers, and its length;
 *   mode[s]             0: value only; 1: write grad = lam * A (theta - m); 2: grad += the same;
 *   grad_base           added to every grad[s]: 0 for absolute addresses, or a fresh flat
 *                       gradient buffer's address when grad[s] are byte offsets into it (the
 *                       table then stays the same from one fresh buffer to the next);
 *   importance, anchor  the flat buffers;
 *   lo, hi              the flat range this call covers (a thread's share of the group);
 *   lam                 the gradient's factor;
 *   total               out: the sum over the covered range.
 * Calls on disjoint ranges touch disjoint memory, so threads may run them at once.
 */

#include <stdint.h>
#include <string.h>

#define LANES 16   /* independent float32 partial sums: enough for the compiler to vectorise */
#define CHUNK 2048 /* elements summed in float32 before the chunk's sum goes into a double */

static inline float from_f32(float x) { return x; }
static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
static inline float to_f32(float x) { return x; }
static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (u & 0x7FFFFFFFu) > 0x7F800000u ? (uint16_t)0x7FC0u : (uint16_t)rounded;
}

/* One segment piece of n elements: the sum of A d^2 into *total and, by mode, the gradient. */
#define DEFINE_PIECE(NAME, P_T, P_LOAD, P_STORE, S_T, S_LOAD)                                    \
    static void NAME(const P_T *restrict t, const S_T *restrict a, const S_T *restrict m,         \
                     P_T *restrict g, int64_t n, int mode, float lam, double *total) {            \
        for (int64_t base = 0; base < n; base += CHUNK) {                                         \
            int64_t len = n - base < CHUNK ? n - base : CHUNK;                                    \
            int64_t full = len - len % LANES;                                                     \
            const P_T *tc = t + base;                                                             \
            const S_T *ac = a + base, *mc = m + base;                                             \
            P_T *gc = g ? g + base : 0;                                                           \
            float acc[LANES] = {0};                                                               \
            if (mode == 0) {                                                                      \
                for (int64_t i = 0; i < full; i += LANES)                                         \
                    for (int l = 0; l < LANES; l++) {                                             \
                        float d = P_LOAD(tc[i + l]) - S_LOAD(mc[i + l]);                          \
                        acc[l] += S_LOAD(ac[i + l]) * d * d;                                      \
                    }                                                                             \
            } else if (mode == 1) {                                                               \
                for (int64_t i = 0; i < full; i += LANES)                                         \
                    for (int l = 0; l < LANES; l++) {                                             \
                        float d = P_LOAD(tc[i + l]) - S_LOAD(mc[i + l]);                          \
                        float u = S_LOAD(ac[i + l]) * d;                                          \
                        acc[l] += u * d;                                                          \
                        gc[i + l] = P_STORE(lam * u);                                             \
                    }                                                                             \
            } else {                                                                              \
                for (int64_t i = 0; i < full; i += LANES)                                         \
                    for (int l = 0; l < LANES; l++) {                                             \
                        float d = P_LOAD(tc[i + l]) - S_LOAD(mc[i + l]);                          \
                        float u = S_LOAD(ac[i + l]) * d;                                          \
                        acc[l] += u * d;                                                          \
                        gc[i + l] = P_STORE(P_LOAD(gc[i + l]) + lam * u);                         \
                    }                                                                             \
            }                                                                                     \
            for (int64_t i = full; i < len; i++) {                                                \
                float d = P_LOAD(tc[i]) - S_LOAD(mc[i]);                                          \
                float u = S_LOAD(ac[i]) * d;                                                      \
                acc[i - full] += u * d;                                                           \
                if (mode == 1)                                                                    \
                    gc[i] = P_STORE(lam * u);                                                     \
                else if (mode == 2)                                                               \
                    gc[i] = P_STORE(P_LOAD(gc[i]) + lam * u);                                     \
            }                                                                                     \
            double s = 0.0;                                                                       \
            for (int l = 0; l < LANES; l++)                                                       \
                s += acc[l];                                                                      \
            *total += s;                                                                          \
        }                                                                                         \
    }

/* The exported entry point for one dtype pair: the segments' parts inside [lo, hi). */
#define DEFINE_ENTRY(NAME, PIECE, P_T, S_T)                                                       \
    void NAME(int64_t nseg, const int64_t *theta, const int64_t *grad, const int64_t *offset,     \
              const int64_t *numel, const int8_t *mode, int64_t grad_base, const S_T *importance,  \
              const S_T *anchor, int64_t lo, int64_t hi, float lam, double *total) {              \
        double sum = 0.0;                                                                         \
        int64_t first = 0, last = nseg;                                                           \
        while (first < last) { /* the first segment that ends after lo */                        \
            int64_t mid = first + (last - first) / 2;                                             \
            if (offset[mid] + numel[mid] <= lo)                                                   \
                first = mid + 1;                                                                  \
            else                                                                                  \
                last = mid;                                                                       \
        }                                                                                         \
        for (int64_t s = first; s < nseg && offset[s] < hi; s++) {                                \
            int64_t start = offset[s] > lo ? offset[s] : lo;                                      \
            int64_t end = offset[s] + numel[s] < hi ? offset[s] + numel[s] : hi;                  \
            if (end <= start)                                                                     \
                continue;                                                                         \
            int64_t k = start - offset[s];                                                        \
            const P_T *t = (const P_T *)(intptr_t)theta[s] + k;                                   \
            P_T *g = mode[s] ? (P_T *)(intptr_t)(grad_base + grad[s]) + k : 0;                    \
            PIECE(t, importance + start, anchor + start, g, end - start, mode[s], lam, &sum);     \
        }                                                                                         \
        *total = sum;                                                                             \
    }

DEFINE_PIECE(piece_f32_f32, float, from_f32, to_f32, float, from_f32)
DEFINE_PIECE(piece_f32_bf16, float, from_f32, to_f32, uint16_t, from_bf16)
DEFINE_PIECE(piece_bf16_f32, uint16_t, from_bf16, to_bf16, float, from_f32)
DEFINE_PIECE(piece_bf16_bf16, uint16_t, from_bf16, to_bf16, uint16_t, from_bf16)

DEFINE_ENTRY(ewc_quadratic_f32_f32, piece_f32_f32, float, float)
DEFINE_ENTRY(ewc_quadratic_f32_bf16, piece_f32_bf16, float, uint16_t)
DEFINE_ENTRY(ewc_quadratic_bf16_f32, piece_bf16_f32, uint16_t, float)
DEFINE_ENTRY(ewc_quadratic_bf16_bf16, piece_bf16_bf16, uint16_t, uint16_t)
