/* The exact greedy head's C steps (ernie45/greedy_head.py): integer screen with its error bound, the
 * rows that can still win, and their exact logits. Part of the one kernel library: decode.c includes
 * gemv.c, moe.c, then this file. Shapes: N (= V) head rows, K hidden.
 */

static inline int sum_i32(__m256i acc) {
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1));
    return _mm_cvtsi128_si32(t);
}

/* One row's screened logit *a and bound *b from its exact integer dot product; returns *a - *b. */
static inline float screen_logit(int dot, float sn, float absqn, float sx, float l1, float half_sx, float slack,
                                 float *a, float *b) {
    const float an = (float)dot * sn * sx;
    const float e = sn * (l1 + half_sx * absqn);
    const float bn = e + slack * (fabsf(an) + e);
    *a = an;
    *b = bn;
    return an - bn;
}

/* Integer screen of an LM head for greedy_head.py: for every row n of int8 weights q [N, K] (row stride
 * ld bytes, scale s[n]) and the int8 activation row xq [K] (scale sx):
 *   a[n] = s[n] * sx * sum_k q[n,k] * xq[k]                      (exact integer sum: |q|, |xq| <= 127,
 *                                                                 K % 32 == 0, K < 2^17)
 *   b[n] = e + slack * (|a[n]| + e),  e = s[n] * (l1 + half_sx * absq[n])   (its error bound)
 * with l1 = ||x||_1 / 2 and half_sx = sx / 2 given; returns max_n (a[n] - b[n]), the floor any winner
 * must reach. Used only where that bound covers the rounding, never as a model's matmul. */
float ernie45_head_screen(const int8_t *w, long ld, const float *s, const float *absq, const int8_t *xq, float sx,
                          float l1, float half_sx, float slack, int K, int N, float *a, float *b, int threads) {
    const __m256i ones = _mm256_set1_epi16(1);
    (void)ones;
    float floor = -INFINITY;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(max : floor)
    for (int n = 0; n < N; n++) {
        const int8_t *row = w + n * ld;
        __m256i acc = _mm256_setzero_si256();
        for (int k = 0; k < K; k += 32) {
            if (!(k & 63)) prefetch_ahead(row + k);
            __m256i q = _mm256_loadu_si256((const __m256i *)(row + k));
            __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + k));
#if VNNI  /* the same four products per int32 lane, without the int16 stage (never saturated: 2*127*127) */
            acc = _mm256_dpbusd_epi32(acc, _mm256_sign_epi8(xv, xv), _mm256_sign_epi8(q, xv));
#else
            __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(xv, xv), _mm256_sign_epi8(q, xv));
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, ones));
#endif
        }
        const float d = screen_logit(sum_i32(acc), s[n], absq[n], sx, l1, half_sx, slack, a + n, b + n);
        floor = d > floor ? d : floor;
    }
    return floor;
}

/* Rows that can still be the maximum after ernie45_head_screen: ascending n with a[n] + b[n] >= floor,
 * written to idx (room for N); returns how many. */
long ernie45_head_candidates(const float *a, const float *b, float floor, int N, long *idx) {
    const __m256 f = _mm256_set1_ps(floor);
    long c = 0;
    int n = 0;
    for (; n + 8 <= N; n += 8) {  /* mostly no candidate among 8: one compare and a mask test */
        int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_add_ps(_mm256_loadu_ps(a + n), _mm256_loadu_ps(b + n)), f,
                                                     _CMP_GE_OQ));
        for (; mask; mask &= mask - 1) idx[c++] = n + __builtin_ctz(mask);
    }
    for (; n < N; n++)
        if (a[n] + b[n] >= floor) idx[c++] = n;
    return c;
}

/* The exact step of the greedy head: among rows idx[0..count) of the head w [V, K] (kind 0 fp32 or 1
 * bf16, row stride ld bytes), the first row with the largest x . w_row, each logit rounded to bf16 first
 * when the head is bf16 (as the reference's bf16 matmul rounds its output). Returns that row id. */
long ernie45_head_exact(const void *w, long ld, int kind, const long *idx, long count, const float *x, int K,
                        int threads) {
    const wview v = {w, ld, 0, 0, 0, kind, 0};
    const long row_bytes = (long)K * (kind == 0 ? 4 : 2);
    long best_of[64];
    float top_of[64];
    int used = 1;
#pragma omp parallel num_threads(threads) if (count >= 64)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const long lo = count * t / nt, hi = count * (t + 1) / nt;  /* ascending slices: first max per slice */
        long best = -1;
        float top = -INFINITY;
        for (long i = lo; i < hi; i++) {
            if (i + 2 < hi)  /* candidate rows are scattered: fetch two ahead while this one is summed */
                for (long off = 0; off < row_bytes; off += 64)
                    _mm_prefetch((const char *)w + idx[i + 2] * ld + off, _MM_HINT_T0);
            float d = dot_plain(&v, idx[i], x, K);
            if (kind == 1) d = round_bf16(d);
            if (best < 0 || d > top) best = idx[i], top = d;
        }
        if (t < 64) best_of[t] = best, top_of[t] = top;
#pragma omp single
        used = nt < 64 ? nt : 64;
    }
    long best = -1;
    float top = -INFINITY;
    for (int t = 0; t < used; t++)  /* slices in ascending order: a tie keeps the earlier row */
        if (best_of[t] >= 0 && (best < 0 || top_of[t] > top)) best = best_of[t], top = top_of[t];
    return best;
}

#define SCREEN_RMAX 64  /* rows per call (the caller chunks) */

#define SCREEN_TILE 8  /* activation rows per pass over a head row; the caller pads R to a multiple */

/* Integer dot products of one head row q [K] with activation rows r0 .. r0+7, as 8 int32 lanes.
 * VNNI: ux = xq + 128 as unsigned bytes, so each product is one vpdpbusd on 64 bytes, and the offset
 * comes back out as 128 * qsum (the row's sum of codes); AVX2: the sign trick with axq = |xq|. */
static inline __m256i screen_dots(const int8_t *q, int qsum, const uint8_t *ux, const int8_t *xq, const int8_t *axq,
                                  int K, int r0) {
#if VNNI
    __m512i acc[SCREEN_TILE];
    for (int j = 0; j < SCREEN_TILE; j++) acc[j] = _mm512_setzero_si512();
    const uint8_t *x0 = ux + (long)r0 * K;
    int k = 0;
    for (; k + 64 <= K; k += 64) {
        if (!r0) prefetch_ahead(q + k);
        const __m512i qv = _mm512_loadu_si512(q + k);
#pragma GCC unroll 8
        for (int j = 0; j < SCREEN_TILE; j++)
            acc[j] = _mm512_dpbusd_epi32(acc[j], _mm512_loadu_si512(x0 + (long)j * K + k), qv);
    }
    if (k < K) {  /* K % 64 == 32: the last half vector */
        const __mmask64 m = (1ULL << (K - k)) - 1;
        const __m512i qv = _mm512_maskz_loadu_epi8(m, q + k);
        for (int j = 0; j < SCREEN_TILE; j++)
            acc[j] = _mm512_dpbusd_epi32(acc[j], _mm512_maskz_loadu_epi8(m, x0 + (long)j * K + k), qv);
    }
    __m256i y[SCREEN_TILE];
    for (int j = 0; j < SCREEN_TILE; j++)
        y[j] = _mm256_add_epi32(_mm512_castsi512_si256(acc[j]), _mm512_extracti64x4_epi64(acc[j], 1));
    (void)xq, (void)axq;
#else
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i y[SCREEN_TILE];
    for (int j0 = 0; j0 < SCREEN_TILE; j0 += 4) {
        __m256i acc[4];
        for (int j = 0; j < 4; j++) acc[j] = _mm256_setzero_si256();
        for (int k = 0; k < K; k += 32) {
            if (!r0 && !j0 && !(k & 63)) prefetch_ahead(q + k);
            const __m256i qv = _mm256_loadu_si256((const __m256i *)(q + k));
            for (int j = 0; j < 4; j++) {
                const long off = (long)(r0 + j0 + j) * K + k;
                const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + off));
                const __m256i p = _mm256_maddubs_epi16(_mm256_loadu_si256((const __m256i *)(axq + off)),
                                                       _mm256_sign_epi8(qv, xv));
                acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(p, ones));
            }
        }
        for (int j = 0; j < 4; j++) y[j0 + j] = acc[j];
    }
    (void)ux;
#endif
    /* eight 8-lane sums at once: two hadd levels, then the 128-bit halves */
    const __m256i t0 = _mm256_hadd_epi32(y[0], y[1]), t1 = _mm256_hadd_epi32(y[2], y[3]);
    const __m256i t2 = _mm256_hadd_epi32(y[4], y[5]), t3 = _mm256_hadd_epi32(y[6], y[7]);
    const __m256i u0 = _mm256_hadd_epi32(t0, t1), u1 = _mm256_hadd_epi32(t2, t3);
    __m256i sums = _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20), _mm256_permute2x128_si256(u0, u1, 0x31));
#if VNNI
    sums = _mm256_sub_epi32(sums, _mm256_set1_epi32(128 * qsum));
#else
    (void)qsum;
#endif
    return sums;
}

/* In-place transpose of an 8 x 8 float block held in eight vectors. */
static inline void transpose8(__m256 *v) {
    __m256 t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(v[i], v[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(v[i], v[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xee);
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xee);
    }
    for (int i = 0; i < 4; i++) {
        v[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
        v[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
}

/* ernie45_head_screen for R activation rows at once, reading the int8 head once: xq [R, K] with
 * axq = |xq| and ux = xq + 128 (unsigned) beside it, per-row sx, l1, half_sx; qsum [N] each head row's
 * sum of codes; a and b [R, N] (row stride N), floors [R]. xq, axq and ux hold R rounded up to a multiple
 * of SCREEN_TILE rows (the padding rows are summed and dropped). Every a, b and floor is bit-identical to
 * ernie45_head_screen on that row alone (exact integer dot products, the same float formula).
 * R <= SCREEN_RMAX, K % 32 == 0. */
void ernie45_head_screen_rows(const int8_t *w, long ld, const float *s, const float *absq, const int *qsum,
                              const int8_t *xq, const int8_t *axq, const uint8_t *ux, const float *sx, const float *l1,
                              const float *half_sx, float slack, int K, int N, int R, float *a, float *b, float *floors,
                              int threads) {
    const int tiles = (R + SCREEN_TILE - 1) / SCREEN_TILE;
    float sxp[SCREEN_RMAX], l1p[SCREEN_RMAX], hp[SCREEN_RMAX];  /* per-row parameters padded to whole tiles */
    for (int r = 0; r < tiles * SCREEN_TILE; r++)
        sxp[r] = r < R ? sx[r] : 0.0f, l1p[r] = r < R ? l1[r] : 0.0f, hp[r] = r < R ? half_sx[r] : 0.0f;
    for (int r = 0; r < R; r++) floors[r] = -INFINITY;
#pragma omp parallel num_threads(threads)
    {
        __m256 top[SCREEN_RMAX / SCREEN_TILE];
        for (int t = 0; t < tiles; t++) top[t] = _mm256_set1_ps(-INFINITY);
        const __m256 slack_v = _mm256_set1_ps(slack), sign = _mm256_set1_ps(-0.0f);
#pragma omp for schedule(static)
        for (int n0 = 0; n0 < N; n0 += 8) {  /* 8 head rows: their logits transposed into 8-float stores */
            const int nt = N - n0 < 8 ? N - n0 : 8;
            for (int t = 0; t < tiles; t++) {
                const int r0 = t * SCREEN_TILE, rt = R - r0 < SCREEN_TILE ? R - r0 : SCREEN_TILE;
                const __m256 sx_v = _mm256_loadu_ps(sxp + r0), l1_v = _mm256_loadu_ps(l1p + r0);
                const __m256 h_v = _mm256_loadu_ps(hp + r0);
                __m256 av[8], bv[8];
                for (int i = 0; i < nt; i++) {  /* lanes: rows r0..r0+7; the float steps of screen_logit */
                    const int n = n0 + i;
                    const __m256 sn = _mm256_set1_ps(s[n]);
                    const __m256i dots = screen_dots(w + n * ld, qsum[n], ux, xq, axq, K, r0);
                    const __m256 an = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(dots), sn), sx_v);
                    const __m256 e = _mm256_mul_ps(sn, _mm256_add_ps(l1_v, _mm256_mul_ps(h_v, _mm256_set1_ps(absq[n]))));
                    const __m256 bn = _mm256_add_ps(e, _mm256_mul_ps(slack_v, _mm256_add_ps(_mm256_andnot_ps(sign, an), e)));
                    av[i] = an, bv[i] = bn;
                    top[t] = _mm256_max_ps(top[t], _mm256_sub_ps(an, bn));
                }
                if (nt == 8) {
                    transpose8(av);
                    transpose8(bv);
                    for (int j = 0; j < rt; j++) {
                        _mm256_storeu_ps(a + (long)(r0 + j) * N + n0, av[j]);
                        _mm256_storeu_ps(b + (long)(r0 + j) * N + n0, bv[j]);
                    }
                } else {
                    for (int i = 0; i < nt; i++) {
                        float al[8], bl[8];
                        _mm256_storeu_ps(al, av[i]);
                        _mm256_storeu_ps(bl, bv[i]);
                        for (int j = 0; j < rt; j++) a[(long)(r0 + j) * N + n0 + i] = al[j], b[(long)(r0 + j) * N + n0 + i] = bl[j];
                    }
                }
            }
        }
#pragma omp critical
        for (int t = 0; t < tiles; t++) {
            float l[8];
            _mm256_storeu_ps(l, top[t]);
            for (int j = 0; j < SCREEN_TILE && t * SCREEN_TILE + j < R; j++) {
                const int r = t * SCREEN_TILE + j;
                floors[r] = l[j] > floors[r] ? l[j] : floors[r];
            }
        }
    }
}


/* The rest of the greedy head for R rows screened together (ernie45_head_screen_rows): for each row r, the
 * candidates of (a[r], b[r], floors[r]) and, when there are at most max_candidates, the first of them with the
 * largest exact logit x[r] . w_row (rounded to bf16 first for a bf16 head, kind 0 fp32 or 1 bf16, row stride
 * ld bytes): ernie45_head_candidates then ernie45_head_exact on that row, with the rows shared among the
 * threads instead of one row's candidates. tokens[r] = -1 where more rows could win (the caller runs the
 * full head there). x [R, K] fp32; a, b [R, N]; idx: scratch of threads * N longs. */
void ernie45_head_pick_rows(const float *a, const float *b, const float *floors, int R, int N, const void *w, long ld,
                            int kind, const float *x, int K, long max_candidates, long *idx, long *tokens,
                            int threads) {
    const wview v = {w, ld, 0, 0, 0, kind, 0};
#pragma omp parallel num_threads(threads)
    {
        long *mine = idx + (long)omp_get_thread_num() * N;
#pragma omp for schedule(dynamic, 1)
        for (int r = 0; r < R; r++) {
            const long count = ernie45_head_candidates(a + (long)r * N, b + (long)r * N, floors[r], N, mine);
            long best = -1;
            float top = -INFINITY;
            if (count > max_candidates) {
                tokens[r] = -1;
                continue;
            }
            for (long i = 0; i < count; i++) {  /* ascending rows: a tie keeps the earlier one */
                float d = dot_plain(&v, mine[i], x + (long)r * K, K);
                if (kind == 1) d = round_bf16(d);
                if (best < 0 || d > top) best = mine[i], top = d;
            }
            tokens[r] = best;
        }
    }
}
