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
 * Packed codes sit little-end first along K (code j of a byte at bits j*bits: quant/formats.py).
 *
 * Float kinds: fp32 FMAs on the weights converted to fp32.
 * Integer kinds (2-4): the activation row is first rounded to int16 per block (`prep_block`): block b
 * of columns gets the power-of-two step sx_b = 2^(e_b - 15), e_b the binary exponent of the block's max
 * |x|, so every element within 2^7 of that max whose mantissa has at most 8 bits (every bf16 value) is
 * exact, and any other is off by at most sx_b / 2 (less than sx_b where a value rounds to 32768 and
 * saturates): at most max|x_b| / 32767 per element, where the reference's own bf16 rounding of each
 * activation is up to |x| * 2^-9. The weights are then never converted to float: products summed
 * exactly in integers, one float FMA per block. Blocks: ACT_BLOCK columns (int8), the weight group
 * (int4/int2). Layouts of the prepared row, by the loads that read it:
 *   int8                 int16 in column order                    (vpmovsxbw + vpmaddwd, dot_i8)
 *   int4, group % 64 == 0  its bytes: high (signed) then low (unsigned), each permuted per 32-byte
 *                        chunk as [x of the 32 low nibbles, x of the 32 high nibbles]  (vpmaddubsw, dot_q4_split)
 *   int4 (other groups), int2  int16 permuted per 16-byte chunk so the codes at bit offset j of the 16
 *                        bytes meet x values j, j+per, j+2*per, ...   (vpmovzxbw + vpmaddwd, dot_packed_bits)
 * and for packed kinds each group's sum of the exact x is kept:
 *   sum_k x_k w_k = sum_g s_g * sx_g * (xi.q)_g + (z_g - mid * s_g) * (sum x)_g.
 * Integer sums have no order, so results do not depend on thread count or on how many rows a call has.
 * Each output row is computed by one thread start to end.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Built with AVX-512 VNNI (kernels/__init__.py adds the flags where the CPU has them), the integer dot
 * products below use vpdpwssd / vpdpbusd: the same integer sums in the same int32 lanes as the AVX2
 * sequences (vpmaddwd / vpmaddubsw + vpmaddwd), so both builds give bit-identical results
 * (tests/test_kernels.py holds them to that) with about half the instructions. */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__)
#define VNNI 1
#else
#define VNNI 0
#endif

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

/* Weight rows are streamed once. Hardware prefetchers follow one sequential stream per thread well (four
 * interleaved rows per thread, the earlier layout, read slower on Zen 3) but ramp up slowly, so
 * each dot product also prefetches PREFETCH bytes ahead in its stream; bench/kernel_throughput.py sets a
 * streaming GEMV against torch.sum's read rate. Prefetches never fault. */
#define PREFETCH 4096
static inline void prefetch_ahead(const void *p) { _mm_prefetch((const char *)p + PREFETCH, _MM_HINT_T0); }

static inline __m256 load_bf16x8(const uint16_t *p) {
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

static inline __m256 load_w8(int kind, const char *row, int k) {  /* float kinds */
    if (kind == 0) return _mm256_loadu_ps((const float *)row + k);
    return load_bf16x8((const uint16_t *)row + k);
}

/* dot(x, row n) for the float kinds; K % 16 == 0. */
static float dot_plain(const wview *v, long n, const float *x, int K) {
    const char *row = (const char *)v->w + n * v->ld;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    const int esize = v->kind == 0 ? 4 : 2;
    for (int k = 0; k < K; k += 16) {
        if (esize == 4 || !(k & 31)) prefetch_ahead(row + (long)k * esize);  /* once per 64-byte line */
        a0 = _mm256_fmadd_ps(load_w8(v->kind, row, k), _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(load_w8(v->kind, row, k + 8), _mm256_loadu_ps(x + k + 8), a1);
    }
    return hsum8(_mm256_add_ps(a0, a1));
}

#define MAX_ROWS 64   /* activation rows one call may carry (M) */

#define ACT_BLOCK 64  /* columns per int16 activation step for int8 weights (header) */

static inline int is_int(const wview *v) { return v->kind >= 2; }
/* int4 with whole 32-byte chunks per group: the byte-split path (dot_q4_split) */
static inline int split_q4(const wview *v) { return v->kind == 3 && v->group % 64 == 0; }
/* int2 with 64-column groups, two to a 32-byte chunk: the byte-split path (dot_q2_split) */
static inline int split_q2(const wview *v, int K) { return v->kind == 4 && v->group == 64 && K % 128 == 0; }
static inline int act_block(const wview *v) { return v->kind == 2 ? ACT_BLOCK : v->group; }
static inline int act_blocks(const wview *v, int K) { return is_int(v) ? (K + act_block(v) - 1) / act_block(v) : 0; }

/* x [n] (n % 16 == 0) -> out [n] int16 with the block's power-of-two step (header), returned. A block
 * with a NaN or infinity gets a NaN step, so the dot product is NaN as the float reference's would be
 * not-finite; a block whose max |x| is below 2^-100 counts as zero (step 0). */
static float quant_block(const float *x, int n, int16_t *out) {
    const __m256 abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 mv = _mm256_setzero_ps();
    for (int k = 0; k < n; k += 8) mv = _mm256_max_ps(mv, _mm256_and_ps(abs, _mm256_loadu_ps(x + k)));
    float mx = 0.f;
    float lanes[8];
    _mm256_storeu_ps(lanes, mv);
    for (int i = 0; i < 8; i++) mx = lanes[i] > mx ? lanes[i] : mx;
    for (int k = 0; k < n; k++) mx = isnan(x[k]) ? INFINITY : mx;  /* max_ps drops NaNs */
    int e = 0;
    if (isfinite(mx)) frexpf(mx, &e);  /* mx = f * 2^e, 0.5 <= f < 1 */
    if (!isfinite(mx) || mx < 0x1p-100f) {
        memset(out, 0, sizeof(int16_t) * n);
        return isfinite(mx) ? 0.f : NAN;
    }
    const __m256 inv = _mm256_set1_ps(ldexpf(1.f, 15 - e));  /* exact: a power of two */
    for (int k = 0; k < n; k += 16) {  /* round to nearest even; 32768 saturates to 32767 */
        __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k), inv));
        __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 8), inv));
        _mm256_storeu_si256((__m256i *)(out + k), _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8));
    }
    return ldexpf(1.f, e - 15);
}

/* Block b of one activation row xr [K] for weights like v, into that row's xi [K] int16 (int4: its bytes,
 * int2: permuted; see the header) and its 2 * act_blocks stats st (steps, then group sums of x). */
static void prep_block(const wview *v, const float *xr, int K, int b, int16_t *xi, float *st) {
    const int B = act_block(v), nb = act_blocks(v, K), k0 = b * B, n = K - k0 < B ? K - k0 : B;
    if (v->kind == 2) {
        st[b] = quant_block(xr + k0, n, xi + k0);
        return;
    }
    int16_t tmp[n];
    st[b] = quant_block(xr + k0, n, tmp);
    if (split_q4(v)) {  /* bytes of the int16 values: high (signed) in the row's first K, low after */
        int8_t *hi = (int8_t *)xi + k0;
        uint8_t *lo = (uint8_t *)xi + K + k0;
        for (int c = 0; c < n / 64; c++)
            for (int i = 0; i < 32; i++)
                for (int j = 0; j < 2; j++) {
                    const int16_t t = tmp[c * 64 + 2 * i + j];
                    hi[c * 64 + j * 32 + i] = (int8_t)(t >> 8);
                    lo[c * 64 + j * 32 + i] = (uint8_t)(t & 0xff);
                }
    } else if (split_q2(v, K)) {  /* as int4, per 32-byte chunk (two groups, one per 16-byte lane) and code j */
        int8_t *hi = (int8_t *)xi;
        uint8_t *lo = (uint8_t *)xi + K;
        const int c = k0 / 128, lane = (k0 / 64) % 2;
        for (int kk = 0; kk < n; kk++) {
            const int pos = c * 128 + (kk % 4) * 32 + 16 * lane + kk / 4;
            hi[pos] = (int8_t)(tmp[kk] >> 8);
            lo[pos] = (uint8_t)(tmp[kk] & 0xff);
        }
    } else {  /* 16-byte chunks of 16 * per codes */
        const int per = v->kind == 3 ? 2 : 4;
        int16_t *out = xi + k0;
        for (int c = 0; c < n / (16 * per); c++)
            for (int i = 0; i < 16; i++)
                for (int j = 0; j < per; j++) out[c * 16 * per + j * 16 + i] = tmp[c * 16 * per + i * per + j];
    }
    float sum = 0.f;
    for (int k = 0; k < n; k++) sum += xr[k0 + k];
    st[nb + b] = sum;
}

/* Work-shared: the integer activations of M rows x [M, K] for weights like v: per row, xi [K] int16 and
 * 2 * act_blocks floats of xs (prep_block). Ends in the work-sharing loop's barrier. */
static void prep_int(const wview *v, const float *x, int M, int K, int16_t *xi, float *xs) {
    const int nb = act_blocks(v, K);
#pragma omp for schedule(static)
    for (int t = 0; t < M * nb; t++)
        prep_block(v, x + (long)(t / nb) * K, K, t % nb, xi + (long)(t / nb) * K, xs + (long)(t / nb) * 2 * nb);
}

/* s[n] * sum_b sx_b * (q_n . xi)_b for int8 row n; sx: the row's block steps. */
static float dot_i8(const wview *v, long n, const int16_t *xi, const float *sx, int K) {
    const int8_t *row = (const int8_t *)((const char *)v->w + n * v->ld);
    __m256 tot = _mm256_setzero_ps();
    for (int k0 = 0, b = 0; k0 < K; k0 += ACT_BLOCK, b++) {
        const int ke = K - k0 < ACT_BLOCK ? K : k0 + ACT_BLOCK;
        __m256i a0 = _mm256_setzero_si256(), a1 = a0;
        int k = k0;
        prefetch_ahead(row + k0);  /* one 64-byte line per block */
#if VNNI
        /* int32 lane j of the 512-bit sum holds elements 2j, 2j+1 of each 32; adding its halves gives
         * exactly a0 + a1 of the AVX2 loop below */
        __m512i a = _mm512_setzero_si512();
        for (; k + 32 <= ke; k += 32)
            a = _mm512_dpwssd_epi32(a, _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(row + k))),
                                    _mm512_loadu_si512((const void *)(xi + k)));
        a0 = _mm256_add_epi32(_mm512_castsi512_si256(a), _mm512_extracti64x4_epi64(a, 1));
#endif
        for (; k + 32 <= ke; k += 32) {
            const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(row + k)));
            const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(row + k + 16)));
            a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i *)(xi + k))));
            a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i *)(xi + k + 16))));
        }
        if (k < ke) {  /* K % 32 == 16 */
            const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(row + k)));
            a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i *)(xi + k))));
        }
        tot = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(a0, a1)), _mm256_set1_ps(sx[b]), tot);
    }
    return hsum8(tot) * v->s[n];
}

/* Sums of unsigned x signed byte products, four per int32 lane (VNNI: vpdpbusd) or two per int16 lane
 * (AVX2: vpmaddubsw, exact while |sum| < 2^15: the int4 callers add at most 4 products of 255 * 15 or
 * 15 * 128 per lane before fold_hi_lo), and the int32 value 256 * A + B of the sums against x's high and
 * low bytes. Both builds sum the same integers into the same int32 lanes. */
static inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) {
#if VNNI
    return _mm256_dpbusd_epi32(acc, u, s);
#else
    return _mm256_add_epi16(acc, _mm256_maddubs_epi16(u, s));
#endif
}

static inline __m256i fold_hi_lo(__m256i A, __m256i B) {
#if VNNI
    return _mm256_add_epi32(_mm256_slli_epi32(A, 8), B);
#else
    return _mm256_add_epi32(_mm256_madd_epi16(A, _mm256_set1_epi16(256)), _mm256_madd_epi16(B, _mm256_set1_epi16(1)));
#endif
}

/* dot_i8 for R consecutive rows n.. and C prepared activation rows at once (R <= TILE_R, C <= TILE_C,
 * constants after inlining: the tile sizes of dot_q4_tile below), each weight load widened once for the C
 * rows and each activation load shared by the R rows; every (row, activation) pair gets dot_i8's integer
 * sums and float steps, so the bits do not depend on the tiling (tested). xi: activation row 0 (rows K
 * apart); xs: its block steps (rows 2 * K / ACT_BLOCK floats apart, as prep_int lays them); out[c * ldo + r]. */
#define TILE_R 2
#if VNNI  /* 32 vector registers */
#define TILE_C 4
#else     /* 16 */
#define TILE_C 2
#endif

/* dot_plain for R consecutive rows n.. and C activation rows x [C, K] (rows K apart), R <= PLAIN_R and
 * C <= PLAIN_C constants after inlining: each 16 weights converted to fp32 once for the C rows, each
 * activation load shared by the R rows. Every (row, activation) pair keeps dot_plain's two 8-lane
 * accumulators (with AVX-512 as the two halves of one 16-lane register), FMAs in the same order and its
 * final sum, so the bits do not depend on the tiling (tested); out[c * ldo + r]. With AVX-512 a 4 x 4
 * tile needs 8 loads per 16 FMAs (the FMA units, not the load ports, set the pace); AVX2 has the
 * registers for 1 x 2. */
#define PLAIN_ONE_ROW_M 4  /* up to this many activation rows, one weight row per tile: one stream per thread */
#if VNNI
#define PLAIN_R 4
#define PLAIN_C 4
static inline __m512 load_w16(int kind, const char *row, int k) {
    if (kind == 0) return _mm512_loadu_ps((const float *)row + k);
    const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)row + k)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}
#else
#define PLAIN_R 1
#define PLAIN_C 2
#endif

static inline __attribute__((always_inline)) void dot_plain_tile(const wview *v, const int kind, long n, const int R,
                                                                 const float *x, const int C, int K, long ldo,
                                                                 float *out) {
    const char *row[PLAIN_R];
    const int esize = kind == 0 ? 4 : 2;
    for (int r = 0; r < R; r++) row[r] = (const char *)v->w + (n + r) * v->ld;
#if VNNI
    __m512 acc[PLAIN_R][PLAIN_C];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) acc[r][c] = _mm512_setzero_ps();
    const long ahead = R * v->ld - PREFETCH;  /* the same column of the next tile's rows */
    for (int k = 0; k < K; k += 16) {
        __m512 w[PLAIN_R];
        for (int r = 0; r < R; r++) {
            prefetch_ahead(row[r] + ahead + (long)k * esize);
            w[r] = load_w16(kind, row[r], k);
        }
        for (int c = 0; c < C; c++) {
            const __m512 xv = _mm512_loadu_ps(x + (long)c * K + k);
            for (int r = 0; r < R; r++) acc[r][c] = _mm512_fmadd_ps(w[r], xv, acc[r][c]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++)
            out[(long)c * ldo + r] = hsum8(_mm256_add_ps(_mm512_castps512_ps256(acc[r][c]),
                                                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[r][c]), 1))));
#else
    __m256 a0[PLAIN_R][PLAIN_C], a1[PLAIN_R][PLAIN_C];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) a0[r][c] = a1[r][c] = _mm256_setzero_ps();
    for (int k = 0; k < K; k += 16) {
        __m256 w0[PLAIN_R], w1[PLAIN_R];
        for (int r = 0; r < R; r++) {
            prefetch_ahead(row[r] + (long)k * esize);
            w0[r] = load_w8(kind, row[r], k);
            w1[r] = load_w8(kind, row[r], k + 8);
        }
        for (int c = 0; c < C; c++) {
            const __m256 x0 = _mm256_loadu_ps(x + (long)c * K + k), x1 = _mm256_loadu_ps(x + (long)c * K + k + 8);
            for (int r = 0; r < R; r++) {
                a0[r][c] = _mm256_fmadd_ps(w0[r], x0, a0[r][c]);
                a1[r][c] = _mm256_fmadd_ps(w1[r], x1, a1[r][c]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) out[(long)c * ldo + r] = hsum8(_mm256_add_ps(a0[r][c], a1[r][c]));
#endif
}

static inline __attribute__((always_inline)) void dot_i8_tile(const wview *v, long n, const int R, const int16_t *xi,
                                                              const float *xs, const int C, int K, long ldo,
                                                              float *out) {
    const int nb = act_blocks(v, K);
    const int8_t *row[TILE_R];
    for (int r = 0; r < R; r++) row[r] = (const int8_t *)((const char *)v->w + (n + r) * v->ld);
    __m256 tot[TILE_R][TILE_C];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) tot[r][c] = _mm256_setzero_ps();
    for (int k0 = 0, b = 0; k0 < K; k0 += ACT_BLOCK, b++) {
        const int ke = K - k0 < ACT_BLOCK ? K : k0 + ACT_BLOCK;
        __m256i a[TILE_R][TILE_C];
        int k = k0;
        for (int r = 0; r < R; r++) prefetch_ahead(row[r] + k0);
#if VNNI
        __m512i z[TILE_R][TILE_C];
        for (int r = 0; r < R; r++)
            for (int c = 0; c < C; c++) z[r][c] = _mm512_setzero_si512();
        for (; k + 32 <= ke; k += 32) {
            __m512i w[TILE_R];
            for (int r = 0; r < R; r++) w[r] = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(row[r] + k)));
            for (int c = 0; c < C; c++) {
                const __m512i x = _mm512_loadu_si512((const void *)(xi + (long)c * K + k));
                for (int r = 0; r < R; r++) z[r][c] = _mm512_dpwssd_epi32(z[r][c], w[r], x);
            }
        }
        for (int r = 0; r < R; r++)
            for (int c = 0; c < C; c++)
                a[r][c] = _mm256_add_epi32(_mm512_castsi512_si256(z[r][c]), _mm512_extracti64x4_epi64(z[r][c], 1));
#else
        for (int r = 0; r < R; r++)
            for (int c = 0; c < C; c++) a[r][c] = _mm256_setzero_si256();
        for (; k + 32 <= ke; k += 32) {
            __m256i w0[TILE_R], w1[TILE_R];
            for (int r = 0; r < R; r++) {
                w0[r] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(row[r] + k)));
                w1[r] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(row[r] + k + 16)));
            }
            for (int c = 0; c < C; c++) {
                const __m256i x0 = _mm256_loadu_si256((const __m256i *)(xi + (long)c * K + k));
                const __m256i x1 = _mm256_loadu_si256((const __m256i *)(xi + (long)c * K + k + 16));
                for (int r = 0; r < R; r++)
                    a[r][c] = _mm256_add_epi32(a[r][c], _mm256_add_epi32(_mm256_madd_epi16(w0[r], x0),
                                                                         _mm256_madd_epi16(w1[r], x1)));
            }
        }
#endif
        if (k < ke)  /* K % 32 == 16 */
            for (int r = 0; r < R; r++) {
                const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(row[r] + k)));
                for (int c = 0; c < C; c++)
                    a[r][c] = _mm256_add_epi32(a[r][c], _mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i *)(xi + (long)c * K + k))));
            }
        for (int r = 0; r < R; r++)
            for (int c = 0; c < C; c++)
                tot[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[r][c]), _mm256_set1_ps(xs[(long)c * 2 * nb + b]), tot[r][c]);
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) out[c * ldo + r] = hsum8(tot[r][c]) * v->s[n + r];
}

/* sum_g (z_g - mid * s_g) * xsum_g: the zero points' share of a packed row's dot product, 8 groups a step. */
static inline float group_offset(const float *s, const float *z, const float *xsum, int groups, float mid) {
    __m256 acc = _mm256_setzero_ps();
    const __m256 vm = _mm256_set1_ps(mid);
    int g = 0;
    for (; g + 8 <= groups; g += 8)
        acc = _mm256_fmadd_ps(_mm256_sub_ps(_mm256_loadu_ps(z + g), _mm256_mul_ps(vm, _mm256_loadu_ps(s + g))),
                              _mm256_loadu_ps(xsum + g), acc);
    float o = groups >= 8 ? hsum8(acc) : 0.f;  /* the same +0 as hsum8 of zeros, without its latency */
    for (; g < groups; g++) o += (z[g] - mid * s[g]) * xsum[g];
    return o;
}

/* dot(x, row n) for int4/int2 from the prepared row: xi (permuted int16), sx (steps = one per group),
 * xsum (group sums of x). */
static inline float dot_packed_bits(const wview *v, long n, const int16_t *xi, const float *sx, const float *xsum,
                                    int K, const int bits) {
    const int per = 8 / bits, mid = 1 << (bits - 1);
    const __m128i mask = _mm_set1_epi8((char)((1 << bits) - 1));
    const uint8_t *row = (const uint8_t *)v->w + n * v->ld;
    const float *s = v->s + n * v->sld, *z = v->z + n * v->sld;
    const int chunks = v->group / (16 * per), groups = K / v->group;
    __m256 total = _mm256_setzero_ps();
    for (int g = 0; g < groups; g++) {
        __m256i a0 = _mm256_setzero_si256(), a1 = a0;
        for (int c = 0; c < chunks; c++) {
            const long chunk = (long)g * chunks + c;
            if (!(chunk & 3)) prefetch_ahead(row + chunk * 16);  /* one 64-byte line per 4 chunks */
            const __m128i b = _mm_loadu_si128((const __m128i *)(row + chunk * 16));
            const int16_t *xc = xi + chunk * 16 * per;
            for (int j = 0; j < per; j += 2) {  /* codes at bits j*bits of the 16 bytes meet xc[j*16 ..] */
                const __m128i q0 = _mm_and_si128(_mm_srli_epi16(b, j * bits), mask);
                const __m128i q1 = _mm_and_si128(_mm_srli_epi16(b, (j + 1) * bits), mask);
                a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(_mm256_cvtepu8_epi16(q0),
                                                            _mm256_loadu_si256((const __m256i *)(xc + j * 16))));
                a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(_mm256_cvtepu8_epi16(q1),
                                                            _mm256_loadu_si256((const __m256i *)(xc + j * 16 + 16))));
            }
        }
        total = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(a0, a1)), _mm256_set1_ps(s[g] * sx[g]), total);
    }
    return hsum8(total) + group_offset(s, z, xsum, groups, (float)mid);
}

/* int4 (group % 64 == 0) from the int16 row split into bytes, x = 256 * hi + lo (hi signed, lo unsigned),
 * each permuted per 32-byte chunk as [codes of the low nibbles, of the high nibbles]: q . x =
 * 256 * (q . hi) + (q . lo), both with vpmaddubsw (u8 x s8 pairs: 2*15*128 and 2*255*15 fit int16, and
 * two chunks' sums still do), widened once per two chunks: ~2/3 of the integer work of dot_packed_bits.
 *
 * dot_q4_tile: R consecutive weight rows n.. against C prepared activation rows at once (R <= TILE_RMAX,
 * C <= TILE_C, constants after inlining), each weight chunk's nibbles taken apart once for the C rows and
 * each activation chunk loaded once for the R rows, with R*C independent accumulator chains. Every
 * (row, activation) pair gets the sums and float steps of dot_q4_split below (integer sums are exact in
 * any order), so results do not depend on the tiling (tested). Used for several activation rows
 * (prefill, decode batches: rows_slice), where one pair per call ran ~4 MACs per cycle, and for pairs of
 * decode rows of at most PAIR_MAX_K columns: longer decode rows streamed slower in pairs on a Zen 3, and
 * a single row streamed slower through this than through dot_q4_split (bench/kernel_ab.py).
 * xi: activation row 0's prepared int16 row (rows K apart); xs: its steps then group sums (2 * K / group
 * floats per row); out[c * ldo + r]. */
#define PAIR_MAX_K 512
#define TILE_NB 16  /* weight rows per work item of rows_of (a slice for rows_slice) */

#define TILE_RMAX 4  /* dot_q4_tile's register arrays: TILE_R for many activation rows, 4 for one (moe.c's rows_at) */
static inline __attribute__((always_inline)) void dot_q4_tile(const wview *v, long n, const int R, const int16_t *xi,
                                                              const float *xs, const int C, int K, long ldo,
                                                              float *out) {
    const __m256i mask = _mm256_set1_epi8(0x0f);
    const int chunks = v->group / 64, groups = K / v->group;
    const uint8_t *row[TILE_RMAX];
    const float *s[TILE_RMAX], *z[TILE_RMAX];
    for (int r = 0; r < R; r++) {
        row[r] = (const uint8_t *)v->w + (n + r) * v->ld;
        s[r] = v->s + (n + r) * v->sld, z[r] = v->z + (n + r) * v->sld;
    }
    const int8_t *xh[TILE_C];
    const uint8_t *xl[TILE_C];
    const float *sx[TILE_C];
    __m256 total[TILE_RMAX][TILE_C];
    for (int c = 0; c < C; c++) {
        xh[c] = (const int8_t *)(xi + (long)c * K), xl[c] = (const uint8_t *)(xi + (long)c * K) + K;
        sx[c] = xs + (long)c * 2 * groups;
        for (int r = 0; r < R; r++) total[r][c] = _mm256_setzero_ps();
    }
    for (int g = 0; g < groups; g++) {
        __m256i acc[TILE_RMAX][TILE_C];
        for (int r = 0; r < R; r++)
            for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_si256();
        for (int c0 = 0; c0 < chunks; c0 += 2) {
            __m256i A[TILE_RMAX][TILE_C], B[TILE_RMAX][TILE_C];  /* sums against the hi / lo bytes of x */
            for (int r = 0; r < R; r++)
                for (int c = 0; c < C; c++) A[r][c] = B[r][c] = _mm256_setzero_si256();
            for (int ch = c0; ch < c0 + 2 && ch < chunks; ch++) {
                const long chunk = (long)g * chunks + ch;
                __m256i q0[TILE_RMAX], q1[TILE_RMAX];
                for (int r = 0; r < R; r++) {
                    if (!(chunk & 1)) prefetch_ahead(row[r] + chunk * 32);  /* one 64-byte line per 2 chunks */
                    const __m256i b = _mm256_loadu_si256((const __m256i *)(row[r] + chunk * 32));
                    q0[r] = _mm256_and_si256(b, mask), q1[r] = _mm256_and_si256(_mm256_srli_epi16(b, 4), mask);
                }
                for (int c = 0; c < C; c++) {
                    const int8_t *h = xh[c] + chunk * 64;
                    const uint8_t *l = xl[c] + chunk * 64;
                    const __m256i h0 = _mm256_loadu_si256((const __m256i *)h), h1 = _mm256_loadu_si256((const __m256i *)(h + 32));
                    const __m256i l0 = _mm256_loadu_si256((const __m256i *)l), l1 = _mm256_loadu_si256((const __m256i *)(l + 32));
                    for (int r = 0; r < R; r++) {
                        A[r][c] = dot_u8s8(dot_u8s8(A[r][c], q0[r], h0), q1[r], h1);
                        B[r][c] = dot_u8s8(dot_u8s8(B[r][c], l0, q0[r]), l1, q1[r]);
                    }
                }
            }
            for (int r = 0; r < R; r++)
                for (int c = 0; c < C; c++) acc[r][c] = _mm256_add_epi32(acc[r][c], fold_hi_lo(A[r][c], B[r][c]));
        }
        __m256 sr[TILE_RMAX], sc[TILE_C];  /* s * sx as one product per lane: set1(s * sx)'s bits */
        for (int r = 0; r < R; r++) sr[r] = _mm256_broadcast_ss(s[r] + g);
        for (int c = 0; c < C; c++) sc[c] = _mm256_broadcast_ss(sx[c] + g);
        for (int r = 0; r < R; r++)
            for (int c = 0; c < C; c++)
                total[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][c]), _mm256_mul_ps(sr[r], sc[c]), total[r][c]);
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++)
            out[c * ldo + r] = hsum8(total[r][c]) + group_offset(s[r], z[r], sx[c] + groups, groups, 8.f);
}

/* One row: the reference of dot_q4_tile. */
static float dot_q4_split(const wview *v, long n, const int16_t *xi, const float *sx, const float *xsum, int K) {
    const __m256i mask = _mm256_set1_epi8(0x0f), w256 = _mm256_set1_epi16(256), ones = _mm256_set1_epi16(1);
    const uint8_t *row = (const uint8_t *)v->w + n * v->ld;
    const int8_t *xh = (const int8_t *)xi;
    const uint8_t *xl = (const uint8_t *)xi + K;
    const float *s = v->s + n * v->sld, *z = v->z + n * v->sld;
    const int chunks = v->group / 64, groups = K / v->group;
    __m256 total = _mm256_setzero_ps();
    for (int g = 0; g < groups; g++) {
        __m256i acc = _mm256_setzero_si256();
#if VNNI  /* the same bytes meet in the same int32 lanes, summed without the int16 stage */
        __m256i A = _mm256_setzero_si256(), B = A;
        for (int c = 0; c < chunks; c++) {
            const long chunk = (long)g * chunks + c;
            if (!(chunk & 1)) prefetch_ahead(row + chunk * 32);
            const __m256i b = _mm256_loadu_si256((const __m256i *)(row + chunk * 32));
            const __m256i q0 = _mm256_and_si256(b, mask), q1 = _mm256_and_si256(_mm256_srli_epi16(b, 4), mask);
            const int8_t *h = xh + chunk * 64;
            const uint8_t *l = xl + chunk * 64;
            A = _mm256_dpbusd_epi32(A, q0, _mm256_loadu_si256((const __m256i *)h));
            A = _mm256_dpbusd_epi32(A, q1, _mm256_loadu_si256((const __m256i *)(h + 32)));
            B = _mm256_dpbusd_epi32(B, _mm256_loadu_si256((const __m256i *)l), q0);
            B = _mm256_dpbusd_epi32(B, _mm256_loadu_si256((const __m256i *)(l + 32)), q1);
        }
        acc = _mm256_add_epi32(_mm256_slli_epi32(A, 8), B);
#else
        for (int c0 = 0; c0 < chunks; c0 += 2) {
            __m256i A = _mm256_setzero_si256(), B = A;  /* int16 sums against hi / lo bytes */
            for (int c = c0; c < c0 + 2 && c < chunks; c++) {
                const long chunk = (long)g * chunks + c;
                if (!(chunk & 1)) prefetch_ahead(row + chunk * 32);  /* one 64-byte line per 2 chunks */
                const __m256i b = _mm256_loadu_si256((const __m256i *)(row + chunk * 32));
                const __m256i q0 = _mm256_and_si256(b, mask), q1 = _mm256_and_si256(_mm256_srli_epi16(b, 4), mask);
                const int8_t *h = xh + chunk * 64;
                const uint8_t *l = xl + chunk * 64;
                A = _mm256_add_epi16(A, _mm256_maddubs_epi16(q0, _mm256_loadu_si256((const __m256i *)h)));
                A = _mm256_add_epi16(A, _mm256_maddubs_epi16(q1, _mm256_loadu_si256((const __m256i *)(h + 32))));
                B = _mm256_add_epi16(B, _mm256_maddubs_epi16(_mm256_loadu_si256((const __m256i *)l), q0));
                B = _mm256_add_epi16(B, _mm256_maddubs_epi16(_mm256_loadu_si256((const __m256i *)(l + 32)), q1));
            }
            acc = _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_madd_epi16(A, w256), _mm256_madd_epi16(B, ones)));
        }
#endif
        total = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_set1_ps(s[g] * sx[g]), total);
    }
    return hsum8(total) + group_offset(s, z, xsum, groups, 8.f);
}

/* int2 with 64-column groups (K % 128 == 0) from the byte-split row (prep_block): each 32-byte chunk
 * holds two groups, one per 16-byte lane, so the four code planes (bits 2j) meet x through vpmaddubsw
 * as for int4 (pairs: 2*3*128 and 2*255*3, four planes still fit int16) and each lane's int32 sums get
 * their own group's scale. */
static float dot_q2_split(const wview *v, long n, const int16_t *xi, const float *sx, const float *xsum, int K) {
    const __m256i mask = _mm256_set1_epi8(3), w256 = _mm256_set1_epi16(256), ones = _mm256_set1_epi16(1);
    const uint8_t *row = (const uint8_t *)v->w + n * v->ld;
    const int8_t *xh = (const int8_t *)xi;
    const uint8_t *xl = (const uint8_t *)xi + K;
    const float *s = v->s + n * v->sld, *z = v->z + n * v->sld;
    __m256 total = _mm256_setzero_ps();
    for (int c = 0; c < K / 128; c++) {
        if (!(c & 1)) prefetch_ahead(row + c * 32);  /* one 64-byte line per 2 chunks */
        const __m256i b = _mm256_loadu_si256((const __m256i *)(row + c * 32));
        __m256i A = _mm256_setzero_si256(), B = A;
#if VNNI
        for (int j = 0; j < 4; j++) {
            const __m256i q = _mm256_and_si256(_mm256_srli_epi16(b, 2 * j), mask);
            A = _mm256_dpbusd_epi32(A, q, _mm256_loadu_si256((const __m256i *)(xh + c * 128 + j * 32)));
            B = _mm256_dpbusd_epi32(B, _mm256_loadu_si256((const __m256i *)(xl + c * 128 + j * 32)), q);
        }
        const __m256i acc = _mm256_add_epi32(_mm256_slli_epi32(A, 8), B);
#else
        for (int j = 0; j < 4; j++) {
            const __m256i q = _mm256_and_si256(_mm256_srli_epi16(b, 2 * j), mask);
            A = _mm256_add_epi16(A, _mm256_maddubs_epi16(q, _mm256_loadu_si256((const __m256i *)(xh + c * 128 + j * 32))));
            B = _mm256_add_epi16(B, _mm256_maddubs_epi16(_mm256_loadu_si256((const __m256i *)(xl + c * 128 + j * 32)), q));
        }
        const __m256i acc = _mm256_add_epi32(_mm256_madd_epi16(A, w256), _mm256_madd_epi16(B, ones));
#endif
        const __m256 scale = _mm256_set_m128(_mm_set1_ps(s[2 * c + 1] * sx[2 * c + 1]), _mm_set1_ps(s[2 * c] * sx[2 * c]));
        total = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), scale, total);
    }
    return hsum8(total) + group_offset(s, z, xsum, K / 64, 2.f);
}

/* bits as a constant: shifts by immediates and the chunk loop unrolled */
static float dot_packed(const wview *v, long n, const int16_t *xi, const float *sx, const float *xsum, int K) {
    if (split_q4(v)) return dot_q4_split(v, n, xi, sx, xsum, K);
    if (split_q2(v, K)) return dot_q2_split(v, n, xi, sx, xsum, K);
    return v->kind == 3 ? dot_packed_bits(v, n, xi, sx, xsum, K, 4) : dot_packed_bits(v, n, xi, sx, xsum, K, 2);
}

/* dot_q4_tile (int4) or dot_i8_tile (int8) with R in {1, 2} and 1 <= C <= TILE_C given at run time: each
 * shape its own constant copy. */
static void int_tile(const wview *v, long n, int R, const int16_t *xi, const float *xs, int C, int K, long ldo,
                     float *out) {
#define TILE_CASE(r, c) \
    case (r) * 8 + (c): \
        if (v->kind == 2) dot_i8_tile(v, n, r, xi, xs, c, K, ldo, out); \
        else dot_q4_tile(v, n, r, xi, xs, c, K, ldo, out); \
        return;
    switch (R * 8 + C) {
        TILE_CASE(1, 1) TILE_CASE(1, 2) TILE_CASE(2, 1) TILE_CASE(2, 2)
#if TILE_C > 2
        TILE_CASE(1, 3) TILE_CASE(1, 4) TILE_CASE(2, 3) TILE_CASE(2, 4)
#endif
    }
#undef TILE_CASE
}

/* dot_plain_tile with 1 <= R <= PLAIN_R and 1 <= C <= PLAIN_C given at run time: each shape its own copy. */
static void plain_tile(const wview *v, long n, int R, const float *x, int C, int K, long ldo, float *out) {
#define TILE_CASE(r, c) \
    case (r) * 8 + (c): \
        if (v->kind == 0) dot_plain_tile(v, 0, n, r, x, c, K, ldo, out); \
        else dot_plain_tile(v, 1, n, r, x, c, K, ldo, out); \
        return;
    switch (R * 8 + C) {
        TILE_CASE(1, 1) TILE_CASE(1, 2)
#if PLAIN_R > 1
        TILE_CASE(1, 3) TILE_CASE(1, 4) TILE_CASE(2, 1) TILE_CASE(2, 2) TILE_CASE(2, 3) TILE_CASE(2, 4)
        TILE_CASE(3, 1) TILE_CASE(3, 2) TILE_CASE(3, 3) TILE_CASE(3, 4) TILE_CASE(4, 1) TILE_CASE(4, 2)
        TILE_CASE(4, 3) TILE_CASE(4, 4)
#endif
    }
#undef TILE_CASE
}

/* Work-shared: whatever x [M, K] needs before rows_of (the integer kinds' activations); nothing for the
 * float kinds. xp: scratch of M*K floats (holds the int16 row), xs: M*K floats. */
static void prep_act(const wview *v, const float *x, int M, int K, float *xp, float *xs) {
    if (is_int(v)) prep_int(v, x, M, K, (int16_t *)xp, xs);
}

/* Rows [n0, n1) of y[m] = W x[m] for m < M into y[m * ldy + n], by one thread (not work-shared), from x
 * and (integer kinds) its rows prepared by prep_act: int8 and int4 (groups of 64k) in tiles of TILE_R
 * weight rows by TILE_C activation rows (one activation row keeps single rows: int8, and int4 above
 * PAIR_MAX_K columns); float kinds in dot_plain_tile's tiles (one weight row up to PLAIN_ONE_ROW_M
 * activation rows); other integer kinds row by row. Callers keep n1 - n0 small (TILE_NB) so the slice's
 * weight rows stay in L1 while every activation row meets them. Every kind gives the bits of one row at
 * a time. */
static void rows_slice(const wview *v, const float *x, int M, int K, int n0, int n1, float *y, long ldy,
                       const float *xp, const float *xs) {
    if (is_int(v)) {
        const int16_t *xi = (const int16_t *)xp;
        const int nb = act_blocks(v, K);
        if ((split_q4(v) || v->kind == 2) && (M > 1 || (split_q4(v) && K <= PAIR_MAX_K))) {
            for (int m = 0; m < M; m += TILE_C) {
                const int C = M - m < TILE_C ? M - m : TILE_C;
                for (int n = n0; n < n1; n += TILE_R)
                    int_tile(v, n, n1 - n < TILE_R ? n1 - n : TILE_R, xi + (long)m * K, xs + (long)m * 2 * nb, C, K,
                             ldy, y + (long)m * ldy + n);
            }
            return;
        }
        for (int n = n0; n < n1; n++)
            for (int m = 0; m < M; m++) {
                const float *sm = xs + (long)m * 2 * nb;
                y[(long)m * ldy + n] = v->kind == 2 ? dot_i8(v, n, xi + (long)m * K, sm, K)
                                                    : dot_packed(v, n, xi + (long)m * K, sm, sm + nb, K);
            }
        return;
    }
    if (M == 1) {
        for (int n = n0; n < n1; n++) y[n] = dot_plain(v, n, x, K);
        return;
    }
    const int tr = M <= PLAIN_ONE_ROW_M ? 1 : PLAIN_R;
    for (int m = 0; m < M; m += PLAIN_C) {
        const int C = M - m < PLAIN_C ? M - m : PLAIN_C;
        for (int n = n0; n < n1; n += tr)
            plain_tile(v, n, n1 - n < tr ? n1 - n : tr, x + (long)m * K, C, K, ldy, y + (long)m * ldy + n);
    }
}

/* Work-shared rows [0, N) of y[m] = W x[m] for m < M, after prep_act(v or a view of the same kind and
 * group, x, ...): slices of TILE_NB weight rows. */
static void rows_of(const wview *v, const float *x, int M, int K, int N, float *y, const float *xp,
                    const float *xs) {
#pragma omp for schedule(static)
    for (int b = 0; b < (N + TILE_NB - 1) / TILE_NB; b++)
        rows_slice(v, x, M, K, b * TILE_NB, (b + 1) * TILE_NB < N ? (b + 1) * TILE_NB : N, y, N, xp, xs);
}

static inline int same_act(const wview *a, const wview *b) {  /* b can reuse a's prepared activations */
    return a->kind == b->kind && (!is_int(a) || act_block(a) == act_block(b));
}

/* Rows [0, N) of y[m] = W x[m] for m < M, inside an enclosing parallel region (work-shared). */
static void gemv_shared(const wview *v, const float *x, int M, int K, int N, float *y, float *xp, float *xs) {
    prep_act(v, x, M, K, xp, xs);
    rows_of(v, x, M, K, N, y, xp, xs);
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
