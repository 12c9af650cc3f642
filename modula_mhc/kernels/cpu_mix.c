/* Fused CPU passes for the mHC stream mixing (float32, contiguous), called through ctypes by
 * cpu_mix.py. Each function makes one pass over the stream: per token the n×C block stays in L1,
 * where torch's batched (n×n)(n×C) products run at a few GFLOP/s on CPU.
 *
 * Layout: x, r, dr, dx, dout (T, n, C); u, du, f, df (T, C); p, q, dp, dq (T, n); H, dH (T, n, n),
 * H[t, i, j] weighting input stream j in output stream i. Tokens are split over `threads` pthreads.
 * Sums over C accumulate in float32 in vector lanes (the order differs from torch's, not the
 * precision).
 */
#include <pthread.h>
#include <stdint.h>

typedef void (*token_range_fn)(const void *args, int64_t begin, int64_t end);

typedef struct {
    token_range_fn fn;
    const void *args;
    int64_t begin, end;
} chunk_t;

static void *run_chunk(void *arg) {
    chunk_t *c = (chunk_t *)arg;
    c->fn(c->args, c->begin, c->end);
    return 0;
}

/* fn over [0, T) in `threads` contiguous chunks; the calling thread takes the first one */
static void parallel_tokens(token_range_fn fn, const void *args, int64_t T, int threads) {
    if (threads > 64) threads = 64;
    if (threads < 1 || T < 2 * threads) threads = 1;
    chunk_t chunks[64];
    pthread_t ids[64];
    int started[64] = {0};
    int64_t step = (T + threads - 1) / threads;
    for (int k = 0; k < threads; k++) {
        int64_t b = k * step, e = b + step < T ? b + step : T;
        chunks[k] = (chunk_t){fn, args, b, e};
    }
    for (int k = 1; k < threads; k++)
        started[k] = pthread_create(&ids[k], 0, run_chunk, &chunks[k]) == 0;
    for (int k = 1; k < threads; k++)  /* a thread that could not start: its chunk runs here */
        if (!started[k]) run_chunk(&chunks[k]);
    run_chunk(&chunks[0]);
    for (int k = 1; k < threads; k++)
        if (started[k]) pthread_join(ids[k], 0);
}

typedef struct {
    int64_t n, C;
    const float *x, *p, *H, *du, *dr, *f, *q, *dout;
    float *u, *r, *dx, *dp, *dH, *df, *dq, *out;
} mix_args;

/* u = Σ_i p_i x_i and r_i = Σ_j H_ij x_j (p and u null: the residual mix alone; H and r null:
 * the pre-mix alone) */
static void pre_res_range(const void *a_, int64_t t0, int64_t t1) {
    const mix_args *a = (const mix_args *)a_;
    const int64_t n = a->n, C = a->C;
    for (int64_t t = t0; t < t1; t++) {
        const float *x = a->x + t * n * C;
        if (a->u) {
            const float *p = a->p + t * n;
            float *restrict u = a->u + t * C;
            for (int64_t c = 0; c < C; c++) u[c] = p[0] * x[c];
            for (int64_t j = 1; j < n; j++) {
                const float pj = p[j], *restrict xj = x + j * C;
                for (int64_t c = 0; c < C; c++) u[c] += pj * xj[c];
            }
        }
        if (!a->r) continue;
        const float *H = a->H + t * n * n;
        for (int64_t i = 0; i < n; i++) {
            float *restrict ri = a->r + (t * n + i) * C;
            const float *Hi = H + i * n;
            for (int64_t c = 0; c < C; c++) ri[c] = Hi[0] * x[c];
            for (int64_t j = 1; j < n; j++) {
                const float h = Hi[j], *restrict xj = x + j * C;
                for (int64_t c = 0; c < C; c++) ri[c] += h * xj[c];
            }
        }
    }
}

static float dot(const float *restrict a, const float *restrict b, int64_t C) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t c = 0; c < C; c++) s += a[c] * b[c];
    return s;
}

/* dx_j = p_j du + Σ_i H_ij dr_i, dp_i = ⟨x_i, du⟩, dH_ij = ⟨dr_i, x_j⟩ */
static void pre_res_backward_range(const void *a_, int64_t t0, int64_t t1) {
    const mix_args *a = (const mix_args *)a_;
    const int64_t n = a->n, C = a->C;
    for (int64_t t = t0; t < t1; t++) {
        const float *x = a->x + t * n * C, *dr = a->dr + t * n * C, *du = a->du + t * C;
        const float *p = a->p + t * n, *H = a->H + t * n * n;
        float *dp = a->dp + t * n, *dH = a->dH + t * n * n;
        for (int64_t i = 0; i < n; i++) {
            dp[i] = dot(x + i * C, du, C);
            for (int64_t j = 0; j < n; j++) dH[i * n + j] = dot(dr + i * C, x + j * C, C);
        }
        for (int64_t j = 0; j < n; j++) {
            float *restrict dxj = a->dx + (t * n + j) * C;
            const float pj = p[j];
            for (int64_t c = 0; c < C; c++) dxj[c] = pj * du[c];
            for (int64_t i = 0; i < n; i++) {
                const float h = H[i * n + j], *restrict dri = dr + i * C;
                for (int64_t c = 0; c < C; c++) dxj[c] += h * dri[c];
            }
        }
    }
}

/* out_i += q_i f (out holds the residual mix) */
static void add_post_range(const void *a_, int64_t t0, int64_t t1) {
    const mix_args *a = (const mix_args *)a_;
    const int64_t n = a->n, C = a->C;
    for (int64_t t = t0; t < t1; t++) {
        const float *restrict f = a->f + t * C;
        for (int64_t i = 0; i < n; i++) {
            float *restrict o = a->out + (t * n + i) * C;
            const float qi = a->q[t * n + i];
            for (int64_t c = 0; c < C; c++) o[c] += qi * f[c];
        }
    }
}

/* df = Σ_i q_i dout_i, dq_i = ⟨f, dout_i⟩ */
static void add_post_backward_range(const void *a_, int64_t t0, int64_t t1) {
    const mix_args *a = (const mix_args *)a_;
    const int64_t n = a->n, C = a->C;
    for (int64_t t = t0; t < t1; t++) {
        const float *d = a->dout + t * n * C, *f = a->f + t * C, *q = a->q + t * n;
        float *restrict df = a->df + t * C;
        for (int64_t i = 0; i < n; i++) a->dq[t * n + i] = dot(f, d + i * C, C);
        for (int64_t c = 0; c < C; c++) df[c] = q[0] * d[c];
        for (int64_t i = 1; i < n; i++) {
            const float qi = q[i], *restrict di = d + i * C;
            for (int64_t c = 0; c < C; c++) df[c] += qi * di[c];
        }
    }
}

void mix_pre_res(int64_t T, int64_t n, int64_t C, const float *x, const float *p, const float *H,
                 float *u, float *r, int threads) {
    mix_args a = {.n = n, .C = C, .x = x, .p = p, .H = H, .u = u, .r = r};
    parallel_tokens(pre_res_range, &a, T, threads);
}

void mix_pre_res_backward(int64_t T, int64_t n, int64_t C, const float *x, const float *p, const float *H,
                          const float *du, const float *dr, float *dx, float *dp, float *dH, int threads) {
    mix_args a = {.n = n, .C = C, .x = x, .p = p, .H = H, .du = du, .dr = dr, .dx = dx, .dp = dp, .dH = dH};
    parallel_tokens(pre_res_backward_range, &a, T, threads);
}

void mix_add_post(int64_t T, int64_t n, int64_t C, float *out, const float *q, const float *f, int threads) {
    mix_args a = {.n = n, .C = C, .out = out, .q = q, .f = f};
    parallel_tokens(add_post_range, &a, T, threads);
}

void mix_add_post_backward(int64_t T, int64_t n, int64_t C, const float *dout, const float *q, const float *f,
                           float *df, float *dq, int threads) {
    mix_args a = {.n = n, .C = C, .dout = dout, .q = q, .f = f, .df = df, .dq = dq};
    parallel_tokens(add_post_backward_range, &a, T, threads);
}
