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

/* out[0..R) = rows r..r+R-1 (R <= 4) of W x, any kind, from x and (integer kinds) its prepared row. */
static inline void rows_at(const wview *v, long r, int R, const float *x, const float *xp, const float *xs, int K,
                           float *out) {
    if (v->kind == 2) {
        for (int i = 0; i < R; i++) out[i] = dot_i8(v, r + i, (const int16_t *)xp, xs, K);
    } else if (is_int(v)) {
        for (int i = 0; i < R; i++) out[i] = dot_packed(v, r + i, (const int16_t *)xp, xs, xs + act_blocks(v, K), K);
    } else {
        for (int i = 0; i < R; i++) out[i] = dot_plain(v, r + i, x, K);
    }
}

/* One token through n experts of a stacked SwiGLU: y [D] = sum_i coef[i] * down_e(silu(gate_e x) * up_e x)
 * with e = ids[i], in the given order. gate/up: [F, D] rows, down: [D, F] rows; *_stride: bytes (and
 * scale elements) between consecutive experts. bf16 != 0 rounds every intermediate to bf16 exactly where
 * the torch reference does (gate, silu, up, product, down, coef * down, each running sum), so a bf16 model
 * gets the reference's numbers up to summation order inside the dot products (and, for integer kinds, the
 * int16 activation rounding of the header).
 * Scratch: h [F], xp and xs of max(D, F) floats each: x's prepared row for gate (and up) first,
 * then behind it the one for up (other format) or for down's input h. */
/* Work-shared inside a parallel region: y [D] += sum_i coef[i] * expert_ids[i](x), in the given order,
 * with the torch modules' bf16 rounding points when bf16 != 0 (see ernie45_moe_token). */
static void experts_into(int bf16, const wview *gate, const wview *up, const wview *down, long w_stride_gu,
                         long s_stride_gu, long w_stride_d, long s_stride_d, const long *ids, const float *coef,
                         int n, const float *x, int D, int F, float *y, float *h, float *xp, float *xs,
                         phase_clock *clock, int phase) {
    float *xp2 = (float *)((int16_t *)xp + D), *xs2 = xs + 2 * act_blocks(gate, D);  /* behind x's row */
    /* gate and up share one format (the callers check; the stride arguments assume it), so x is prepared
     * once for both and every expert. The thread that computes a block of h also prepares it for down
     * (no pass and barrier of its own): work items are down's activation blocks. */
    const int fuse = is_int(down), HB = fuse ? act_block(down) : 64, nhb = (F + HB - 1) / HB;
    prep_act(gate, x, 1, D, xp, xs);  /* only kind and group matter */
    for (int i = 0; i < n; i++) {
        wview g = at_expert(gate, ids[i], w_stride_gu, s_stride_gu);
        wview u = at_expert(up, ids[i], w_stride_gu, s_stride_gu);
        wview d = at_expert(down, ids[i], w_stride_d, s_stride_d);
#pragma omp for schedule(static)
        for (int hb = 0; hb < nhb; hb++) {
            const int r1 = (hb + 1) * HB < F ? (hb + 1) * HB : F;
            for (int r0 = hb * HB; r0 < r1; r0 += 4) {
                const int R = r1 - r0 < 4 ? r1 - r0 : 4;
                float ga[4], ua[4];
                rows_at(&g, r0, R, x, xp, xs, D, ga);
                rows_at(&u, r0, R, x, xp, xs, D, ua);
                for (int j = 0; j < R; j++) {
                    float a = ga[j], b = ua[j];
                    if (bf16) a = round_bf16(a), b = round_bf16(b);
                    float act = a / (1.f + expf(-a));
                    h[r0 + j] = bf16 ? round_bf16(round_bf16(act) * b) : act * b;
                }
            }
            if (fuse) prep_block(&d, h, F, hb, (int16_t *)xp2, xs2);
        }
        if (!fuse) prep_act(&d, h, 1, F, xp2, xs2);
        mark(clock, phase);  /* gate and up (with h prepared for down) */
#pragma omp for schedule(static)
        for (int r = 0; r < D; r++) {  /* y += coef * down_e h, row by row: each y[r] has one owner */
            float t;
            rows_at(&d, r, 1, h, xp2, xs2, F, &t);
            y[r] = bf16 ? round_bf16(y[r] + round_bf16(coef[i] * round_bf16(t))) : y[r] + coef[i] * t;
        }
        mark(clock, phase + 1);  /* down */
    }
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
        for (int c = 0; c < D; c++)
            for (int r = 0; r < n; r++) {
                float *o = y + tok[p0 + r] * D + c;
                const float t = Y[(long)r * D + c];
                *o = bf16 ? round_bf16(*o + round_bf16(coef[p0 + r] * round_bf16(t))) : *o + coef[p0 + r] * t;
            }
        p0 = p1;
    }
}
