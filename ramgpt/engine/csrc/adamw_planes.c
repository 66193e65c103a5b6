/* AdamW over fp32 masters kept as two 16-bit planes (ramgpt/engine/planes.py), in one pass over
 * memory: each element's master is joined from its planes, updated with the arithmetic of torch's
 * fused CPU AdamW (ATen/native/cpu/FusedAdamKernel.cpp: ADAMW mode, float32, no amsgrad, no
 * maximize) and split back. torch's fused path needs the master joined into scratch first and
 * split after: eight whole-tensor passes around its one (3-4x as long on the H200 machine, round 9).
 *
 * The order of operations is that of torch's vectorised loop. How torch's build rounds the second
 * moment's update (one fma, or none) is not in its source: the loader builds each RAMGPT_V_FORM in
 * turn and keeps the first that gives torch's bits on this CPU (engine/native.py), else none. A
 * tensor's elements past its last whole 16-lane vector go through torch's own kernel (its scalar
 * loop, compiled its way), so this kernel takes whole vectors only. The gradient is read, not
 * written (torch's kernel stores the unscaled gradient back; nothing reads it after the update).
 * Built by the loader: cc -O3 -march=native -ffp-contract=off -fno-math-errno -fPIC -shared -pthread.
 */
#ifndef RAMGPT_V_FORM
#define RAMGPT_V_FORM 0 /* the loader builds the forms in turn until one gives torch's bits */
#endif
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    int16_t *hi, *lo;
    const float *grad;
    float *avg, *avg_sq;
    int64_t n; /* a multiple of torch's vector width: the rest runs through torch's kernel */
    float neg_step_size, bc2_sqrt, decay;
} item_t;

typedef struct {
    float scale; /* the grad_scale: the gradient is divided by it, as torch's kernel does */
    int has_scale, has_decay, base_is_grad;
    float lerp_coeff, beta2, c2, eps;
} group_t;

static inline float from_bits(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }
static inline uint32_t to_bits(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }

static void update(const group_t *g, const item_t *it, int64_t a, int64_t b) {
    int16_t *restrict hi = it->hi, *restrict lo = it->lo;
    const float *restrict gr = it->grad;
    float *restrict m = it->avg, *restrict v = it->avg_sq;
    const float nss = it->neg_step_size, bc2s = it->bc2_sqrt, decay = it->decay;
    const float scale = g->scale, coeff = g->lerp_coeff;
    const float beta2 = g->beta2, c2 = g->c2, eps = g->eps;
    const int has_scale = g->has_scale, has_decay = g->has_decay, base_is_grad = g->base_is_grad;
    for (int64_t i = a; i < b; i++) {
        float x = from_bits(((uint32_t)(uint16_t)hi[i] << 16) + (uint32_t)(int32_t)lo[i]);
        float gv = gr[i];
        if (has_scale) gv = gv / scale;
        if (has_decay) x = x * decay;
        float mi = m[i];
        mi = fmaf(coeff, gv - mi, base_is_grad ? gv : mi); /* torch's lerp: an fma */
#if RAMGPT_V_FORM == 0
        float vi = fmaf(c2 * gv, gv, v[i] * beta2); /* as torch's x86 build contracts its two products */
#elif RAMGPT_V_FORM == 1
        float vi = v[i] * beta2 + (c2 * gv) * gv;   /* as its source says */
#else
        float vi = fmaf(v[i], beta2, (c2 * gv) * gv);
#endif
        m[i] = mi;
        v[i] = vi;
        float denom = sqrtf(vi) / bc2s + eps;
        x = x + (nss * mi) / denom;
        uint32_t bits = to_bits(x);
        uint16_t h = (uint16_t)((bits + 0x8000u) >> 16); /* bf16, to nearest, ties away from zero */
        hi[i] = (int16_t)(x != x ? 0x7FC0 : h);           /* a NaN stays a NaN */
        lo[i] = (int16_t)(uint16_t)bits;
    }
}

typedef struct {
    const group_t *g;
    const item_t *items;
    int n_items;
    int64_t from, to; /* a range of the items laid end to end */
} task_t;

static void run_range(const group_t *g, const item_t *items, int n_items, int64_t from, int64_t to) {
    int64_t base = 0;
    for (int k = 0; k < n_items && base < to; k++) {
        int64_t n = items[k].n, a = from - base, b = to - base;
        if (a < 0) a = 0;
        if (b > n) b = n;
        if (a < b) update(g, &items[k], a, b);
        base += n;
    }
}

static void *worker(void *arg) {
    task_t *t = (task_t *)arg;
    run_range(t->g, t->items, t->n_items, t->from, t->to);
    return NULL;
}

#define MAX_THREADS 256

/* Update ``n_items`` tensors with ``threads`` threads (the caller's included); returns 0, or the
 * number of threads that could not be started (their ranges then run on the caller's thread). */
int ramgpt_adamw_planes(const group_t *g, const item_t *items, int n_items, int threads) {
    int64_t total = 0;
    for (int k = 0; k < n_items; k++) total += items[k].n;
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if ((int64_t)threads * 65536 > total) threads = (int)(total / 65536) + 1; /* no thread for a few KiB */
    pthread_t tid[MAX_THREADS];
    task_t tasks[MAX_THREADS];
    int started[MAX_THREADS];
    int failed = 0;
    for (int t = 0; t < threads; t++) {
        int64_t a = total * t / threads, b = total * (t + 1) / threads;
        a -= a % 16; /* whole cache lines of fp32 */
        if (t + 1 < threads) b -= b % 16; else b = total;
        tasks[t] = (task_t){g, items, n_items, a, b};
        started[t] = 0;
    }
    for (int t = 1; t < threads; t++) {
        if (pthread_create(&tid[t], NULL, worker, &tasks[t]) == 0) started[t] = 1;
        else failed++;
    }
    worker(&tasks[0]);
    for (int t = 1; t < threads; t++) {
        if (started[t]) pthread_join(tid[t], NULL);
        else worker(&tasks[t]);
    }
    return failed;
}

/* The layout the loader's ctypes structures must match. */
int ramgpt_abi(int64_t *sizes) {
    sizes[0] = (int64_t)sizeof(item_t);
    sizes[1] = (int64_t)sizeof(group_t);
    return 1;
}
