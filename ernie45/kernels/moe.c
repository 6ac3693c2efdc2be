/* The MoE expert steps of the decode kernels: one token through its selected experts
 * (ernie45_moe_token, and experts_into inside decode.c's one-call step) and a decode batch through its
 * experts, each expert once on all its rows (ernie45_moe_tokens). Part of the one kernel library:
 * decode.c includes gemv.c, then this file, then head.c. Shapes: D hidden, F expert width.
 */

/* Where one decode step's wall time goes (ernie45_decode with a non-NULL `acc`): thread 0 adds the time since
 * its last mark to acc[phase] right after each work-shared construct, whose closing barrier makes that the
 * phase's wall time for every thread. Off (acc NULL) it costs one test per mark. */
typedef struct {
    double *acc;
    double t;
} phase_clock;

static inline void mark(phase_clock *c, int phase) {
    if (!c || !c->acc || omp_get_thread_num()) return;
    const double t = omp_get_wtime();
    c->acc[phase] += t - c->t;
    c->t = t;
}

static wview at_expert(const wview *v, long e, long w_stride, long s_stride) {
    wview r = *v;
    r.w = (const char *)v->w + e * w_stride;
    if (v->s) r.s = v->s + e * s_stride;
    if (v->z) r.z = v->z + e * s_stride;
    return r;
}

/* out[0..R) = rows r..r+R-1 (R <= 4) of W x, any kind, from x and (integer kinds) its prepared row; int4
 * rows of at most PAIR_MAX_K columns four (or two) at a time, sharing x's loads: in one token's expert
 * down projections 1.17x over pairs (bench/results/kernel_ab_quads/kernel_ab.md, moe_token case, Zen 4). */
static inline void rows_at(const wview *v, long r, int R, const float *x, const float *xp, const float *xs, int K,
                           float *out) {
    if (v->kind == 2) {
        for (int i = 0; i < R; i++) out[i] = dot_i8(v, r + i, (const int16_t *)xp, xs, K);
    } else if (split_q4(v) && K <= PAIR_MAX_K) {  /* quads and pairs of short rows share the loads of x */
        const float *sum = xs + act_blocks(v, K);
        int i = 0;
        for (; i + 4 <= R; i += 4) dot_q4_tile(v, r + i, 4, (const int16_t *)xp, xs, 1, K, 1, out + i);
        for (; i + 2 <= R; i += 2) dot_q4_tile(v, r + i, 2, (const int16_t *)xp, xs, 1, K, 1, out + i);
        if (i < R) out[i] = dot_q4_split(v, r + i, (const int16_t *)xp, xs, sum, K);
    } else if (is_int(v)) {
        for (int i = 0; i < R; i++) out[i] = dot_packed(v, r + i, (const int16_t *)xp, xs, xs + act_blocks(v, K), K);
    } else {
        for (int i = 0; i < R; i++) out[i] = dot_plain(v, r + i, x, K);
    }
}

/* Work-shared inside a parallel region: one token through n experts of a stacked SwiGLU,
 * y [D] += sum_i coef[i] * down_e(silu(gate_e x) * up_e x) with e = ids[i], summed in the given order.
 * gate/up: [F, D] rows, down: [D, F] rows; *_stride: bytes (and scale elements) between consecutive
 * experts. bf16 != 0 rounds every intermediate to bf16 exactly where the torch reference does (gate, silu,
 * up, product, down, coef * down, each running sum), so a bf16 model gets the reference's numbers up to
 * summation order inside the dot products (and, for integer kinds, the int16 activation rounding of the
 * header).
 * Two passes, whatever n: gate/up of every expert in one work-shared loop (each h_i block prepared for
 * down by the thread that computed it), then every expert's down in loops without a barrier between them:
 * the same static partition of the D output rows gives each row one owner, who adds the experts in order.
 * Scratch: h [n*F]; xp and xs of max(D, F) + n*F floats each: x's prepared row, then each h_i's. */
static void experts_into(int bf16, const wview *gate, const wview *up, const wview *down, long w_stride_gu,
                         long s_stride_gu, long w_stride_d, long s_stride_d, const long *ids, const float *coef,
                         int n, const float *x, int D, int F, float *y, float *h, float *xp, float *xs,
                         phase_clock *clock, int phase) {
    /* gate and up share one format (the callers check; the stride arguments assume it), so x is prepared
     * once for both and every expert. Work items of the first pass are down's activation blocks. */
    const int fuse = is_int(down), HB = fuse ? act_block(down) : 64, nhb = (F + HB - 1) / HB;
    const int nbg = act_blocks(gate, D), nbd = act_blocks(down, F);
#define XP2(i) ((int16_t *)xp + D + (long)(i) * F)  /* h_i's prepared row, behind x's */
#define XS2(i) (xs + 2 * nbg + (long)(i) * 2 * nbd)
    prep_act(gate, x, 1, D, xp, xs);  /* only kind and group matter */
#pragma omp for schedule(static)
    for (int t = 0; t < n * nhb; t++) {
        const int i = t / nhb, hb = t % nhb, r1 = (hb + 1) * HB < F ? (hb + 1) * HB : F;
        const wview g = at_expert(gate, ids[i], w_stride_gu, s_stride_gu), u = at_expert(up, ids[i], w_stride_gu, s_stride_gu);
        float *hi = h + (long)i * F;
        for (int r0 = hb * HB; r0 < r1; r0 += 4) {
            const int R = r1 - r0 < 4 ? r1 - r0 : 4;
            float ga[4], ua[4];
            rows_at(&g, r0, R, x, xp, xs, D, ga);
            rows_at(&u, r0, R, x, xp, xs, D, ua);
            for (int j = 0; j < R; j++) {
                float a = ga[j], b = ua[j];
                if (bf16) a = round_bf16(a), b = round_bf16(b);
                float act = a / (1.f + expf(-a));
                hi[r0 + j] = bf16 ? round_bf16(round_bf16(act) * b) : act * b;
            }
        }
        if (fuse) {
            const wview d = at_expert(down, ids[i], w_stride_d, s_stride_d);
            prep_block(&d, hi, F, hb, XP2(i), XS2(i));
        }
    }
    mark(clock, phase);  /* gate and up (with each h_i prepared for down) */
    for (int i = 0; i < n; i++) {
        const wview d = at_expert(down, ids[i], w_stride_d, s_stride_d);
        const float *hi = h + (long)i * F;  /* integer kinds: prepared in the first pass; float: used as is */
#pragma omp for schedule(static) nowait
        for (int p = 0; p < (D + 3) / 4; p++) {  /* y += coef * down_e h, four rows at a time */
            const int r0 = 4 * p, R = D - r0 < 4 ? D - r0 : 4;
            float t[4];
            rows_at(&d, r0, R, hi, (const float *)XP2(i), XS2(i), F, t);
            for (int j = 0; j < R; j++) {
                float *o = y + r0 + j;
                *o = bf16 ? round_bf16(*o + round_bf16(coef[i] * round_bf16(t[j]))) : *o + coef[i] * t[j];
            }
        }
    }
#pragma omp barrier
    mark(clock, phase + 1);  /* down */
#undef XP2
#undef XS2
}

/* Work-shared: y [N] = W x for one activation row prepared for v (prep_act), rounded to bf16 if asked:
 * one loop, one barrier. */
static void rows_one(const wview *v, const float *x, int K, int N, float *y, const float *xp, const float *xs,
                     int bf16) {
#pragma omp for schedule(static)
    for (int n = 0; n < N; n++) {
        float o;
        rows_at(v, n, 1, x, xp, xs, K, &o);
        y[n] = bf16 ? round_bf16(o) : o;
    }
}

void ernie45_moe_token(const wview *gate, const wview *up, const wview *down, long w_stride_gu,
                       long s_stride_gu, long w_stride_d, long s_stride_d, const long *ids, const float *coef,
                       int n, const float *x, int D, int F, float *y, float *h, float *xp, float *xs,
                       int bf16, int threads) {
#pragma omp parallel num_threads(threads)
    experts_into(bf16, gate, up, down, w_stride_gu, s_stride_gu, w_stride_d, s_stride_d, ids, coef, n, x, D, F, y,
                 h, xp, xs, NULL, 0);
}

/* Several tokens through their experts: pairs p (sorted by expert, then token) of (ids[p], tok[p], coef[p]).
 * A token appears at most once per expert (top-k picks distinct experts; kernels.moe_tokens checks).
 * Each expert runs once on all its rows, max_rows at a time (an expert with more rows, as in a prefill,
 * reads its weights once per max_rows; each token still meets its experts in ascending order): gather x rows,
 * h = silu(gate X) * (up X), Y = down h, y[tok] += coef * Y row, ascending expert then token, with the
 * bf16 reference's rounding points (moe.Experts.grouped: index_add_ into a bf16 output).
 * x [T, D]; y [T, D] fp32 (zeroed by the caller). Scratch: X [max_rows*D], G and U [max_rows*F],
 * Y [max_rows*D], xp [max_rows*max(D,F)], xs [max_rows*max(D,F)]. */
void ernie45_moe_tokens(const wview *gate, const wview *up, const wview *down, long w_stride_gu, long s_stride_gu,
                        long w_stride_d, long s_stride_d, const long *ids, const long *tok, const float *coef,
                        int P, int max_rows, const float *x, int D, int F, float *y, float *X, float *G, float *U,
                        float *Y, float *xp, float *xs, int bf16, int threads) {
#pragma omp parallel num_threads(threads)
    for (int p0 = 0; p0 < P;) {
        int p1 = p0;
        while (p1 < P && ids[p1] == ids[p0] && p1 - p0 < max_rows) p1++;
        const int n = p1 - p0;
        wview g = at_expert(gate, ids[p0], w_stride_gu, s_stride_gu), u = at_expert(up, ids[p0], w_stride_gu, s_stride_gu);
        wview d = at_expert(down, ids[p0], w_stride_d, s_stride_d);
#pragma omp for schedule(static)
        for (int r = 0; r < n; r++) memcpy(X + (long)r * D, x + tok[p0 + r] * D, sizeof(float) * D);
        gemv_shared(&g, X, n, D, F, G, xp, xs);
        rows_of(&u, X, n, D, F, U, xp, xs);  /* up shares gate's format: X's prepared rows serve it too */
#pragma omp for schedule(static)
        for (long i = 0; i < (long)n * F; i++) {
            float a = G[i], b = U[i];
            if (bf16) a = round_bf16(a), b = round_bf16(b);
            float act = a / (1.f + expf(-a));
            G[i] = bf16 ? round_bf16(round_bf16(act) * b) : act * b;
        }
        gemv_shared(&d, G, n, F, D, Y, xp, xs);
#pragma omp for schedule(static)
        for (int r = 0; r < n; r++) {  /* one token per row of an expert (the caller checks): rows are disjoint */
            float *o = y + tok[p0 + r] * D;
            const float *t = Y + (long)r * D;
            const float cf = coef[p0 + r];
            if (bf16)
                for (int c = 0; c < D; c++) o[c] = round_bf16(o[c] + round_bf16(cf * round_bf16(t[c])));
            else
                for (int c = 0; c < D; c++) o[c] += cf * t[c];
        }
        p0 = p1;
    }
}
