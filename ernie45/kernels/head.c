/* The exact greedy head's C steps (ernie45/greedy_head.py): integer screen with its error bound, the
 * rows that can still win, and their exact logits. Part of the one kernel library: decode.c includes
 * gemv.c, moe.c, then this file. Shapes: N (= V) head rows, K hidden.
 */

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
        __m128i t = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1));
        const float an = (float)_mm_cvtsi128_si32(t) * s[n] * sx;
        const float e = s[n] * (l1 + half_sx * absq[n]);
        const float bn = e + slack * (fabsf(an) + e);
        a[n] = an;
        b[n] = bn;
        floor = an - bn > floor ? an - bn : floor;
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
