/* Decode kernels for x86-64 CPUs with AVX2 + FMA: matrix-vector products over a few activation rows
 * whose cost is reading the weights once, and the fused MoE expert step of one token.
 *
 * Built at run time by ernie45/kernels/__init__.py with `gcc -O3 -mavx2 -mfma -fopenmp` and called
 * through ctypes; every entry point has a slow torch reference in Python that the tests compare with.
 *
 * Weights are rows [N, K] read through a `wview`; activations are fp32 [M, K]; results fp32 [M, N].
 *   kind 0  fp32                        w
 *   kind 1  bf16 (raw uint16)           w
 *   kind 2  int8 + fp32 scale per row   q * s[n]
 *   kind 3  int4, 2 codes per byte      (q - 8) * s[n, g] + z[n, g]   (groups of `group` columns)
 *   kind 4  int2, 4 codes per byte      (q - 2) * s[n, g] + z[n, g]
 * Packed codes sit little-end first along K (code j of a byte at bits j*bits: quant/formats.py). For
 * kinds 3/4 the activation row is first permuted so that for each 8-byte chunk (8*per codes) the codes
 * at bit offset j of the 8 bytes meet x values j, j+per, j+2*per, ... (`prep_packed`), and each group's
 * sum of x is precomputed: sum_k x_k w_k = sum_g s_g * (x.q)_g + (z_g - mid * s_g) * (sum x)_g.
 * Each output row is computed by one thread start to end, so results do not depend on thread count.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const void *w;   /* row 0 */
    long ld;         /* bytes between rows */
    const float *s;  /* scales: per row (int8) or per row and group (int4/int2) */
    const float *z;  /* zeros (int4/int2) */
    long sld;        /* scale/zero elements between rows */
    int kind;
    int group;       /* columns per scale (int4/int2) */
} wview;

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

static inline __m256 load_bf16x8(const uint16_t *p) {
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

static inline __m256 load_i8x8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

static inline __m256 load_w8(int kind, const char *row, int k) {
    if (kind == 0) return _mm256_loadu_ps((const float *)row + k);
    if (kind == 1) return load_bf16x8((const uint16_t *)row + k);
    return load_i8x8((const int8_t *)row + k);
}

/* out[r] = dot(x, row n + r) for r < 4 for the float kinds and int8 (row scale applied); K % 16 == 0.
 * Four rows at once share each load of x and give eight independent FMA chains. */
static void dot4_plain(const wview *v, long n, const float *x, int K, float *out) {
    const char *r0 = (const char *)v->w + n * v->ld, *r1 = r0 + v->ld, *r2 = r1 + v->ld, *r3 = r2 + v->ld;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    const int kind = v->kind;
    for (int k = 0; k < K; k += 16) {
        __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
        a0 = _mm256_fmadd_ps(load_w8(kind, r0, k), x0, a0);
        a1 = _mm256_fmadd_ps(load_w8(kind, r1, k), x0, a1);
        a2 = _mm256_fmadd_ps(load_w8(kind, r2, k), x0, a2);
        a3 = _mm256_fmadd_ps(load_w8(kind, r3, k), x0, a3);
        b0 = _mm256_fmadd_ps(load_w8(kind, r0, k + 8), x1, b0);
        b1 = _mm256_fmadd_ps(load_w8(kind, r1, k + 8), x1, b1);
        b2 = _mm256_fmadd_ps(load_w8(kind, r2, k + 8), x1, b2);
        b3 = _mm256_fmadd_ps(load_w8(kind, r3, k + 8), x1, b3);
    }
    out[0] = hsum8(_mm256_add_ps(a0, b0));
    out[1] = hsum8(_mm256_add_ps(a1, b1));
    out[2] = hsum8(_mm256_add_ps(a2, b2));
    out[3] = hsum8(_mm256_add_ps(a3, b3));
    if (kind == 2)
        for (int r = 0; r < 4; r++) out[r] *= v->s[n + r];
}

/* dot(x, row n) for the float kinds and int8; K % 16 == 0 (rows left over after blocks of four). */
static float dot_plain(const wview *v, long n, const float *x, int K) {
    const char *row = (const char *)v->w + n * v->ld;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    for (int k = 0; k < K; k += 16) {
        a0 = _mm256_fmadd_ps(load_w8(v->kind, row, k), _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(load_w8(v->kind, row, k + 8), _mm256_loadu_ps(x + k + 8), a1);
    }
    float d = hsum8(_mm256_add_ps(a0, a1));
    return v->kind == 2 ? d * v->s[n] : d;
}

#define MAX_ROWS 64   /* activation rows one call may carry (M) */
#define CHUNK 512     /* columns of four weight rows converted to fp32 at a time (8 KB) */

/* y[m, n..n+3] for all M rows: the four weight rows are converted to fp32 once per CHUNK columns and
 * reused for every activation row. Each (m, r) keeps the lane accumulators of dot4_plain across chunks,
 * so the result is bit-identical to dot4_plain for any M. M <= MAX_ROWS, K % 16 == 0. */
static void dot4_rows(const wview *v, long n, const float *x, int M, int K, int N, float *y) {
    float buf[4][CHUNK] __attribute__((aligned(32)));
    float acc[MAX_ROWS][4][16] __attribute__((aligned(32)));
    memset(acc, 0, sizeof(float) * 64 * M);
    const char *rows[4] = {(const char *)v->w + n * v->ld, (const char *)v->w + (n + 1) * v->ld,
                           (const char *)v->w + (n + 2) * v->ld, (const char *)v->w + (n + 3) * v->ld};
    for (int k0 = 0; k0 < K; k0 += CHUNK) {
        const int kc = K - k0 < CHUNK ? K - k0 : CHUNK;
        const float *wr[4];
        for (int r = 0; r < 4; r++) {
            if (v->kind == 0) {
                wr[r] = (const float *)rows[r] + k0;
            } else {
                for (int k = 0; k < kc; k += 8) _mm256_store_ps(buf[r] + k, load_w8(v->kind, rows[r], k0 + k));
                wr[r] = buf[r];
            }
        }
        for (int m = 0; m < M; m++) {
            const float *xm = x + (long)m * K + k0;
            float (*am)[16] = acc[m];
            __m256 a0 = _mm256_load_ps(am[0]), b0 = _mm256_load_ps(am[0] + 8);
            __m256 a1 = _mm256_load_ps(am[1]), b1 = _mm256_load_ps(am[1] + 8);
            __m256 a2 = _mm256_load_ps(am[2]), b2 = _mm256_load_ps(am[2] + 8);
            __m256 a3 = _mm256_load_ps(am[3]), b3 = _mm256_load_ps(am[3] + 8);
            for (int k = 0; k < kc; k += 16) {
                __m256 x0 = _mm256_loadu_ps(xm + k), x1 = _mm256_loadu_ps(xm + k + 8);
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(wr[0] + k), x0, a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(wr[1] + k), x0, a1);
                a2 = _mm256_fmadd_ps(_mm256_loadu_ps(wr[2] + k), x0, a2);
                a3 = _mm256_fmadd_ps(_mm256_loadu_ps(wr[3] + k), x0, a3);
                b0 = _mm256_fmadd_ps(_mm256_loadu_ps(wr[0] + k + 8), x1, b0);
                b1 = _mm256_fmadd_ps(_mm256_loadu_ps(wr[1] + k + 8), x1, b1);
                b2 = _mm256_fmadd_ps(_mm256_loadu_ps(wr[2] + k + 8), x1, b2);
                b3 = _mm256_fmadd_ps(_mm256_loadu_ps(wr[3] + k + 8), x1, b3);
            }
            _mm256_store_ps(am[0], a0), _mm256_store_ps(am[0] + 8, b0);
            _mm256_store_ps(am[1], a1), _mm256_store_ps(am[1] + 8, b1);
            _mm256_store_ps(am[2], a2), _mm256_store_ps(am[2] + 8, b2);
            _mm256_store_ps(am[3], a3), _mm256_store_ps(am[3] + 8, b3);
        }
    }
    for (int m = 0; m < M; m++)
        for (int r = 0; r < 4; r++) {
            float d = hsum8(_mm256_add_ps(_mm256_load_ps(acc[m][r]), _mm256_load_ps(acc[m][r] + 8)));
            y[(long)m * N + n + r] = v->kind == 2 ? d * v->s[n + r] : d;
        }
}

/* dot(x, row) for int4/int2: xp = permuted x (K floats), xs = per-group sums of x. */
static float dot_packed(const wview *v, long n, const float *xp, const float *xs, int K) {
    const int bits = v->kind == 3 ? 4 : 2, per = 8 / bits, mid = 1 << (bits - 1);
    const __m256i mask = _mm256_set1_epi32((1 << bits) - 1);
    const uint8_t *row = (const uint8_t *)v->w + n * v->ld;
    const float *s = v->s + n * v->sld, *z = v->z + n * v->sld;
    const int chunks_per_group = v->group / (8 * per), groups = K / v->group;
    __m256 total = _mm256_setzero_ps();
    float offset = 0.f;
    for (int g = 0; g < groups; g++) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0;
        for (int c = 0; c < chunks_per_group; c++) {
            const long chunk = (long)g * chunks_per_group + c;
            __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(row + chunk * 8)));
            const float *xc = xp + chunk * 8 * per;
            for (int j = 0; j < per; j += 2) {
                __m256 q0 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(b, j * bits), mask));
                __m256 q1 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(b, (j + 1) * bits), mask));
                a0 = _mm256_fmadd_ps(q0, _mm256_loadu_ps(xc + j * 8), a0);
                a1 = _mm256_fmadd_ps(q1, _mm256_loadu_ps(xc + (j + 1) * 8), a1);
            }
        }
        total = _mm256_fmadd_ps(_mm256_set1_ps(s[g]), _mm256_add_ps(a0, a1), total);
        offset += (z[g] - mid * s[g]) * xs[g];
    }
    return hsum8(total) + offset;
}

/* Permute one activation row for packed kinds and sum it per group (see the header). */
static void prep_packed(const wview *v, const float *x, int K, float *xp, float *xs) {
    const int per = v->kind == 3 ? 2 : 4;
    for (int chunk = 0; chunk < K / (8 * per); chunk++)
        for (int i = 0; i < 8; i++)
            for (int j = 0; j < per; j++)
                xp[chunk * 8 * per + j * 8 + i] = x[chunk * 8 * per + i * per + j];
    for (int g = 0; g < K / v->group; g++) {
        float acc = 0.f;
        for (int k = 0; k < v->group; k++) acc += x[g * v->group + k];
        xs[g] = acc;
    }
}

static inline int is_packed(const wview *v) { return v->kind >= 3; }

/* Rows [0, N) of y[m] = W x[m] for m < M, inside an enclosing parallel region (work-shared). */
static void gemv_shared(const wview *v, const float *x, int M, int K, int N, float *y, float *xp, float *xs) {
    if (is_packed(v)) {
#pragma omp single
        for (int m = 0; m < M; m++) prep_packed(v, x + (long)m * K, K, xp + (long)m * K, xs + (long)m * (K / v->group));
    }
    if (is_packed(v)) {
#pragma omp for schedule(static)
        for (int n = 0; n < N; n++)
            for (int m = 0; m < M; m++)
                y[(long)m * N + n] = dot_packed(v, n, xp + (long)m * K, xs + (long)m * (K / v->group), K);
        return;
    }
    const int blocks = N / 4;
#pragma omp for schedule(static)
    for (int b = 0; b < blocks + N % 4; b++) {
        if (b < blocks && M > 1) {
            dot4_rows(v, 4L * b, x, M, K, N, y);
            continue;
        }
        for (int m = 0; m < M; m++) {
            if (b < blocks) {
                float out[4];
                dot4_plain(v, 4L * b, x + (long)m * K, K, out);
                for (int r = 0; r < 4; r++) y[(long)m * N + 4 * b + r] = out[r];
            } else {
                const int n = 4 * blocks + (b - blocks);
                y[(long)m * N + n] = dot_plain(v, n, x + (long)m * K, K);
            }
        }
    }
}

/* y [M, N] = x [M, K] @ W^T. Scratch: xp [M*K] and xs [M*K/group] floats (packed kinds only). */
void ernie45_gemv(const wview *v, const float *x, int M, int K, int N, float *y, float *xp, float *xs,
                  int threads) {
#pragma omp parallel num_threads(threads)
    gemv_shared(v, x, M, K, N, y, xp, xs);
}

static inline float round_bf16(float f) {  /* round to nearest even bf16, back to fp32 */
    uint32_t u;
    memcpy(&u, &f, 4);
    u = (u + 0x7fff + ((u >> 16) & 1)) & 0xffff0000u;
    memcpy(&f, &u, 4);
    return f;
}

static wview at_expert(const wview *v, long e, long w_stride, long s_stride) {
    wview r = *v;
    r.w = (const char *)v->w + e * w_stride;
    if (v->s) r.s = v->s + e * s_stride;
    if (v->z) r.z = v->z + e * s_stride;
    return r;
}

/* One token through n experts of a stacked SwiGLU: y [D] = sum_i coef[i] * down_e(silu(gate_e x) * up_e x)
 * with e = ids[i], in the given order. gate/up: [F, D] rows, down: [D, F] rows; *_stride: bytes (and
 * scale elements) between consecutive experts. bf16 != 0 rounds every intermediate to bf16 exactly where
 * the torch reference does (gate, silu, up, product, down, coef * down, each running sum), so a bf16 model
 * gets the reference's numbers up to summation order inside the dot products.
 * Scratch: h [F], xp/xs sized for max(D, F) columns. */
/* Work-shared inside a parallel region: y [D] += sum_i coef[i] * expert_ids[i](x), in the given order,
 * with the torch modules' bf16 rounding points when bf16 != 0 (see ernie45_moe_token). */
static void experts_into(int bf16, const wview *gate, const wview *up, const wview *down, long w_stride_gu,
                         long s_stride_gu, long w_stride_d, long s_stride_d, const long *ids, const float *coef,
                         int n, const float *x, int D, int F, float *y, float *h, float *t, float *xp, float *xs) {
    for (int i = 0; i < n; i++) {
        wview g = at_expert(gate, ids[i], w_stride_gu, s_stride_gu);
        wview u = at_expert(up, ids[i], w_stride_gu, s_stride_gu);
        wview d = at_expert(down, ids[i], w_stride_d, s_stride_d);
        if (is_packed(&g)) {
#pragma omp single
            prep_packed(&g, x, D, xp, xs);
        }
#pragma omp for schedule(static)
        for (int r = 0; r < F; r++) {
            float a = is_packed(&g) ? dot_packed(&g, r, xp, xs, D) : dot_plain(&g, r, x, D);
            float b = is_packed(&u) ? dot_packed(&u, r, xp, xs, D) : dot_plain(&u, r, x, D);
            if (bf16) a = round_bf16(a), b = round_bf16(b);
            float act = a / (1.f + expf(-a));
            h[r] = bf16 ? round_bf16(round_bf16(act) * b) : act * b;
        }
        gemv_shared(&d, h, 1, F, D, t, xp, xs);  /* t [D] = down_e h; its work-sharing loop ends in a barrier */
#pragma omp for schedule(static)
        for (int r = 0; r < D; r++)
            y[r] = bf16 ? round_bf16(y[r] + round_bf16(coef[i] * round_bf16(t[r]))) : y[r] + coef[i] * t[r];
    }
}

void ernie45_moe_token(const wview *gate, const wview *up, const wview *down, long w_stride_gu,
                       long s_stride_gu, long w_stride_d, long s_stride_d, const long *ids, const float *coef,
                       int n, const float *x, int D, int F, float *y, float *h, float *t, float *xp, float *xs,
                       int bf16, int threads) {
#pragma omp parallel num_threads(threads)
    experts_into(bf16, gate, up, down, w_stride_gu, s_stride_gu, w_stride_d, s_stride_d, ids, coef, n, x, D, F, y,
                 h, t, xp, xs);
}

/* Integer screen: y[n] = s[n] * sx * sum_k q[n,k] * xq[k] with int8 weights q [N, K] (row stride ld bytes)
 * and int8 activations xq [K]; exact integer sums (|q|, |xq| <= 127, K % 32 == 0, K < 2^17). Used only
 * where a bound covers the activation rounding (greedy_head.py), never as a model's matmul. */
void ernie45_gemv_i8i8(const int8_t *w, long ld, const float *s, const int8_t *xq, float sx, int K, int N,
                       float *y, int threads) {
    const __m256i ones = _mm256_set1_epi16(1);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int n = 0; n < N; n++) {
        const int8_t *row = w + n * ld;
        __m256i acc = _mm256_setzero_si256();
        for (int k = 0; k < K; k += 32) {
            __m256i q = _mm256_loadu_si256((const __m256i *)(row + k));
            __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + k));
            __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(xv, xv), _mm256_sign_epi8(q, xv));
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, ones));
        }
        __m128i a = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
        a = _mm_add_epi32(a, _mm_shuffle_epi32(a, 0x4e));
        a = _mm_add_epi32(a, _mm_shuffle_epi32(a, 0xb1));
        y[n] = (float)_mm_cvtsi128_si32(a) * s[n] * sx;
    }
}

/* Several tokens through their experts: pairs p (sorted by expert, then token) of (ids[p], tok[p], coef[p]).
 * Each expert runs once on all its rows (M = rows of that expert, at most max_rows): gather x rows,
 * h = silu(gate X) * (up X), Y = down h, y[tok] += coef * Y row, ascending expert then token, with the
 * bf16 reference's rounding points (moe.Experts.grouped: index_add_ into a bf16 output).
 * x [T, D]; y [T, D] fp32 (zeroed by the caller). Scratch: X [max_rows*D], G and U [max_rows*F],
 * Y [max_rows*D], xp [max_rows*max(D,F)], xs [max_rows*max(D,F)]. */
void ernie45_moe_tokens(const wview *gate, const wview *up, const wview *down, long w_stride_gu, long s_stride_gu,
                        long w_stride_d, long s_stride_d, const long *ids, const long *tok, const float *coef,
                        int P, const float *x, int D, int F, float *y, float *X, float *G, float *U, float *Y,
                        float *xp, float *xs, int bf16, int threads) {
#pragma omp parallel num_threads(threads)
    for (int p0 = 0; p0 < P;) {
        int p1 = p0;
        while (p1 < P && ids[p1] == ids[p0]) p1++;
        const int n = p1 - p0;
        wview g = at_expert(gate, ids[p0], w_stride_gu, s_stride_gu), u = at_expert(up, ids[p0], w_stride_gu, s_stride_gu);
        wview d = at_expert(down, ids[p0], w_stride_d, s_stride_d);
#pragma omp for schedule(static)
        for (int r = 0; r < n; r++) memcpy(X + (long)r * D, x + tok[p0 + r] * D, sizeof(float) * D);
        gemv_shared(&g, X, n, D, F, G, xp, xs);
        gemv_shared(&u, X, n, D, F, U, xp, xs);
#pragma omp for schedule(static)
        for (long i = 0; i < (long)n * F; i++) {
            float a = G[i], b = U[i];
            if (bf16) a = round_bf16(a), b = round_bf16(b);
            float act = a / (1.f + expf(-a));
            G[i] = bf16 ? round_bf16(round_bf16(act) * b) : act * b;
        }
        gemv_shared(&d, G, n, F, D, Y, xp, xs);
#pragma omp for schedule(static)
        for (int c = 0; c < D; c++)
            for (int r = 0; r < n; r++) {
                float *o = y + tok[p0 + r] * D + c;
                const float t = Y[(long)r * D + c];
                *o = bf16 ? round_bf16(*o + round_bf16(coef[p0 + r] * round_bf16(t))) : *o + coef[p0 + r] * t;
            }
        p0 = p1;
    }
}
