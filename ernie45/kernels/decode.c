/* One decoded token through every trunk layer of an ERNIE 4.5 model, in one call (batch 1).
 *
 * Compiled together with gemv.c, moe.c and head.c (this file includes them). The Python side
 * (ernie45/fast_decode.py) fills one `layer_t` per decoder layer with views of the model's own parameters
 * and KV cache buffers, so nothing is copied; the model's modules stay the reference this is tested
 * against (tests/test_fast_decode.py).
 *
 * Per layer, for residual x [D] (spec section 2; the order and rounding points of the torch modules):
 *   h = RMSNorm(x); q,k,v = W h; interleaved RoPE on q,k (cos/sin given, computed by torch);
 *   K/V written at `pos`; softmax(q.k * Dh^-0.5) over positions 0..pos (fp32 softmax); o = W_o att;
 *   x += o; h = RMSNorm(x); x += MLP(h)  (dense SwiGLU, or router + top-k experts + shared experts).
 * With bf16 != 0 every value is rounded to bf16 wherever the torch bf16 modules round (linear outputs,
 * norms, RoPE, scores, probabilities, activations, products, sums), so a bf16 model's decode equals the
 * reference up to summation order inside dot products and libm-vs-torch exp/rsqrt last bits.
 * Built with -ffp-contract=off so that a*b+c stays two roundings, as in torch's elementwise ops.
 */
#include "gemv.c"
#include "moe.c"
#include "head.c"

typedef struct {
    wview q, k, v, o;
    const void *in_norm, *post_norm;  /* [D], kind of the activations (0 fp32, 1 bf16) */
    int moe;                          /* 0: dense MLP in gate/up/down; 1: routed experts */
    wview gate, up, down;             /* dense [F, D] / [D, F]; experts stacked [E, F, D] / [E, D, F] */
    long w_stride_gu, s_stride_gu, w_stride_d, s_stride_d;
    int F;
    const float *router;              /* [E, D] fp32 */
    const float *bias;                /* [E] fp32 (selection only) */
    int E, topk;
    int shared;                       /* shared experts present */
    wview sgate, sup, sdown;
    int Fs;
    void *kcache, *vcache;            /* [S_max, Nkv, Dh] in the activation dtype */
} layer_t;

typedef struct {
    int D, Nq, Nkv, Dh, layers, bf16, max_f;
    int max_h;                   /* MLP hidden floats of one token: max of top-k * F, shared F, dense F */
    float eps, norm_min, scale;  /* scale = Dh^-0.5 as torch computes it (double, then float) */
} model_t;

static inline float rnd(int bf16, float f) { return bf16 ? round_bf16(f) : f; }

static inline float load_act(int bf16, const void *p, long i) {
    if (!bf16) return ((const float *)p)[i];
    uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline void store_act(int bf16, void *p, long i, float f) {  /* f already representable */
    if (!bf16) {
        ((float *)p)[i] = f;
        return;
    }
    uint32_t u;
    memcpy(&u, &f, 4);
    ((uint16_t *)p)[i] = (uint16_t)(u >> 16);
}

/* h = w * cast(x * rsqrt(mean(x^2) + eps)) (layers.RMSNorm). Called by one thread. */
static void rms_norm(const model_t *m, const void *w, const float *x, float *h) {
    float ss = 0.f;
    for (int i = 0; i < m->D; i++) ss += x[i] * x[i];
    const float r = 1.f / sqrtf(ss / m->D + m->eps);
    for (int i = 0; i < m->D; i++) h[i] = rnd(m->bf16, load_act(m->bf16, w, i) * rnd(m->bf16, x[i] * r));
}

/* One row of layers.RMSNorm outside the decode step (the final norm before the head): out [D] fp32 holds
 * values of the activation dtype (bf16 != 0: w and the rounding are bf16). */
void ernie45_rms_norm(const void *w, const float *x, int D, float eps, int bf16, float *out) {
    model_t m;
    memset(&m, 0, sizeof m);
    m.D = D, m.eps = eps, m.bf16 = bf16;
    rms_norm(&m, w, x, out);
}

/* Rotate adjacent pairs of each head in place: (a, b) -> (a c - b s, b c + a s), cos/sin [Dh]. */
static void rope(const model_t *m, float *t, int heads, const float *cs, const float *sn) {
    for (int hd = 0; hd < heads; hd++) {
        float *p = t + (long)hd * m->Dh;
        for (int i = 0; i < m->Dh; i += 2) {
            const float a = p[i], b = p[i + 1];
            const float ra = a * cs[i] + (-b) * sn[i], rb = b * cs[i + 1] + a * sn[i + 1];
            p[i] = rnd(m->bf16, ra);
            p[i + 1] = rnd(m->bf16, rb);
        }
    }
}

/* Work-shared: y = rnd(W x) over the rows of v. */
static void linear(const model_t *m, const wview *v, const float *x, int K, int N, float *y, float *xp, float *xs) {
    prep_act(v, x, 1, K, xp, xs);
    rows_one(v, x, K, N, y, xp, xs, m->bf16);
}

/* Work-shared: q, k, v = rnd(W h) into consecutive outputs (q [qd], k and v [kd] follow in scratch): one
 * loop over all their rows when they can share h's prepared row, else one linear each. */
static void qkv(const model_t *m, const layer_t *L, const float *h, float *q, float *xp, float *xs) {
    const int D = m->D, qd = m->Nq * m->Dh, kd = m->Nkv * m->Dh;
    if (!same_act(&L->q, &L->k) || !same_act(&L->k, &L->v)) {
        linear(m, &L->q, h, D, qd, q, xp, xs);
        linear(m, &L->k, h, D, kd, q + qd, xp, xs);
        linear(m, &L->v, h, D, kd, q + qd + kd, xp, xs);
        return;
    }
    prep_act(&L->q, h, 1, D, xp, xs);
#pragma omp for schedule(static)
    for (int n = 0; n < qd + 2 * kd; n++) {
        const wview *w = n < qd ? &L->q : n < qd + kd ? &L->k : &L->v;
        const long r = n < qd ? n : n < qd + kd ? n - qd : n - qd - kd;
        float o;
        rows_at(w, r, 1, h, xp, xs, D, &o);
        q[n] = rnd(m->bf16, o);
    }
}

/* sum_i a[i] * b[i], b in the activation dtype (fp32 or raw bf16); 8 lanes, then the tail. */
static float dot_act(int bf16, const float *a, const void *b, long off, int n) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m256 b0 = bf16 ? load_bf16x8((const uint16_t *)b + off + i) : _mm256_loadu_ps((const float *)b + off + i);
        const __m256 b1 = bf16 ? load_bf16x8((const uint16_t *)b + off + i + 8)
                               : _mm256_loadu_ps((const float *)b + off + i + 8);
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), b0, acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), b1, acc1);
    }
    float d = hsum8(_mm256_add_ps(acc0, acc1));
    for (; i < n; i++) d += a[i] * load_act(bf16, b, off + i);
    return d;
}

/* Where position s of a sequence sits in a layer's K/V rows: s itself in a contiguous cache (table NULL), or
 * slot table[s / bs] * bs + s % bs of a paged one (the engine's block table of that sequence). */
static inline long kv_slot(const long *table, int bs, int s) { return table ? table[s / bs] * bs + s % bs : s; }

/* Attention of query head j over positions 0..pos for one layer (called per head, work-shared); keys and
 * values at L->kcache / L->vcache, contiguous or through a block table (kv_slot). */
static void attend_head(const model_t *m, const layer_t *L, const float *q, int j, int pos, float *sc, float *out,
                        const long *table, int bs) {
    const int G = m->Nq / m->Nkv, kvh = j / G, Dh = m->Dh;
    const float scale = m->scale;
    const float *qj = q + (long)j * Dh;
    float mx = -INFINITY;
    for (int s = 0; s <= pos; s++) {
        float d = dot_act(m->bf16, qj, L->kcache, (kv_slot(table, bs, s) * m->Nkv + kvh) * Dh, Dh);
        d = rnd(m->bf16, rnd(m->bf16, d) * scale);
        sc[s] = d;
        if (d > mx) mx = d;
    }
    float sum = 0.f;
    for (int s = 0; s <= pos; s++) sum += (sc[s] = expf(sc[s] - mx));
    for (int s = 0; s <= pos; s++) sc[s] = rnd(m->bf16, sc[s] / sum);
    float *oj = out + (long)j * Dh;
    for (int i = 0; i < Dh; i++) oj[i] = 0.f;
    for (int s = 0; s <= pos; s++) {  /* oj += p_s * v_s: independent lanes, the same order per element */
        const long base = (kv_slot(table, bs, s) * m->Nkv + kvh) * Dh;
        const __m256 p = _mm256_set1_ps(sc[s]);
        int i = 0;
        for (; i + 8 <= Dh; i += 8) {
            const __m256 v = m->bf16 ? load_bf16x8((const uint16_t *)L->vcache + base + i)
                                     : _mm256_loadu_ps((const float *)L->vcache + base + i);
            _mm256_storeu_ps(oj + i, _mm256_add_ps(_mm256_loadu_ps(oj + i), _mm256_mul_ps(p, v)));
        }
        for (; i < Dh; i++) oj[i] += sc[s] * load_act(m->bf16, L->vcache, base + i);
    }
    for (int i = 0; i < Dh; i++) oj[i] = rnd(m->bf16, oj[i]);
}

/* Decode attention of a serving step over the engine's paged K/V pool (one layer's K and V rows
 * [slots, Nkv, Dh] in the activation dtype, this step's K/V already written): query row n (q [N, Nq*Dh]
 * fp32, holding activation-dtype values) of sequence seq[n] at position pos[n] attends that sequence's
 * positions 0..pos[n] through its block table (tables [R, mb]). The math and rounding points of
 * attention.attend_gqa (as the one-call decode step). out [N, Nq*Dh]; sc: threads * (max_pos + 1) floats. */
void ernie45_paged_attention(const model_t *m, const void *kpool, const void *vpool, const long *tables, int mb,
                             int bs, const long *seq, const long *pos, int N, const float *q, float *out, float *sc,
                             int max_pos, int threads) {
    layer_t L;
    memset(&L, 0, sizeof(L));
    L.kcache = (void *)kpool, L.vcache = (void *)vpool;
    const int qd = m->Nq * m->Dh;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int t = 0; t < N * m->Nq; t++) {
        const int n = t / m->Nq, j = t % m->Nq;
        attend_head(m, &L, q + (long)n * qd, j, (int)pos[n], sc + (long)omp_get_thread_num() * (max_pos + 1),
                    out + (long)n * qd, tables + seq[n] * mb, bs);
    }
}

/* Router for one token (moe.Router + select_experts): ids ascending, coef in the activation dtype. */
static void route(const model_t *m, const layer_t *L, float *logits, long *ids, float *coef) {
    float mx = -INFINITY, sum = 0.f;
    for (int e = 0; e < L->E; e++) mx = fmaxf(mx, logits[e]);
    for (int e = 0; e < L->E; e++) sum += (logits[e] = expf(logits[e] - mx));
    for (int e = 0; e < L->E; e++) logits[e] /= sum;  /* probabilities */
    int chosen[64];
    float total = 0.f;
    for (int t = 0; t < L->topk; t++) {  /* largest p + bias not yet chosen; ties: lowest id */
        int best = -1;
        for (int e = 0; e < L->E; e++) {
            int used = 0;
            for (int u = 0; u < t; u++) used |= chosen[u] == e;
            if (!used && (best < 0 || logits[e] + L->bias[e] > logits[best] + L->bias[best])) best = e;
        }
        chosen[t] = best;
        total += logits[best];
    }
    total = fmaxf(total, m->norm_min);
    for (int a = 1; a < L->topk; a++)  /* ascending expert id: the reference's summation order */
        for (int b = a; b > 0 && chosen[b - 1] > chosen[b]; b--) {
            int tmp = chosen[b];
            chosen[b] = chosen[b - 1];
            chosen[b - 1] = tmp;
        }
    for (int t = 0; t < L->topk; t++) {
        ids[t] = chosen[t];
        coef[t] = rnd(m->bf16, logits[chosen[t]] / total);
    }
}

/* Phases of the step that `prof` (when not NULL) accumulates seconds into, summed over layers. */
enum { P_NORM_QKV, P_ROPE_KV, P_ATTEND, P_O_NORM, P_ROUTER, P_EXPERTS_GU, P_EXPERTS_DOWN, P_SHARED_GU,
       P_SHARED_DOWN, P_DENSE_GU, P_DENSE_DOWN, P_RESIDUAL, P_COUNT };

int ernie45_decode_phases(void) { return P_COUNT; }

/* x [D] (the residual stream, values of the activation dtype) -> after every trunk layer, in place.
 * scratch floats: 6*D + 2*Nq*Dh + 2*Nkv*Dh + Nq*(pos+1) + 3*max_h + 2*max(D, max_f, Nq*Dh) + 4*64. */
void ernie45_decode(const model_t *m, const layer_t *layers, float *x, int pos, const float *cs, const float *sn,
                    float *scratch, int threads, double *prof) {
    const int D = m->D, qd = m->Nq * m->Dh, kd = m->Nkv * m->Dh;
    const int W = D > m->max_f ? (D > qd ? D : qd) : (m->max_f > qd ? m->max_f : qd);  /* widest input */
    float *h = scratch, *q = h + D, *k = q + qd, *v = k + kd, *att = v + kd, *o = att + qd, *y = o + D;
    float *hh = y + D, *xp = hh + m->max_h, *xs = xp + W + m->max_h, *lg = xs + W + m->max_h, *coef = lg + 64;
    long *ids = (long *)(coef + 64);  /* 64 longs = 128 floats of room */
    float *sc = (float *)(ids + 64);
    const float one = 1.f;
    const long zero_id = 0;
    phase_clock clock = {prof, omp_get_wtime()}, *ck = prof ? &clock : NULL;  /* thread 0 marks */
#pragma omp parallel num_threads(threads)
    for (int l = 0; l < m->layers; l++) {
        const layer_t *L = &layers[l];
#pragma omp single
        rms_norm(m, L->in_norm, x, h);
        qkv(m, L, h, q, xp, xs);  /* k = q + qd, v = k + kd */
        mark(ck, P_NORM_QKV);
#pragma omp single
        {
            rope(m, q, m->Nq, cs, sn);
            rope(m, k, m->Nkv, cs, sn);
            for (int i = 0; i < kd; i++) {
                store_act(m->bf16, L->kcache, (long)pos * kd + i, k[i]);
                store_act(m->bf16, L->vcache, (long)pos * kd + i, v[i]);
            }
        }
        mark(ck, P_ROPE_KV);
#pragma omp for schedule(static)
        for (int j = 0; j < m->Nq; j++) attend_head(m, L, q, j, pos, sc + (long)j * (pos + 1), att, NULL, 0);
        mark(ck, P_ATTEND);
        linear(m, &L->o, att, qd, D, o, xp, xs);
#pragma omp single
        {
            for (int i = 0; i < D; i++) x[i] = rnd(m->bf16, x[i] + o[i]);
            rms_norm(m, L->post_norm, x, h);
            for (int i = 0; i < D; i++) y[i] = 0.f;
        }
        mark(ck, P_O_NORM);
        if (L->moe) {
#pragma omp for schedule(static)
            for (int e = 0; e < L->E; e++) lg[e] = dot_act(0, h, L->router, (long)e * D, D);
#pragma omp single
            route(m, L, lg, ids, coef);
            mark(ck, P_ROUTER);
            experts_into(m->bf16, &L->gate, &L->up, &L->down, L->w_stride_gu, L->s_stride_gu, L->w_stride_d,
                         L->s_stride_d, ids, coef, L->topk, h, D, L->F, y, hh, xp, xs, ck, P_EXPERTS_GU);
            if (L->shared)
                experts_into(m->bf16, &L->sgate, &L->sup, &L->sdown, 0, 0, 0, 0, &zero_id, &one, 1, h, D, L->Fs, y,
                             hh, xp, xs, ck, P_SHARED_GU);
        } else {
            experts_into(m->bf16, &L->gate, &L->up, &L->down, 0, 0, 0, 0, &zero_id, &one, 1, h, D, L->F, y, hh,
                         xp, xs, ck, P_DENSE_GU);
        }
#pragma omp single
        for (int i = 0; i < D; i++) x[i] = rnd(m->bf16, x[i] + y[i]);
        mark(ck, P_RESIDUAL);
    }
}

/* One greedy decode step in one call: ernie45_decode, the final RMSNorm (norm_w [D], activation dtype)
 * into xn [D], and greedy_head.py's exact screened argmax over the head: x rounded to int8 (sx = max|x| /
 * 127, half to even; xq [D] scratch), ernie45_head_screen over the int8 head hq [V, D] (scale, sum |q| per
 * row, relative slack) into a, b [V], the candidate rows into idx [V], and ernie45_head_exact over them in
 * the head's own weights hw (kind 0 fp32 / 1 bf16). Returns the token id, or -1 when more than max_cand
 * rows can still win (the caller then runs the full head on xn). Saves the ~30 torch and ctypes calls per
 * token between these steps, which run slowly on caches the weights just streamed through. */
long ernie45_greedy_step(const model_t *m, const layer_t *layers, float *x, int pos, const float *cs, const float *sn,
                         float *scratch, int threads, double *prof, const void *norm_w, float *xn, int8_t *xq,
                         const int8_t *hq, long hq_ld, const float *hscale, const float *habsq, int V, float slack,
                         const void *hw, long hw_ld, int hw_kind, float *a, float *b, long *idx, long max_cand) {
    ernie45_decode(m, layers, x, pos, cs, sn, scratch, threads, prof);
    rms_norm(m, norm_w, x, xn);  /* the final norm has the layers' eps (config.rms_norm_eps) */
    const int D = m->D;
    double l1 = 0.;
    float mx = 0.f;
    for (int i = 0; i < D; i++) {
        l1 += fabsf(xn[i]);
        mx = fabsf(xn[i]) > mx ? fabsf(xn[i]) : mx;
    }
    if (!isfinite(l1)) return -1;  /* NaN or infinity: the full head gives the reference's answer */
    const float sx = mx > 0.f ? (float)((double)mx / 127.) : 1.f;
    for (int i = 0; i < D; i++) {
        const float r = nearbyintf(xn[i] / sx);  /* round half to even (the default rounding mode) */
        xq[i] = (int8_t)(r > 127.f ? 127.f : r < -127.f ? -127.f : r);
    }
    const float floor = ernie45_head_screen(hq, hq_ld, hscale, habsq, xq, sx, (float)(0.5 * l1), sx / 2, slack, D, V,
                                            a, b, threads);
    const long count = ernie45_head_candidates(a, b, floor, V, idx);
    if (count > max_cand) return -1;
    return ernie45_head_exact(hw, hw_ld, hw_kind, idx, count, xn, D, threads);
}
