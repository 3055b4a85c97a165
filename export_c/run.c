/*
 * run.c -- one-file C inference for LlamaThink (Gated DeltaNet + CSA + gated full attention,
 * hyper-connections, SwiGLU, partial RoPE), reading the binary written by export_c/export.py.
 *
 * Build (either):
 *   make -C export_c                                  (OpenMP, -O3 -march=native)
 *   cc -O3 -march=native -o run run.c -lm             (single thread)
 *   cc -O3 -march=native -fopenmp -o run run.c -lm    (OpenMP threads)
 * Only libc and libm are needed. SIMD paths are chosen at compile time from __AVX512F__ /
 * __AVX2__ (+ __AVX512VNNI__ / __AVXVNNI__ for int8); anything else uses portable scalar C.
 *
 * Usage: see usage() below or export_c/README.md. File format: export_c/README.md.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <signal.h>
#include <time.h>
#include <unistd.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX2__) && defined(__FMA__)
#define LT_AVX2 1
#endif
#if defined(__AVX512F__)
#define LT_AVX512 1
#endif

/* ------------------------------------------------------------------------------------------ */
/* File format constants (keep in sync with export_c/export.py)                               */
/* ------------------------------------------------------------------------------------------ */
#define LT_MAGIC 0x4B48544Cu /* bytes "LTHK" */
#define LT_VERSION 3u     /* newest version written / read */
#define LT_VERSION_MIN 1u /* oldest version still read (version 1 has one EOS id, no list) */
#define LT_HEADER_SIZE 1024u
#define LT_ALIGN 64u
#define LT_MAX_LAYERS 512
#define LT_TYPES_OFFSET 256
#define LT_EOS_OFFSET 144 /* version >= 2: i32 count, then LT_MAX_EOS i32 EOS ids */
#define LT_MAX_EOS 16
#define LT_FLAG_CSA_BLEND_BIAS 1u /* version 3 header flag (u32 at 212): CSA layers carry blend_proj.bias */

#define LT_MAX_TEXT (16u << 20) /* bytes of one prompt, chat message or system prompt */

#define TK_MAGIC 0x4B54544Cu /* bytes "LTTK" */
#define TK_VERSION 1u
#define TK_HEADER_SIZE 64u
/* tokenizer flags: 1 add a U+2581 prefix, 2 byte fallback, 4 no prefix when the text starts with a
 * space or U+2581, 8 delete U+FDD0 first (the normalizer step llamathink.chat_format.set_chat_template
 * installs), 16 no prefix either when flag 8 deleted the text's first characters (HF's Metaspace
 * prepend_scheme "first", which prefixes only a word at the original text's offset 0; "always" does not) */
#define TK_FLAG_DROP_TEXT_GUARD 8
#define TK_FLAG_PREFIX_AT_OFFSET_0 16
#define TK_FLAGS_ALL 31

enum { DT_F32 = 0, DT_BF16 = 1, DT_I8 = 2 };
enum { MIX_LINEAR = 0, MIX_CSA = 1, MIX_FULL = 2 };

typedef struct {
    int dtype, rows, cols, gs, kc; /* kc: chunk length of the packed layout (see pk_off) */
    const void *w;  /* float / uint16 (bf16) / int8 */
    const float *s; /* int8 group scales, rows*cols/gs */
} Mat;

typedef struct {
    int type;
    const float *in_ln, *post_ln;         /* raw (1+w) applied at use via precomputed copies */
    float *in_ln1, *post_ln1;             /* 1 + w */
    float *mix_r1, *mix_s1, *mlp_r1, *mlp_s1; /* 1 + scale (hyper-connections) */
    Mat w_in;                             /* fused input projection of the mixer */
    Mat w_out;                            /* out_proj / o_proj */
    Mat w_gu, w_down;                     /* MLP: [gate; up], down */
    /* linear (Gated DeltaNet) */
    const float *conv_w;                  /* [C, K] */
    float *conv_wt;                       /* the same, transposed [K, C] */
    float *neg_exp_a;                     /* -exp(A_log) [Hv] */
    const float *dt_bias;                 /* [Hv] */
    const float *gnorm;                   /* [Dv] (plain weight) */
    /* attention */
    float *q_norm1, *k_norm1;             /* 1 + w, [D] */
    Mat w_ck, w_cv;                       /* CSA compress_k / compress_v */
    const float *blend_b;                 /* CSA blend_proj.bias [Hq D], or NULL (the seed's gate: no bias) */
} Layer;

typedef struct {
    /* hyperparameters */
    int dtype, gs, vocab, dim, inter, n_layers, n_heads, n_kv, head_dim, max_pos, rope_dim;
    int lk_heads, lv_heads, lk_dim, lv_dim, conv_k, csa_stride, csa_window, hyper, tied, bos, eos;
    double rope_theta, rope_frac, eps;
    int n_eos, eos_ids[LT_MAX_EOS]; /* every EOS id (eos is the first, or -1 when there is none) */
    uint32_t flags;                 /* LT_FLAG_* (version 3), 0 before */
    uint8_t types[LT_MAX_LAYERS];
    /* derived sizes */
    int lin_c;     /* 2*Hk*Dk + Hv*Dv */
    int q_dim;     /* Hq*D */
    int kv_dim;    /* Hkv*D */
    int n_lin, n_csa, n_full;
    /* weights */
    Mat embed, lm_head;
    const float *final_norm;
    float *final_norm1;
    Layer *layers;
    /* file mapping */
    const uint8_t *data;
    size_t size;
    int mapped;
} Model;

/* ------------------------------------------------------------------------------------------ */
/* small helpers                                                                               */
/* ------------------------------------------------------------------------------------------ */
static void set_err(char *err, size_t n, const char *fmt, const char *a, long long v) {
    if (err && n) snprintf(err, n, fmt, a, v);
}
static uint32_t rd_u32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static int32_t rd_i32(const uint8_t *p) { int32_t v; memcpy(&v, p, 4); return v; }
static uint64_t rd_u64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static double rd_f64(const uint8_t *p) { double v; memcpy(&v, p, 8); return v; }
static float rd_f32(const uint8_t *p) { float v; memcpy(&v, p, 4); return v; }

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* -DLT_PROFILE: wall-clock time per part of the forward pass, printed at exit (stderr) */
#ifdef LT_PROFILE
enum { PF_EMBED, PF_NORM, PF_MM_IN, PF_MM_OUT, PF_MM_GU, PF_MM_DOWN, PF_MM_HEAD, PF_CONV, PF_GDN,
       PF_FULL, PF_CSA_PRE, PF_CSA_ATT, PF_MISC, PF_GDN_NORM, PF_N };
static const char *const PF_NAMES[PF_N] = {"embed", "norms+residual", "matmul in", "matmul out",
    "matmul gate/up", "matmul down", "matmul head", "gdn conv", "gdn recurrence", "full attention",
    "csa prep", "csa attention", "misc", "gdn out norm"};
static double g_prof[PF_N];
static void prof_print(void) {
    double tot = 0;
    for (int i = 0; i < PF_N; i++) tot += g_prof[i];
    for (int i = 0; i < PF_N; i++)
        fprintf(stderr, "prof %-16s %8.1f ms %5.1f%%\n", PF_NAMES[i], g_prof[i] * 1e3, tot > 0 ? 100 * g_prof[i] / tot : 0.0);
}
#define PROF(k, stmt) do { double t_ = now_s(); stmt; g_prof[k] += now_s() - t_; } while (0)
#define PROF_BEGIN() double tprof_ = now_s()
#define PROF_END(k) do { double t2_ = now_s(); g_prof[k] += t2_ - tprof_; tprof_ = t2_; } while (0)
#else
#define PROF_BEGIN() do { } while (0)
#define PROF_END(k) do { } while (0)
#define PROF(k, stmt) do { stmt; } while (0)
#endif

static int n_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}
static int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

static inline float bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }
static inline float siluf_(float x) { return x / (1.0f + expf(-x)); }
static inline float softplusf_(float x) { return x > 20.0f ? x : log1pf(expf(x)); }

/* ------------------------------------------------------------------------------------------ */
/* model loading with full validation (never reads outside [data, data+size))                 */
/* ------------------------------------------------------------------------------------------ */
typedef struct {
    const uint8_t *data;
    uint64_t size, off;
    int count;
    char *err;
    size_t errn;
} Cursor;

/* Reserve nbytes at the next aligned offset; returns NULL (and sets err) if out of bounds. */
static const void *take(Cursor *c, uint64_t nbytes, const char *what) {
    uint64_t off = (c->off + (LT_ALIGN - 1)) & ~(uint64_t)(LT_ALIGN - 1);
    if (off < c->off || off > c->size || nbytes > c->size - off) {
        set_err(c->err, c->errn, "tensor '%s' (%lld bytes) runs past the end of the file", what,
                (long long)nbytes);
        return NULL;
    }
    c->off = off + nbytes;
    return c->data + off;
}

static int take_vec(Cursor *c, const float **out, int n, const char *what) {
    c->count++;
    *out = (const float *)take(c, (uint64_t)n * 4u, what);
    return *out ? 0 : -1;
}

/* chunk length of the packed layout: int8 -> the group size; bf16 -> 32, 16 or 8; fp32 -> 16
 * or 8 (the first that divides the row length), else the whole row (plain row-major blocks). */
static int mat_kc(int dtype, int cols, int gs) {
    if (dtype == DT_I8) return gs;
    if (dtype == DT_BF16 && cols % 32 == 0) return 32;
    if (cols % 16 == 0) return 16;
    if (cols % 8 == 0) return 8;
    return cols;
}

static int take_mat(Cursor *c, const Model *m, Mat *out, int rows, int cols, const char *what) {
    out->dtype = m->dtype;
    out->rows = rows;
    out->cols = cols;
    out->gs = m->gs;
    out->kc = mat_kc(m->dtype, cols, m->gs);
    out->s = NULL;
    uint64_t n = (uint64_t)rows * (uint64_t)cols;
    c->count++;
    if (m->dtype == DT_F32) {
        out->w = take(c, n * 4u, what);
    } else if (m->dtype == DT_BF16) {
        out->w = take(c, n * 2u, what);
    } else {
        out->w = take(c, n, what);
        if (!out->w) return -1;
        out->s = (const float *)take(c, (n / (uint64_t)m->gs) * 4u, what);
        if (!out->s) return -1;
    }
    return out->w ? 0 : -1;
}

static float *ones_plus(const float *w, int n) {
    float *o = (float *)malloc((size_t)n * sizeof(float));
    if (!o) return NULL;
    for (int i = 0; i < n; i++) o[i] = 1.0f + rd_f32((const uint8_t *)(w + i));
    return o;
}

static void free_model(Model *m) {
    if (m->layers) {
        for (int l = 0; l < m->n_layers; l++) {
            Layer *L = &m->layers[l];
            free(L->in_ln1); free(L->post_ln1);
            free(L->mix_r1); free(L->mix_s1); free(L->mlp_r1); free(L->mlp_s1);
            free(L->neg_exp_a); free(L->q_norm1); free(L->k_norm1); free(L->conv_wt);
        }
        free(m->layers);
        m->layers = NULL;
    }
    free(m->final_norm1);
    m->final_norm1 = NULL;
}

#define CHECK_RANGE(name, v, lo, hi)                                                       \
    do {                                                                                   \
        if ((long long)(v) < (long long)(lo) || (long long)(v) > (long long)(hi)) {         \
            set_err(err, errn, "header field %s out of range: %lld", name, (long long)(v)); \
            return -1;                                                                     \
        }                                                                                  \
    } while (0)

/* Parse and validate a model image. Returns 0 on success, -1 with a message in err. */
static int model_init(Model *m, const uint8_t *data, size_t size, char *err, size_t errn) {
    memset(m, 0, sizeof(*m));
    m->data = data;
    m->size = size;
    if (size < LT_HEADER_SIZE) {
        set_err(err, errn, "%s: file too small (%lld bytes)", "model", (long long)size);
        return -1;
    }
    if (rd_u32(data) != LT_MAGIC) {
        set_err(err, errn, "%s: bad magic 0x%llx (not a LlamaThink C model file)", "model",
                (long long)rd_u32(data));
        return -1;
    }
    const uint32_t version = rd_u32(data + 4);
    if (version < LT_VERSION_MIN || version > LT_VERSION) {
        set_err(err, errn, "%s: unsupported format version %lld", "model", (long long)version);
        return -1;
    }
    if (rd_u32(data + 8) != LT_HEADER_SIZE) {
        set_err(err, errn, "%s: bad header size %lld", "model", (long long)rd_u32(data + 8));
        return -1;
    }
    if (rd_u32(data + 20) != LT_ALIGN) {
        set_err(err, errn, "%s: bad alignment %lld", "model", (long long)rd_u32(data + 20));
        return -1;
    }
    if (rd_u64(data + 24) != (uint64_t)size) {
        set_err(err, errn, "%s: file size mismatch (header says %lld; truncated or padded file)",
                "model", (long long)rd_u64(data + 24));
        return -1;
    }
    m->dtype = (int)rd_u32(data + 12);
    m->gs = (int)rd_u32(data + 16);
    m->vocab = rd_i32(data + 32);
    m->dim = rd_i32(data + 36);
    m->inter = rd_i32(data + 40);
    m->n_layers = rd_i32(data + 44);
    m->n_heads = rd_i32(data + 48);
    m->n_kv = rd_i32(data + 52);
    m->head_dim = rd_i32(data + 56);
    m->max_pos = rd_i32(data + 60);
    m->rope_dim = rd_i32(data + 64);
    m->lk_heads = rd_i32(data + 68);
    m->lv_heads = rd_i32(data + 72);
    m->lk_dim = rd_i32(data + 76);
    m->lv_dim = rd_i32(data + 80);
    m->conv_k = rd_i32(data + 84);
    m->csa_stride = rd_i32(data + 88);
    m->csa_window = rd_i32(data + 92);
    m->hyper = rd_i32(data + 96);
    m->tied = rd_i32(data + 100);
    m->bos = rd_i32(data + 104);
    m->eos = rd_i32(data + 108);
    uint32_t n_tensors = rd_u32(data + 112);
    m->rope_theta = rd_f64(data + 120);
    m->rope_frac = rd_f64(data + 128);
    m->eps = rd_f64(data + 136);

    CHECK_RANGE("dtype", m->dtype, 0, 2);
    CHECK_RANGE("vocab_size", m->vocab, 1, 1 << 22);
    CHECK_RANGE("hidden_size", m->dim, 1, 1 << 16);
    CHECK_RANGE("intermediate_size", m->inter, 1, 1 << 18);
    CHECK_RANGE("num_hidden_layers", m->n_layers, 1, LT_MAX_LAYERS);
    CHECK_RANGE("num_attention_heads", m->n_heads, 1, 4096);
    CHECK_RANGE("num_key_value_heads", m->n_kv, 1, m->n_heads);
    CHECK_RANGE("head_dim", m->head_dim, 1, 4096);
    CHECK_RANGE("max_position_embeddings", m->max_pos, 1, 1 << 20);
    CHECK_RANGE("rope_dim", m->rope_dim, 0, m->head_dim);
    CHECK_RANGE("linear_num_key_heads", m->lk_heads, 1, 4096);
    CHECK_RANGE("linear_num_value_heads", m->lv_heads, 1, 4096);
    CHECK_RANGE("linear_key_head_dim", m->lk_dim, 1, 4096);
    CHECK_RANGE("linear_value_head_dim", m->lv_dim, 1, 4096);
    CHECK_RANGE("linear_conv_kernel_dim", m->conv_k, 1, 64);
    CHECK_RANGE("csa_stride", m->csa_stride, 1, 1 << 16);
    CHECK_RANGE("csa_window", m->csa_window, 1, 1 << 20);
    CHECK_RANGE("hyper_connections", m->hyper, 0, 1);
    CHECK_RANGE("tie_word_embeddings", m->tied, 0, 1);
    CHECK_RANGE("bos_token_id", m->bos, -1, m->vocab - 1);
    CHECK_RANGE("eos_token_id", m->eos, -1, m->vocab - 1);
    if (version >= 2) {
        m->n_eos = rd_i32(data + LT_EOS_OFFSET);
        CHECK_RANGE("eos count", m->n_eos, 0, LT_MAX_EOS);
        for (int i = 0; i < m->n_eos; i++) {
            m->eos_ids[i] = rd_i32(data + LT_EOS_OFFSET + 4 + 4 * i);
            CHECK_RANGE("eos_token_id list entry", m->eos_ids[i], 0, m->vocab - 1);
        }
        if (m->eos != (m->n_eos ? m->eos_ids[0] : -1)) {
            set_err(err, errn, "%s: eos_token_id %lld is not the first entry of the EOS list", "model", m->eos);
            return -1;
        }
    } else {
        m->n_eos = m->eos >= 0;
        m->eos_ids[0] = m->eos;
    }
    m->flags = 0;
    if (version >= 3) m->flags = rd_u32(data + 212);
    if (m->flags & ~LT_FLAG_CSA_BLEND_BIAS) {
        set_err(err, errn, "%s: unknown flags 0x%llx in the header", "model", (long long)m->flags);
        return -1;
    }
    if (m->rope_dim % 2) { set_err(err, errn, "%s: rope_dim %lld is odd", "model", m->rope_dim); return -1; }
    if (m->n_heads % m->n_kv) { set_err(err, errn, "%s: heads %lld not a multiple of kv heads", "model", m->n_heads); return -1; }
    if (m->lv_heads % m->lk_heads) { set_err(err, errn, "%s: linear value heads %lld not a multiple of key heads", "model", m->lv_heads); return -1; }
    if (!(m->eps > 0 && m->eps < 1)) { snprintf(err, errn, "model: bad rms_norm_eps %g (not in (0, 1))", m->eps); return -1; }
    if (!(m->rope_theta > 0 && m->rope_theta < 1e12)) {
        snprintf(err, errn, "model: bad rope_theta %g (not in (0, 1e12))", m->rope_theta);
        return -1;
    }
    m->lin_c = 2 * m->lk_heads * m->lk_dim + m->lv_heads * m->lv_dim;
    m->q_dim = m->n_heads * m->head_dim;
    m->kv_dim = m->n_kv * m->head_dim;
    CHECK_RANGE("linear width", m->lin_c, 1, 1 << 20);
    CHECK_RANGE("query width", m->q_dim, 1, 1 << 20);
    for (int l = 0; l < m->n_layers; l++) {
        m->types[l] = data[LT_TYPES_OFFSET + l];
        if (m->types[l] > 2) { set_err(err, errn, "%s: bad mixer type for layer %lld", "model", l); return -1; }
        m->n_lin += m->types[l] == MIX_LINEAR;
        m->n_csa += m->types[l] == MIX_CSA;
        m->n_full += m->types[l] == MIX_FULL;
    }
    if (m->dtype == DT_I8) {
        int g = m->gs;
        int bad = g < 16 || g > 4096 || g % 16 || m->dim % g || m->inter % g;
        if (!bad && m->n_lin && (m->lv_heads * m->lv_dim) % g) bad = 1;
        if (!bad && (m->n_csa || m->n_full) && m->q_dim % g) bad = 1;
        if (!bad && m->n_csa && m->kv_dim % g) bad = 1;
        if (bad) { set_err(err, errn, "%s: int8 group size %lld does not divide every row", "model", g); return -1; }
    } else if (m->gs != 0) {
        set_err(err, errn, "%s: group size %lld given for a non-int8 file", "model", m->gs);
        return -1;
    }

    Cursor c = {data, (uint64_t)size, LT_HEADER_SIZE, 0, err, errn};
    const float *fn;
    m->layers = (Layer *)calloc((size_t)m->n_layers, sizeof(Layer));
    if (!m->layers) { set_err(err, errn, "%s: out of memory (%lld layers)", "model", m->n_layers); return -1; }
    if (take_mat(&c, m, &m->embed, m->vocab, m->dim, "model.embed_tokens.weight")) goto fail;
    if (take_vec(&c, &fn, m->dim, "model.norm.weight")) goto fail;
    m->final_norm = fn;
    if (!m->tied) {
        if (take_mat(&c, m, &m->lm_head, m->vocab, m->dim, "lm_head.weight")) goto fail;
    } else {
        m->lm_head = m->embed;
    }
    const int H = m->dim, Hv = m->lv_heads, VD = m->lv_heads * m->lv_dim;
    for (int l = 0; l < m->n_layers; l++) {
        Layer *L = &m->layers[l];
        L->type = m->types[l];
        const float *v;
        if (take_vec(&c, &L->in_ln, H, "input_layernorm")) goto fail;
        if (take_vec(&c, &L->post_ln, H, "post_attention_layernorm")) goto fail;
        if (m->hyper) {
            if (take_vec(&c, &v, H, "mixer_residual_scale")) goto fail;
            if (!(L->mix_r1 = ones_plus(v, H))) goto oom;
            if (take_vec(&c, &v, H, "mixer_sublayer_scale")) goto fail;
            if (!(L->mix_s1 = ones_plus(v, H))) goto oom;
            if (take_vec(&c, &v, H, "mlp_residual_scale")) goto fail;
            if (!(L->mlp_r1 = ones_plus(v, H))) goto oom;
            if (take_vec(&c, &v, H, "mlp_sublayer_scale")) goto fail;
            if (!(L->mlp_s1 = ones_plus(v, H))) goto oom;
        }
        if (!(L->in_ln1 = ones_plus(L->in_ln, H)) || !(L->post_ln1 = ones_plus(L->post_ln, H))) goto oom;
        if (L->type == MIX_LINEAR) {
            if (take_mat(&c, m, &L->w_in, m->lin_c + VD + 2 * Hv, H, "mixer.in_proj_[qkv|z|b|a]")) goto fail;
            if (take_vec(&c, &L->conv_w, m->lin_c * m->conv_k, "mixer.conv1d.weight")) goto fail;
            if (!(L->conv_wt = (float *)malloc((size_t)m->lin_c * m->conv_k * 4))) goto oom;
            for (int ch = 0; ch < m->lin_c; ch++)
                for (int i = 0; i < m->conv_k; i++)
                    L->conv_wt[(size_t)i * m->lin_c + ch] = rd_f32((const uint8_t *)(L->conv_w + (size_t)ch * m->conv_k + i));
            if (take_vec(&c, &v, Hv, "mixer.A_log")) goto fail;
            if (!(L->neg_exp_a = (float *)malloc((size_t)Hv * 4))) goto oom;
            for (int i = 0; i < Hv; i++) L->neg_exp_a[i] = -expf(v[i]);
            if (take_vec(&c, &L->dt_bias, Hv, "mixer.dt_bias")) goto fail;
            if (take_vec(&c, &L->gnorm, m->lv_dim, "mixer.norm.weight")) goto fail;
            if (take_mat(&c, m, &L->w_out, H, VD, "mixer.out_proj.weight")) goto fail;
        } else {
            int rows = 2 * m->q_dim + 2 * m->kv_dim + (L->type == MIX_CSA ? m->q_dim : 0);
            if (take_mat(&c, m, &L->w_in, rows, H, "mixer.[q|k|v(|blend)]_proj")) goto fail;
            if (take_vec(&c, &v, m->head_dim, "mixer.q_norm.weight")) goto fail;
            if (!(L->q_norm1 = ones_plus(v, m->head_dim))) goto oom;
            if (take_vec(&c, &v, m->head_dim, "mixer.k_norm.weight")) goto fail;
            if (!(L->k_norm1 = ones_plus(v, m->head_dim))) goto oom;
            if (L->type == MIX_CSA && (m->flags & LT_FLAG_CSA_BLEND_BIAS))
                if (take_vec(&c, &L->blend_b, m->q_dim, "mixer.blend_proj.bias")) goto fail;
            if (L->type == MIX_CSA) {
                if (take_mat(&c, m, &L->w_ck, m->kv_dim, m->kv_dim, "mixer.compress_k.weight")) goto fail;
                if (take_mat(&c, m, &L->w_cv, m->kv_dim, m->kv_dim, "mixer.compress_v.weight")) goto fail;
            }
            if (take_mat(&c, m, &L->w_out, H, m->q_dim, "mixer.o_proj.weight")) goto fail;
        }
        if (take_mat(&c, m, &L->w_gu, 2 * m->inter, H, "mlp.[gate|up]_proj.weight")) goto fail;
        if (take_mat(&c, m, &L->w_down, H, m->inter, "mlp.down_proj.weight")) goto fail;
    }
    if (!(m->final_norm1 = ones_plus(m->final_norm, H))) goto oom;
    if ((uint32_t)c.count != n_tensors) {
        set_err(err, errn, "%s: tensor count mismatch (file says %lld)", "model", (long long)n_tensors);
        goto fail_nomsg;
    }
    if (c.off != (uint64_t)size) {
        set_err(err, errn, "%s: %lld trailing bytes after the last tensor", "model", (long long)(size - c.off));
        goto fail_nomsg;
    }
    return 0;
oom:
    set_err(err, errn, "%s: out of memory%lld", "model", 0);
fail:
fail_nomsg:
    free_model(m);
    return -1;
}

/* 1 if id is one of the model's EOS ids */
static int is_eos(const Model *m, int id) {
    for (int i = 0; i < m->n_eos; i++) if (m->eos_ids[i] == id) return 1;
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* SIMD kernels                                                                                */
/* ------------------------------------------------------------------------------------------ */
#ifdef LT_AVX2
static inline float hsum8(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}
static inline __m256 bf16x8(const uint16_t *p) {
    __m128i r = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(r), 16));
}
/* acc += sum over groups of 4 of (w*x), int8 x int8 (sign trick so that u8 x s8 works) */
static inline __m256i dp_i8_256(__m256i acc, __m256i w, __m256i x) {
    __m256i aw = _mm256_sign_epi8(w, w), sx = _mm256_sign_epi8(x, w);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(acc, aw, sx);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(acc, aw, sx);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), _mm256_set1_epi16(1)));
#endif
}
static inline __m128i dp_i8_128(__m128i acc, __m128i w, __m128i x) {
    __m128i aw = _mm_sign_epi8(w, w), sx = _mm_sign_epi8(x, w);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm_dpbusd_epi32(acc, aw, sx);
#elif defined(__AVXVNNI__)
    return _mm_dpbusd_avx_epi32(acc, aw, sx);
#else
    return _mm_add_epi32(acc, _mm_madd_epi16(_mm_maddubs_epi16(aw, sx), _mm_set1_epi16(1)));
#endif
}
#endif
#ifdef LT_AVX512
static inline __m512 bf16x16(const uint16_t *p) {
    __m256i r = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(r), 16));
}
#endif

static inline float dotf(const float *a, const float *b, int n) {
    int i = 0;
    float s = 0.0f;
#if defined(LT_AVX512)
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    s = _mm512_reduce_add_ps(acc);
#elif defined(LT_AVX2)
    __m256 acc = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
        acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc2);
    }
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    s = hsum8(_mm256_add_ps(acc, acc2));
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}
static inline void axpyf(float *y, float a, const float *x, int n) {
    for (int i = 0; i < n; i++) y[i] += a * x[i];
}

/* --- vectorised exp / sigmoid / silu (SwiGLU, gates, conv) -------------------------------- */
#if defined(LT_AVX2)
/* exp(x) for AVX2 lanes: Cody-Waite range reduction + degree-6 Taylor polynomial (|rel err| <
 * 2e-7 on the clamped range [-87, 88]) */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
static inline __m256 sigmoid8(__m256 x) {
    const __m256 one = _mm256_set1_ps(1.0f);
    return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}
#endif
/* y[i] = sigmoid(x[i]) */
static void vsigmoid(float *y, const float *x, int n) {
    int i = 0;
#if defined(LT_AVX2)
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, sigmoid8(_mm256_loadu_ps(x + i)));
#endif
    for (; i < n; i++) y[i] = sigmoidf_(x[i]);
}
/* y[i] = silu(x[i]) * (m ? m[i] : 1) */
static void vsilu_mul(float *y, const float *x, const float *m, int n) {
    int i = 0;
#if defined(LT_AVX2)
    for (; i + 8 <= n; i += 8) {
        __m256 xv = _mm256_loadu_ps(x + i), v = _mm256_mul_ps(xv, sigmoid8(xv));
        if (m) v = _mm256_mul_ps(v, _mm256_loadu_ps(m + i));
        _mm256_storeu_ps(y + i, v);
    }
#endif
    for (; i < n; i++) y[i] = siluf_(x[i]) * (m ? m[i] : 1.0f);
}

/* --- packed matrix layout ---------------------------------------------------------------
 * Rows are grouped in blocks of 4 (the last block may hold fewer, nr).  Inside a block the row
 * length is cut into chunks of kc elements and stored chunk by chunk, the block's rows one after
 * the other inside a chunk:  element (r, k) with b = r/4, rr = r%4, c = k/kc, kk = k%kc is at
 *     b*4*cols + c*nr*kc + rr*kc + kk.
 * A 4-row matrix-vector kernel then reads one sequential stream (the hardware prefetcher's
 * favourite), instead of 4 interleaved ones.  int8 group scales use the same order with kc = 1
 * per group: scale (r, g) is at b*4*ng + g*nr + rr.  kc: see mat_kc(). */
static inline size_t pk_off(int n, int kc, int nr, int b, int rr, int c) {
    return (size_t)b * 4 * n + (size_t)c * nr * kc + (size_t)rr * kc;
}
#define LT_PF_BYTES 2048 /* software prefetch distance of the decode kernels */
static inline void prefetch_span(const void *p, int bytes) {
#if defined(LT_AVX2) || defined(LT_AVX512)
    for (int o = 0; o < bytes; o += 64) _mm_prefetch((const char *)p + LT_PF_BYTES + o, _MM_HINT_T0);
#else
    (void)p; (void)bytes;
#endif
}

/* generic (scalar) block kernel, any dtype / kc / nr: y[rr] = row(4b+rr) . x */
static void mv_block_scalar(const Mat *W, int b, int nr, const float *x, const int8_t *xq, const float *xs, float *y) {
    const int n = W->cols, kc = W->kc, nc = n / kc;
    for (int rr = 0; rr < nr; rr++) {
        float acc = 0.0f;
        if (W->dtype == DT_I8) {
            const int G = W->gs, ng = n / G;
            const int8_t *w = (const int8_t *)W->w;
            for (int g = 0; g < ng; g++) {
                const int8_t *p = w + pk_off(n, G, nr, b, rr, g);
                int32_t ia = 0;
                for (int k = 0; k < G; k++) ia += (int32_t)p[k] * (int32_t)xq[g * G + k];
                acc += (float)ia * (W->s[(size_t)b * 4 * ng + (size_t)g * nr + rr] * xs[g]);
            }
        } else {
            for (int c = 0; c < nc; c++) {
                const size_t off = pk_off(n, kc, nr, b, rr, c);
                const float *xc = x + (size_t)c * kc;
                if (W->dtype == DT_F32) {
                    const float *p = (const float *)W->w + off;
                    for (int k = 0; k < kc; k++) acc += p[k] * xc[k];
                } else {
                    const uint16_t *p = (const uint16_t *)W->w + off;
                    for (int k = 0; k < kc; k++) acc += bf16_to_f32(p[k]) * xc[k];
                }
            }
        }
        y[rr] = acc;
    }
}

/* fp32, full block of 4 rows */
static void mv_f32_block(const Mat *W, int b, const float *x, float *y) {
    const int n = W->cols, kc = W->kc, nc = n / kc;
    const float *base = (const float *)W->w + (size_t)b * 4 * n;
#if defined(LT_AVX512)
    if (kc % 16 == 0) {
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int c = 0; c < nc; c++) {
            const float *p = base + (size_t)c * 4 * kc, *xc = x + (size_t)c * kc;
            prefetch_span(p, 16 * kc);
            for (int k = 0; k < kc; k += 16) {
                __m512 xv = _mm512_loadu_ps(xc + k);
                a0 = _mm512_fmadd_ps(_mm512_loadu_ps(p + k), xv, a0);
                a1 = _mm512_fmadd_ps(_mm512_loadu_ps(p + kc + k), xv, a1);
                a2 = _mm512_fmadd_ps(_mm512_loadu_ps(p + 2 * kc + k), xv, a2);
                a3 = _mm512_fmadd_ps(_mm512_loadu_ps(p + 3 * kc + k), xv, a3);
            }
        }
        y[0] = _mm512_reduce_add_ps(a0); y[1] = _mm512_reduce_add_ps(a1);
        y[2] = _mm512_reduce_add_ps(a2); y[3] = _mm512_reduce_add_ps(a3);
        return;
    }
#endif
#if defined(LT_AVX2)
    if (kc % 8 == 0) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int c = 0; c < nc; c++) {
            const float *p = base + (size_t)c * 4 * kc, *xc = x + (size_t)c * kc;
            prefetch_span(p, 16 * kc);
            for (int k = 0; k < kc; k += 8) {
                __m256 xv = _mm256_loadu_ps(xc + k);
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(p + k), xv, a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(p + kc + k), xv, a1);
                a2 = _mm256_fmadd_ps(_mm256_loadu_ps(p + 2 * kc + k), xv, a2);
                a3 = _mm256_fmadd_ps(_mm256_loadu_ps(p + 3 * kc + k), xv, a3);
            }
        }
        y[0] = hsum8(a0); y[1] = hsum8(a1); y[2] = hsum8(a2); y[3] = hsum8(a3);
        return;
    }
#endif
    mv_block_scalar(W, b, 4, x, NULL, NULL, y);
}

/* bf16 weights, fp32 activations, full block */
static void mv_bf16_block(const Mat *W, int b, const float *x, float *y) {
    const int n = W->cols, kc = W->kc, nc = n / kc;
    const uint16_t *base = (const uint16_t *)W->w + (size_t)b * 4 * n;
#if defined(LT_AVX512)
    if (kc % 16 == 0) {
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int c = 0; c < nc; c++) {
            const uint16_t *p = base + (size_t)c * 4 * kc;
            const float *xc = x + (size_t)c * kc;
            prefetch_span(p, 8 * kc);
            for (int k = 0; k < kc; k += 16) {
                __m512 xv = _mm512_loadu_ps(xc + k);
                a0 = _mm512_fmadd_ps(bf16x16(p + k), xv, a0);
                a1 = _mm512_fmadd_ps(bf16x16(p + kc + k), xv, a1);
                a2 = _mm512_fmadd_ps(bf16x16(p + 2 * kc + k), xv, a2);
                a3 = _mm512_fmadd_ps(bf16x16(p + 3 * kc + k), xv, a3);
            }
        }
        y[0] = _mm512_reduce_add_ps(a0); y[1] = _mm512_reduce_add_ps(a1);
        y[2] = _mm512_reduce_add_ps(a2); y[3] = _mm512_reduce_add_ps(a3);
        return;
    }
#endif
#if defined(LT_AVX2)
    if (kc % 8 == 0) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int c = 0; c < nc; c++) {
            const uint16_t *p = base + (size_t)c * 4 * kc;
            const float *xc = x + (size_t)c * kc;
            prefetch_span(p, 8 * kc);
            for (int k = 0; k < kc; k += 8) {
                __m256 xv = _mm256_loadu_ps(xc + k);
                a0 = _mm256_fmadd_ps(bf16x8(p + k), xv, a0);
                a1 = _mm256_fmadd_ps(bf16x8(p + kc + k), xv, a1);
                a2 = _mm256_fmadd_ps(bf16x8(p + 2 * kc + k), xv, a2);
                a3 = _mm256_fmadd_ps(bf16x8(p + 3 * kc + k), xv, a3);
            }
        }
        y[0] = hsum8(a0); y[1] = hsum8(a1); y[2] = hsum8(a2); y[3] = hsum8(a3);
        return;
    }
#endif
    mv_block_scalar(W, b, 4, x, NULL, NULL, y);
}

/* int8 weights x int8-quantised activations, full block; per group g of a row:
 * y += (sum_k w*x) * w_scale[g] * x_scale[g] */
static void mv_i8_block(const Mat *W, int b, const int8_t *xq, const float *xs, float *y) {
#if defined(LT_AVX2)
    const int n = W->cols, G = W->gs, ng = n / G;
    const int8_t *base = (const int8_t *)W->w + (size_t)b * 4 * n;
    const float *sb = W->s + (size_t)b * 4 * ng;
    __m256 f0 = _mm256_setzero_ps(), f1 = f0, f2 = f0, f3 = f0;
    for (int g = 0; g < ng; g++) {
        const int8_t *w0 = base + (size_t)g * 4 * G, *w1 = w0 + G, *w2 = w1 + G, *w3 = w2 + G;
        const int8_t *xg = xq + (size_t)g * G;
        prefetch_span(w0, 4 * G);
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
        int k = 0;
        for (; k + 32 <= G; k += 32) {
            __m256i xv = _mm256_loadu_si256((const __m256i *)(xg + k));
            a0 = dp_i8_256(a0, _mm256_loadu_si256((const __m256i *)(w0 + k)), xv);
            a1 = dp_i8_256(a1, _mm256_loadu_si256((const __m256i *)(w1 + k)), xv);
            a2 = dp_i8_256(a2, _mm256_loadu_si256((const __m256i *)(w2 + k)), xv);
            a3 = dp_i8_256(a3, _mm256_loadu_si256((const __m256i *)(w3 + k)), xv);
        }
        if (k < G) { /* 16-byte tail of a group (G % 32 == 16) */
            __m128i xv = _mm_loadu_si128((const __m128i *)(xg + k)), z = _mm_setzero_si128();
            a0 = _mm256_add_epi32(a0, _mm256_zextsi128_si256(dp_i8_128(z, _mm_loadu_si128((const __m128i *)(w0 + k)), xv)));
            a1 = _mm256_add_epi32(a1, _mm256_zextsi128_si256(dp_i8_128(z, _mm_loadu_si128((const __m128i *)(w1 + k)), xv)));
            a2 = _mm256_add_epi32(a2, _mm256_zextsi128_si256(dp_i8_128(z, _mm_loadu_si128((const __m128i *)(w2 + k)), xv)));
            a3 = _mm256_add_epi32(a3, _mm256_zextsi128_si256(dp_i8_128(z, _mm_loadu_si128((const __m128i *)(w3 + k)), xv)));
        }
        const float xsg = xs[g];
        const float *sg = sb + (size_t)g * 4;
        f0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a0), _mm256_set1_ps(sg[0] * xsg), f0);
        f1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a1), _mm256_set1_ps(sg[1] * xsg), f1);
        f2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a2), _mm256_set1_ps(sg[2] * xsg), f2);
        f3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a3), _mm256_set1_ps(sg[3] * xsg), f3);
    }
    y[0] = hsum8(f0); y[1] = hsum8(f1); y[2] = hsum8(f2); y[3] = hsum8(f3);
#else
    mv_block_scalar(W, b, 4, NULL, xq, xs, y);
#endif
}

/* symmetric int8 quantisation of an activation vector in groups of G. A group holding a NaN or an infinity (a hidden
 * state that overflowed: weights far too large) gets scale NaN, so that the products it feeds are NaN, as in float32
 * arithmetic, and `sample` refuses them: the maximum skips a NaN, and a zero scale would make them 0 without a word. */
static void quantize_act(const float *x, int n, int G, int8_t *q, float *s) {
    for (int g = 0; g < n / G; g++) {
        const float *xg = x + g * G;
        float amax = 0.0f;
        int finite = 1;
        for (int k = 0; k < G; k++) {
            float a = fabsf(xg[k]);
            finite &= a <= FLT_MAX; /* (false for NaN too) */
            amax = a > amax ? a : amax;
        }
        if (!finite) {
            s[g] = NAN;
            memset(q + g * G, 0, (size_t)G);
            continue;
        }
        float sc = amax / 127.0f, inv = amax > 0 ? 127.0f / amax : 0.0f;
        s[g] = sc;
        for (int k = 0; k < G; k++) q[g * G + k] = (int8_t)lrintf(xg[k] * inv);
    }
}

/* unpack block b (nr rows) into fp32 rows out[rr*cols + k] (prefill path) */
static void block_to_f32(const Mat *W, int b, int nr, float *out) {
    const int n = W->cols, kc = W->kc, nc = n / kc;
    for (int rr = 0; rr < nr; rr++) {
        for (int c = 0; c < nc; c++) {
            const size_t off = pk_off(n, kc, nr, b, rr, c);
            float *o = out + (size_t)rr * n + (size_t)c * kc;
            if (W->dtype == DT_F32) {
                const float *p = (const float *)W->w + off;
                for (int k = 0; k < kc; k++) o[k] = p[k];
            } else if (W->dtype == DT_BF16) {
                const uint16_t *p = (const uint16_t *)W->w + off;
                for (int k = 0; k < kc; k++) o[k] = bf16_to_f32(p[k]);
            } else {
                const int8_t *p = (const int8_t *)W->w + off;
                const float sc = W->s[(size_t)b * 4 * nc + (size_t)c * nr + rr]; /* kc == G for int8 */
                for (int k = 0; k < kc; k++) o[k] = (float)p[k] * sc;
            }
        }
    }
}

/* --- prefill GEMM ----------------------------------------------------------------------
 * Rows are processed in panels of LT_PANEL rows, decoded once per chunk of tokens into a
 * transposed fp32 buffer wt[k * LT_PANEL + i]; a register-blocked micro-kernel then computes
 * LT_NT tokens x LT_PANEL rows at a time with broadcasts of x (no horizontal sums, contiguous
 * stores of Y). */
#if defined(LT_AVX512)
#define LT_PANEL 32
#else
#define LT_PANEL 16
#endif
#define LT_NT 6
#ifndef LT_KB
#define LT_KB (1 << 20) /* k blocking off: no gain measured on Zen 3 (X streams well from L3) */
#endif

#if defined(LT_AVX2)
/* 8 fp32 vectors (rows) -> 8 stores of their transpose at dst, dst + ldd, ... */
static inline void store_transposed8(const __m256 *v, float *dst, size_t ldd) {
    __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]), t2 = _mm256_unpacklo_ps(v[2], v[3]);
    __m256 t3 = _mm256_unpackhi_ps(v[2], v[3]), t4 = _mm256_unpacklo_ps(v[4], v[5]), t5 = _mm256_unpackhi_ps(v[4], v[5]);
    __m256 t6 = _mm256_unpacklo_ps(v[6], v[7]), t7 = _mm256_unpackhi_ps(v[6], v[7]);
    __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    _mm256_storeu_ps(dst, _mm256_permute2f128_ps(u0, u4, 0x20));
    _mm256_storeu_ps(dst + ldd, _mm256_permute2f128_ps(u1, u5, 0x20));
    _mm256_storeu_ps(dst + 2 * ldd, _mm256_permute2f128_ps(u2, u6, 0x20));
    _mm256_storeu_ps(dst + 3 * ldd, _mm256_permute2f128_ps(u3, u7, 0x20));
    _mm256_storeu_ps(dst + 4 * ldd, _mm256_permute2f128_ps(u0, u4, 0x31));
    _mm256_storeu_ps(dst + 5 * ldd, _mm256_permute2f128_ps(u1, u5, 0x31));
    _mm256_storeu_ps(dst + 6 * ldd, _mm256_permute2f128_ps(u2, u6, 0x31));
    _mm256_storeu_ps(dst + 7 * ldd, _mm256_permute2f128_ps(u3, u7, 0x31));
}

/* dst[i*ldd + j] = src[j*lds + i] for an 8x8 tile */
static inline void transpose8x8(const float *src, size_t lds, float *dst, size_t ldd) {
    __m256 rows[8];
    for (int r = 0; r < 8; r++) rows[r] = _mm256_loadu_ps(src + r * lds);
    store_transposed8(rows, dst, ldd);
}

/* panel_fill for a panel of full 4-row blocks (np == LT_PANEL) with kc % 8 == 0: two blocks
 * (8 rows) at a time, each chunk of kc columns decoded 8 columns x 8 rows into registers and
 * stored transposed (one pass, no row-major temporary). */
static void panel_fill_fast(const Mat *W, int r0, float *wt) {
    const int n = W->cols, kc = W->kc, nc = n / kc;
    for (int i = 0; i < LT_PANEL; i += 8) {
        const int b0 = (r0 + i) / 4;
        for (int c = 0; c < nc; c++) {
            float *dst = wt + (size_t)c * kc * LT_PANEL + i;
            if (W->dtype == DT_F32) {
                const float *p0 = (const float *)W->w + (size_t)b0 * 4 * n + (size_t)c * 4 * kc, *p1 = p0 + 4 * (size_t)n;
                for (int kk = 0; kk < kc; kk += 8) {
                    __m256 v[8];
                    for (int r = 0; r < 4; r++) {
                        v[r] = _mm256_loadu_ps(p0 + r * kc + kk);
                        v[4 + r] = _mm256_loadu_ps(p1 + r * kc + kk);
                    }
                    store_transposed8(v, dst + (size_t)kk * LT_PANEL, LT_PANEL);
                }
            } else if (W->dtype == DT_BF16) {
                const uint16_t *p0 = (const uint16_t *)W->w + (size_t)b0 * 4 * n + (size_t)c * 4 * kc, *p1 = p0 + 4 * (size_t)n;
                for (int kk = 0; kk < kc; kk += 8) {
                    __m256 v[8];
                    for (int r = 0; r < 4; r++) {
                        v[r] = bf16x8(p0 + r * kc + kk);
                        v[4 + r] = bf16x8(p1 + r * kc + kk);
                    }
                    store_transposed8(v, dst + (size_t)kk * LT_PANEL, LT_PANEL);
                }
            } else {
                const int8_t *p0 = (const int8_t *)W->w + (size_t)b0 * 4 * n + (size_t)c * 4 * kc, *p1 = p0 + 4 * (size_t)n;
                const float *s0 = W->s + (size_t)b0 * 4 * nc + (size_t)c * 4, *s1 = s0 + 4 * (size_t)nc;
                __m256 sc[8];
                for (int r = 0; r < 4; r++) { sc[r] = _mm256_set1_ps(s0[r]); sc[4 + r] = _mm256_set1_ps(s1[r]); }
                for (int kk = 0; kk < kc; kk += 8) {
                    __m256 v[8];
                    for (int r = 0; r < 4; r++) {
                        v[r] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p0 + r * kc + kk)))), sc[r]);
                        v[4 + r] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p1 + r * kc + kk)))), sc[4 + r]);
                    }
                    store_transposed8(v, dst + (size_t)kk * LT_PANEL, LT_PANEL);
                }
            }
        }
    }
}
#endif

/* rows [r0, r0+np) of W (r0 % 4 == 0) -> wt[k * LT_PANEL + i] (transposed, zero-padded rows);
 * tmp: LT_PANEL * cols floats */
static void panel_fill(const Mat *W, int r0, int np, float *wt, float *tmp) {
    const int n = W->cols;
#if defined(LT_AVX2)
    if (np == LT_PANEL && W->kc % 8 == 0 && r0 + LT_PANEL <= 4 * (W->rows / 4)) { panel_fill_fast(W, r0, wt); return; }
#endif

    for (int i = 0; i < np; i += 4) {
        const int b = (r0 + i) / 4, nr = W->rows - 4 * b < 4 ? W->rows - 4 * b : 4;
        block_to_f32(W, b, nr, tmp + (size_t)i * n);
    }
    if (np < LT_PANEL) memset(tmp + (size_t)np * n, 0, sizeof(float) * (size_t)(LT_PANEL - np) * n);
    int k0 = 0;
#if defined(LT_AVX2)
    for (; k0 + 8 <= n; k0 += 8)
        for (int i = 0; i < LT_PANEL; i += 8)
            transpose8x8(tmp + (size_t)i * n + k0, (size_t)n, wt + (size_t)k0 * LT_PANEL + i, LT_PANEL);
#endif
    for (int i = 0; i < LT_PANEL; i++)
        for (int k = k0; k < n; k++) wt[(size_t)k * LT_PANEL + i] = tmp[(size_t)i * n + k];
}

/* Y[t*ldy + i] (+)= sum_{k0 <= k < k1} wt[k*ldw + i] * X[t*ldx + k] for i < np, t < T (reads
 * LT_PANEL floats of every wt row) */
static void mm_panel(const float *wt, size_t ldw, int k0, int k1, const float *X, int ldx, int T, float *Y, int ldy, int np, int acc,
                     const char *pf, size_t pf_bytes) {
    /* pf: bytes to pull into the cache while computing (the next panel's weights) */
    const size_t pf_step = pf ? ((pf_bytes / ((size_t)(T + LT_NT - 1) / LT_NT) + 63) & ~(size_t)63) : 0;
    size_t pf_off = 0;
    for (int t = 0; t < T; t += LT_NT) {
#if defined(LT_AVX2) || defined(LT_AVX512)
        for (size_t e = pf_off + pf_step; pf && pf_off < e && pf_off < pf_bytes; pf_off += 64) _mm_prefetch(pf + pf_off, _MM_HINT_T1);
#endif
        const int tn = T - t < LT_NT ? T - t : LT_NT;
        const float *x0 = X + (size_t)t * ldx;
        const float *x1 = X + (size_t)(t + (1 < tn ? 1 : tn - 1)) * ldx;
        const float *x2 = X + (size_t)(t + (2 < tn ? 2 : tn - 1)) * ldx;
        const float *x3 = X + (size_t)(t + (3 < tn ? 3 : tn - 1)) * ldx;
        const float *x4 = X + (size_t)(t + (4 < tn ? 4 : tn - 1)) * ldx;
        const float *x5 = X + (size_t)(t + (5 < tn ? 5 : tn - 1)) * ldx;
        float out[LT_NT][LT_PANEL];
#if defined(LT_AVX512)
        __m512 c00 = _mm512_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
        __m512 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
        for (int k = k0; k < k1; k++) {
            const __m512 w0 = _mm512_loadu_ps(wt + (size_t)k * ldw), w1 = _mm512_loadu_ps(wt + (size_t)k * ldw + 16);
            __m512 b;
            b = _mm512_set1_ps(x0[k]); c00 = _mm512_fmadd_ps(w0, b, c00); c01 = _mm512_fmadd_ps(w1, b, c01);
            b = _mm512_set1_ps(x1[k]); c10 = _mm512_fmadd_ps(w0, b, c10); c11 = _mm512_fmadd_ps(w1, b, c11);
            b = _mm512_set1_ps(x2[k]); c20 = _mm512_fmadd_ps(w0, b, c20); c21 = _mm512_fmadd_ps(w1, b, c21);
            b = _mm512_set1_ps(x3[k]); c30 = _mm512_fmadd_ps(w0, b, c30); c31 = _mm512_fmadd_ps(w1, b, c31);
            b = _mm512_set1_ps(x4[k]); c40 = _mm512_fmadd_ps(w0, b, c40); c41 = _mm512_fmadd_ps(w1, b, c41);
            b = _mm512_set1_ps(x5[k]); c50 = _mm512_fmadd_ps(w0, b, c50); c51 = _mm512_fmadd_ps(w1, b, c51);
        }
        _mm512_storeu_ps(out[0], c00); _mm512_storeu_ps(out[0] + 16, c01);
        _mm512_storeu_ps(out[1], c10); _mm512_storeu_ps(out[1] + 16, c11);
        _mm512_storeu_ps(out[2], c20); _mm512_storeu_ps(out[2] + 16, c21);
        _mm512_storeu_ps(out[3], c30); _mm512_storeu_ps(out[3] + 16, c31);
        _mm512_storeu_ps(out[4], c40); _mm512_storeu_ps(out[4] + 16, c41);
        _mm512_storeu_ps(out[5], c50); _mm512_storeu_ps(out[5] + 16, c51);
#elif defined(LT_AVX2)
        __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
        __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
        for (int k = k0; k < k1; k++) {
            const __m256 w0 = _mm256_loadu_ps(wt + (size_t)k * ldw), w1 = _mm256_loadu_ps(wt + (size_t)k * ldw + 8);
            __m256 b;
            b = _mm256_broadcast_ss(x0 + k); c00 = _mm256_fmadd_ps(w0, b, c00); c01 = _mm256_fmadd_ps(w1, b, c01);
            b = _mm256_broadcast_ss(x1 + k); c10 = _mm256_fmadd_ps(w0, b, c10); c11 = _mm256_fmadd_ps(w1, b, c11);
            b = _mm256_broadcast_ss(x2 + k); c20 = _mm256_fmadd_ps(w0, b, c20); c21 = _mm256_fmadd_ps(w1, b, c21);
            b = _mm256_broadcast_ss(x3 + k); c30 = _mm256_fmadd_ps(w0, b, c30); c31 = _mm256_fmadd_ps(w1, b, c31);
            b = _mm256_broadcast_ss(x4 + k); c40 = _mm256_fmadd_ps(w0, b, c40); c41 = _mm256_fmadd_ps(w1, b, c41);
            b = _mm256_broadcast_ss(x5 + k); c50 = _mm256_fmadd_ps(w0, b, c50); c51 = _mm256_fmadd_ps(w1, b, c51);
        }
        if (!acc && np == LT_PANEL && tn == LT_NT) { /* full tile: straight to Y */
            float *y = Y + (size_t)t * ldy;
            _mm256_storeu_ps(y, c00); _mm256_storeu_ps(y + 8, c01); y += ldy;
            _mm256_storeu_ps(y, c10); _mm256_storeu_ps(y + 8, c11); y += ldy;
            _mm256_storeu_ps(y, c20); _mm256_storeu_ps(y + 8, c21); y += ldy;
            _mm256_storeu_ps(y, c30); _mm256_storeu_ps(y + 8, c31); y += ldy;
            _mm256_storeu_ps(y, c40); _mm256_storeu_ps(y + 8, c41); y += ldy;
            _mm256_storeu_ps(y, c50); _mm256_storeu_ps(y + 8, c51);
            continue;
        }
        _mm256_storeu_ps(out[0], c00); _mm256_storeu_ps(out[0] + 8, c01);
        _mm256_storeu_ps(out[1], c10); _mm256_storeu_ps(out[1] + 8, c11);
        _mm256_storeu_ps(out[2], c20); _mm256_storeu_ps(out[2] + 8, c21);
        _mm256_storeu_ps(out[3], c30); _mm256_storeu_ps(out[3] + 8, c31);
        _mm256_storeu_ps(out[4], c40); _mm256_storeu_ps(out[4] + 8, c41);
        _mm256_storeu_ps(out[5], c50); _mm256_storeu_ps(out[5] + 8, c51);
#else
        const float *xs[LT_NT] = {x0, x1, x2, x3, x4, x5};
        for (int j = 0; j < LT_NT; j++) {
            for (int i = 0; i < LT_PANEL; i++) out[j][i] = 0.0f;
            for (int k = k0; k < k1; k++) {
                const float xv = xs[j][k];
                const float *w = wt + (size_t)k * ldw;
                for (int i = 0; i < LT_PANEL; i++) out[j][i] += w[i] * xv;
            }
        }
#endif
        for (int j = 0; j < tn; j++) {
            float *y = Y + (size_t)(t + j) * ldy;
            if (acc) for (int i = 0; i < np; i++) y[i] += out[j][i];
            else for (int i = 0; i < np; i++) y[i] = out[j][i];
        }
    }
}

/* --- blocked attention (prefill) -----------------------------------------------------------
 * A block of nq queries against nk keys as two matrix products on the GEMM micro-kernel:
 * scores = Q K^T with K^T in panel layout kt[(j / LT_PANEL) * D * LT_PANEL + d * LT_PANEL + j % LT_PANEL]
 * (kt_fill), a masked softmax per row (query i sees keys lo[i]..hi[i]), then O = P V with V rows
 * of stride ldv (read LT_PANEL floats at a time: buffers carry LT_PANEL floats of padding). */
#define LT_QB 48 /* queries per block (a multiple of LT_NT) */

static void kt_fill(float *kt, const float *K, int ldk, int nk, int D) {
    for (int j = 0; j < nk; j++) {
        float *dst = kt + (size_t)(j / LT_PANEL) * D * LT_PANEL + j % LT_PANEL;
        const float *src = K + (size_t)j * ldk;
        for (int d = 0; d < D; d++) dst[(size_t)d * LT_PANEL] = src[d];
    }
}

static void attn_block(const float *Q, int ldq, int nq, const float *kt, const float *V, int ldv, int nk,
                       const int *lo, const int *hi, int D, float scale, float *sc, int ldsc, float *O, int ldo) {
    for (int j0 = 0; j0 < nk; j0 += LT_PANEL)
        mm_panel(kt + (size_t)(j0 / LT_PANEL) * D * LT_PANEL, LT_PANEL, 0, D, Q, ldq, nq, sc + j0, ldsc,
                 nk - j0 < LT_PANEL ? nk - j0 : LT_PANEL, 0, NULL, 0);
    for (int i = 0; i < nq; i++) {
        float *r = sc + (size_t)i * ldsc;
        const int a = lo[i] < 0 ? 0 : lo[i], b = hi[i] < nk ? hi[i] : nk - 1;
        if (b < a) { memset(r, 0, (size_t)nk * 4); continue; }
        float mx = -INFINITY;
        for (int j = a; j <= b; j++) mx = r[j] > mx ? r[j] : mx;
        float sum = 0.0f;
        int j = a;
#if defined(LT_AVX2)
        const __m256 mv = _mm256_set1_ps(mx), sv = _mm256_set1_ps(scale);
        __m256 acc = _mm256_setzero_ps();
        for (; j + 8 <= b + 1; j += 8) {
            const __m256 e = exp8(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(r + j), mv), sv));
            _mm256_storeu_ps(r + j, e);
            acc = _mm256_add_ps(acc, e);
        }
        sum = hsum8(acc);
#endif
        for (; j <= b; j++) { r[j] = expf((r[j] - mx) * scale); sum += r[j]; }
        const float inv = 1.0f / sum;
        for (j = 0; j < a; j++) r[j] = 0.0f;
        for (j = a; j <= b; j++) r[j] *= inv;
        for (j = b + 1; j < nk; j++) r[j] = 0.0f;
    }
    for (int d0 = 0; d0 < D; d0 += LT_PANEL)
        mm_panel(V + d0, (size_t)ldv, 0, nk, sc, ldsc, nq, O + d0, ldo, D - d0 < LT_PANEL ? D - d0 : LT_PANEL, 0, NULL, 0);
}

/* work (multiply-adds) below which a loop runs on one thread: forking a team for tiny work
 * costs more than it saves, and with busy cores a barrier can wait for a descheduled thread.
 * Environment LT_PAR_MIN overrides (0 = always parallel). */
static double g_par_min = 65536.0;

/* scratch shared by the matmul kernels */
static float *g_wbuf;     /* n_threads * 2 * LT_PANEL * max_cols floats */
static int g_wbuf_cols;
static int8_t *g_xq;      /* max_cols */
static float *g_xs;       /* max_cols / 16 */

/* Y[t, :] = W X[t, :] for T tokens (row stride ldx for X, ldy for Y). */
static void matmul(const Mat *W, const float *X, int ldx, int T, float *Y, int ldy) {
    const int rows = W->rows, nb = (rows + 3) / 4;
    if (T == 1) {
        if (W->dtype == DT_I8) quantize_act(X, W->cols, W->gs, g_xq, g_xs);
#pragma omp parallel for schedule(static) if ((double)rows * W->cols >= g_par_min)
        for (int b = 0; b < nb; b++) {
            const int nr = rows - 4 * b < 4 ? rows - 4 * b : 4;
            float *y = Y + 4 * b;
            if (nr < 4) mv_block_scalar(W, b, nr, X, g_xq, g_xs, y);
            else if (W->dtype == DT_F32) mv_f32_block(W, b, X, y);
            else if (W->dtype == DT_BF16) mv_bf16_block(W, b, X, y);
            else mv_i8_block(W, b, g_xq, g_xs, y);
        }
        return;
    }
    const int npan = (rows + LT_PANEL - 1) / LT_PANEL;
#pragma omp parallel for schedule(static) if ((double)rows * W->cols * T >= g_par_min)
    for (int p = 0; p < npan; p++) {
        const int r0 = p * LT_PANEL, np = rows - r0 < LT_PANEL ? rows - r0 : LT_PANEL;
        float *wt = g_wbuf + (size_t)thread_id() * 2 * LT_PANEL * g_wbuf_cols;
        panel_fill(W, r0, np, wt, wt + (size_t)LT_PANEL * g_wbuf_cols);
        /* k blocks keep the panel slice in L1 and the X slice of all tokens in L2 */
        /* the next panel's weights (and int8 scales), prefetched while this one computes */
        const char *pf = NULL, *pfs = NULL;
        size_t pfb = 0, pfsb = 0;
        if (r0 + LT_PANEL < rows) {
            const int nn = rows - r0 - LT_PANEL < LT_PANEL ? rows - r0 - LT_PANEL : LT_PANEL;
            const size_t esz = W->dtype == DT_F32 ? 4 : W->dtype == DT_BF16 ? 2 : 1;
            pf = (const char *)W->w + (size_t)(r0 + LT_PANEL) * W->cols * esz;
            pfb = (size_t)nn * W->cols * esz;
            if (W->dtype == DT_I8) {
                pfs = (const char *)(W->s + (size_t)(r0 + LT_PANEL) * (W->cols / W->gs));
                pfsb = (size_t)nn * (W->cols / W->gs) * 4;
            }
        }
        for (int k0 = 0; k0 < W->cols; k0 += LT_KB)
            mm_panel(wt, LT_PANEL, k0, W->cols - k0 < LT_KB ? W->cols : k0 + LT_KB, X, ldx, T, Y + r0, ldy, np, k0 > 0, pf, pfb);
#if defined(LT_AVX2) || defined(LT_AVX512)
        for (size_t o = 0; pfs && o < pfsb; o += 64) _mm_prefetch(pfs + o, _MM_HINT_T1);
#endif
    }
}

/* one row of a matrix as fp32 (embedding lookup) */
static void mat_row(const Mat *W, int r, float *out) {
    const int b = r / 4, rr = r % 4, nr = W->rows - 4 * b < 4 ? W->rows - 4 * b : 4;
    const int n = W->cols, kc = W->kc, nc = n / kc;
    for (int c = 0; c < nc; c++) {
        const size_t off = pk_off(n, kc, nr, b, rr, c);
        float *o = out + (size_t)c * kc;
        if (W->dtype == DT_F32) memcpy(o, (const float *)W->w + off, (size_t)kc * 4);
        else if (W->dtype == DT_BF16) for (int k = 0; k < kc; k++) o[k] = bf16_to_f32(((const uint16_t *)W->w)[off + k]);
        else {
            const float sc = W->s[(size_t)b * 4 * nc + (size_t)c * nr + rr];
            for (int k = 0; k < kc; k++) o[k] = (float)((const int8_t *)W->w)[off + k] * sc;
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* state and forward pass                                                                      */
/* ------------------------------------------------------------------------------------------ */
typedef struct {
    float *conv;   /* [K-1, C] previous conv inputs, oldest first */
    float *S;      /* [Hv, Dk, Dv] */
    float *k, *v;  /* full: [max_pos, kv_dim]; csa: ring [ring, kv_dim] (RoPE'd keys) */
    float *kc, *vc;     /* csa: compressed blocks [n_blocks_max, kv_dim] */
    float *pk, *pv;     /* csa: raw k (normed, no RoPE) and v of the current partial block [S, kv_dim] */
    int n_part;         /* rows in pk/pv */
    int n_blocks;       /* completed blocks */
} LayerState;

typedef struct {
    int chunk;          /* max tokens per forward call */
    int ring;           /* csa local ring size = window + chunk */
    int pos;            /* next position */
    LayerState *ls;
    float *cos_t, *sin_t;  /* [max_pos, rope_dim/2] */
    /* chunk scratch */
    float *h, *xn, *proj, *mo, *y, *u, *logits;
    float *bm_k, *bm_v, *bc_k, *bc_v; /* csa block means / compressed outputs for a chunk */
    int *bm_idx;
    float *gdn;         /* GDN beta, decay [chunk, Hv], k.q [chunk, Hk] */
    float *gp;          /* GDN per-head packed q, k [Hk, T, Dk], v, o [Hv, T, Dv] */
    float *kt;          /* keys of every kv head in panel layout for blocked attention (see kt_fill) */
    size_t kt_len;      /* floats per kv head */
    float *ab;          /* n_threads * ab_len: scores, gathered local keys / values (blocked attention) */
    size_t ab_len, ab_sc;
    float *att;         /* n_threads * att_len */
    int att_len;
    float *hd;          /* n_threads * per-head temporaries */
    int hd_len;
} State;

static void state_free(State *s, const Model *m);

/* Runtime-state budget in bytes.  The caches and scratch buffers depend on header fields that no
 * weight ties to the file (max_position_embeddings, csa_window, the prefill chunk), so they are
 * bounded twice: by a hard cap that also keeps every buffer index inside int (2^31 floats; the
 * fuzz harness lowers it), and relative to the model file -- a real model needs far less state
 * than its weights (95.7M model: ~40 MB of state for 104-383 MB of weights; a 128K context with
 * 4 full-attention layers needs ~8 bytes per byte of int8 weights), so a small file that declares
 * a huge context is refused before anything is allocated. */
static double g_state_limit = 8e9;
#define LT_STATE_FLOOR 256e6    /* bytes always allowed (tiny test models with long contexts) */
#define LT_STATE_PER_BYTE 32.0  /* bytes of state allowed per byte of model file above that */

/* zeroed, 64-byte aligned (cache-line aligned rows for the SIMD loops); free() releases it */
static void *xcalloc(size_t n, size_t sz, int *fail) {
    void *p = NULL;
    if (!n) n = 1;
    if (!sz) sz = 1;
    if (n > SIZE_MAX / sz || posix_memalign(&p, 64, n * sz) != 0) { *fail = 1; return NULL; }
    memset(p, 0, n * sz);
    return p;
}

static int state_init(State *s, const Model *m, int chunk, int all_logits, char *err, size_t errn) {
    memset(s, 0, sizeof(*s));
    if (chunk < 1) chunk = 1;
    if (chunk > m->max_pos) chunk = m->max_pos;
    s->chunk = chunk;
    s->ring = m->csa_window + chunk;
    if (s->ring > m->max_pos) s->ring = m->max_pos;
    const int nt = n_threads();
    const int C = m->lin_c, KV = m->kv_dim, VD = m->lv_heads * m->lv_dim;
    const int nblk = m->max_pos / m->csa_stride + 1;
    /* refuse absurd allocations up front (bytes, computed in double to avoid overflow) */
    double need = 0;
    need += (double)m->n_lin * ((double)(m->conv_k - 1) * C + (double)m->lv_heads * m->lk_dim * m->lv_dim);
    need += (double)m->n_full * 2.0 * m->max_pos * KV;
    need += (double)m->n_csa * (2.0 * s->ring * KV + 2.0 * nblk * KV + 2.0 * m->csa_stride * KV);
    need += (double)chunk * (3.0 * m->dim + 2.0 * m->inter + 2.0 * m->q_dim + 3.0 * C + 2.0 * VD);
    if (m->n_lin) need += (double)chunk * (2.0 * m->lk_heads * m->lk_dim + 2.0 * VD);
    need += (double)m->vocab * (all_logits ? chunk : 1) + 2.0 * m->max_pos * m->rope_dim;
    if (m->n_full || m->n_csa) /* blocked attention scratch */
        need += (double)m->n_kv * (m->max_pos + nblk + LT_PANEL) * m->head_dim +
                (double)nt * LT_QB * (m->max_pos + nblk + m->csa_window + 3.0 * LT_PANEL + LT_QB) * 3;
    /* projection outputs (attention rows: 3 q_dim + 2 kv) and the per-thread weight panels */
    need += (double)chunk * (3.0 * m->q_dim + 2.0 * KV) + (double)nt * 2.0 * LT_PANEL * (m->dim + m->inter + VD + m->q_dim + KV);
    need *= 4.0;
    double limit = LT_STATE_PER_BYTE * (double)m->size;
    if (limit < LT_STATE_FLOOR) limit = LT_STATE_FLOOR;
    if (limit > g_state_limit) limit = g_state_limit;
    if (need > limit) {
        if (err && errn)
            snprintf(err, errn, "model: runtime state would need %lld MB (max_position_embeddings %d, csa_window %d, "
                     "%d layers, kv width %d), more than the %lld MB allowed for a %lld-byte model file; "
                     "the header's dimensions are implausible for this file", (long long)(need / 1e6), m->max_pos,
                     m->csa_window, m->n_layers, m->kv_dim, (long long)(limit / 1e6), (long long)m->size);
        return -1;
    }
    int fail = 0;
    s->ls = (LayerState *)xcalloc((size_t)m->n_layers, sizeof(LayerState), &fail);
    if (fail) goto oom;
    for (int l = 0; l < m->n_layers; l++) {
        LayerState *L = &s->ls[l];
        if (m->types[l] == MIX_LINEAR) {
            L->conv = (float *)xcalloc((size_t)(m->conv_k - 1) * C, 4, &fail);
            L->S = (float *)xcalloc((size_t)m->lv_heads * m->lk_dim * m->lv_dim, 4, &fail);
        } else if (m->types[l] == MIX_FULL) {
            L->k = (float *)xcalloc((size_t)m->max_pos * KV, 4, &fail);
            L->v = (float *)xcalloc((size_t)m->max_pos * KV + LT_PANEL, 4, &fail); /* + pad: see attn_block */
        } else {
            L->k = (float *)xcalloc((size_t)s->ring * KV, 4, &fail);
            L->v = (float *)xcalloc((size_t)s->ring * KV, 4, &fail);
            L->kc = (float *)xcalloc((size_t)nblk * KV, 4, &fail);
            L->vc = (float *)xcalloc((size_t)nblk * KV + LT_PANEL, 4, &fail);
            L->pk = (float *)xcalloc((size_t)m->csa_stride * KV, 4, &fail);
            L->pv = (float *)xcalloc((size_t)m->csa_stride * KV, 4, &fail);
        }
        if (fail) goto oom;
    }
    int half = m->rope_dim / 2;
    s->cos_t = (float *)xcalloc((size_t)m->max_pos * (half ? half : 1), 4, &fail);
    s->sin_t = (float *)xcalloc((size_t)m->max_pos * (half ? half : 1), 4, &fail);
    if (fail) goto oom;
    for (int i = 0; i < half; i++) {
        float inv = 1.0f / powf((float)m->rope_theta, (float)(2 * i) / (float)m->rope_dim);
        for (int p = 0; p < m->max_pos; p++) {
            float a = (float)p * inv;
            s->cos_t[(size_t)p * half + i] = cosf(a);
            s->sin_t[(size_t)p * half + i] = sinf(a);
        }
    }
    int pmax = 2 * m->inter;
    int rows_lin = C + VD + 2 * m->lv_heads, rows_att = 3 * m->q_dim + 2 * KV;
    if (m->n_lin && rows_lin > pmax) pmax = rows_lin;
    if ((m->n_csa || m->n_full) && rows_att > pmax) pmax = rows_att;
    int omax = m->q_dim > VD ? m->q_dim : VD;
    s->h = (float *)xcalloc((size_t)chunk * m->dim, 4, &fail);
    s->xn = (float *)xcalloc((size_t)chunk * m->dim, 4, &fail);
    s->y = (float *)xcalloc((size_t)chunk * m->dim, 4, &fail);
    s->proj = (float *)xcalloc((size_t)chunk * pmax, 4, &fail);
    s->mo = (float *)xcalloc((size_t)chunk * omax, 4, &fail);
    s->u = (float *)xcalloc((size_t)chunk * C, 4, &fail);
    s->logits = (float *)xcalloc((size_t)(all_logits ? chunk : 1) * m->vocab, 4, &fail);
    int nb = chunk / m->csa_stride + 2;
    s->bm_k = (float *)xcalloc((size_t)nb * KV, 4, &fail);
    s->bm_v = (float *)xcalloc((size_t)nb * KV, 4, &fail);
    s->bc_k = (float *)xcalloc((size_t)nb * KV, 4, &fail);
    s->bc_v = (float *)xcalloc((size_t)nb * KV, 4, &fail);
    s->bm_idx = (int *)xcalloc((size_t)nb, sizeof(int), &fail);
    s->gdn = (float *)xcalloc((size_t)chunk * (2 * m->lv_heads + m->lk_heads), 4, &fail);
    if (m->n_lin) s->gp = (float *)xcalloc((size_t)chunk * (2 * m->lk_heads * m->lk_dim + 2 * VD), 4, &fail);
    if (m->n_full || m->n_csa) {
        const int mk = m->max_pos > nblk ? m->max_pos : nblk;
        const int lk = LT_QB + m->csa_window + LT_PANEL;
        s->kt_len = (size_t)(mk + LT_PANEL) * m->head_dim;
        s->kt = (float *)xcalloc((size_t)m->n_kv * s->kt_len, 4, &fail);
        s->ab_sc = (size_t)LT_QB * ((mk > lk ? mk : lk) + LT_PANEL);
        s->ab_len = s->ab_sc + (2 * (size_t)lk + 2 * LT_QB) * m->head_dim + LT_PANEL;
        s->ab = (float *)xcalloc((size_t)nt * s->ab_len, 4, &fail);
    }
    s->att_len = m->max_pos + nblk + 16;
    s->att = (float *)xcalloc((size_t)nt * s->att_len, 4, &fail);
    s->hd_len = 4 * m->lk_dim + 5 * m->lv_dim + 4 * m->head_dim + 16;
    s->hd = (float *)xcalloc((size_t)nt * s->hd_len, 4, &fail);
    int maxc = m->dim > m->inter ? m->dim : m->inter;
    if (VD > maxc) maxc = VD;
    if (m->q_dim > maxc) maxc = m->q_dim;
    if (KV > maxc) maxc = KV;
    g_wbuf_cols = maxc;
    g_wbuf = (float *)xcalloc((size_t)nt * 2 * LT_PANEL * maxc, 4, &fail);
    g_xq = (int8_t *)xcalloc((size_t)maxc, 1, &fail);
    g_xs = (float *)xcalloc((size_t)maxc / 16 + 1, 4, &fail);
    if (fail) goto oom;
    return 0;
oom:
    set_err(err, errn, "%s: out of memory allocating the runtime state%lld", "model", 0);
    state_free(s, m);
    return -1;
}

static void state_free(State *s, const Model *m) {
    if (s->ls) {
        for (int l = 0; l < m->n_layers; l++) {
            LayerState *L = &s->ls[l];
            free(L->conv); free(L->S); free(L->k); free(L->v);
            free(L->kc); free(L->vc); free(L->pk); free(L->pv);
        }
    }
    free(s->ls); free(s->cos_t); free(s->sin_t);
    free(s->h); free(s->xn); free(s->proj); free(s->mo); free(s->y); free(s->u); free(s->logits);
    free(s->bm_k); free(s->bm_v); free(s->bc_k); free(s->bc_v); free(s->bm_idx);
    free(s->att); free(s->hd); free(s->gdn); free(s->gp); free(s->kt); free(s->ab);
    free(g_wbuf); free(g_xq); free(g_xs);
    g_wbuf = NULL; g_xq = NULL; g_xs = NULL;
    memset(s, 0, sizeof(*s));
}

/* sum of squares in double (8 lanes at a time) */
static inline double sumsq(const float *x, int n) {
    double ss = 0;
    int i0 = 0;
#if defined(LT_AVX2)
    __m256d s0 = _mm256_setzero_pd(), s1 = s0;
    for (; i0 + 8 <= n; i0 += 8) {
        const __m256 v = _mm256_loadu_ps(x + i0);
        const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v)), hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
        s0 = _mm256_fmadd_pd(lo, lo, s0);
        s1 = _mm256_fmadd_pd(hi, hi, s1);
    }
    double tmp[4];
    _mm256_storeu_pd(tmp, _mm256_add_pd(s0, s1));
    ss = (tmp[0] + tmp[1]) + (tmp[2] + tmp[3]);
#endif
    for (int i = i0; i < n; i++) ss += (double)x[i] * x[i];
    return ss;
}

/* 1/sqrt(m + eps) for a mean square m summed in double: NaN where m is beyond float's range (a hidden state above
 * about 1e19: weights too large for the model's float32 arithmetic), not the 0 that 1/sqrt(inf) would give. PyTorch's
 * float32 norms overflow there too; NaN reaches the logits, which `sample` refuses, where a zeroed state would print
 * one token forever. */
static float inv_root(double m, float eps) {
    const float mf = (float)m;
    return isfinite(mf) ? 1.0f / sqrtf(mf + eps) : NAN;
}

/* x * 1/sqrt(mean(x^2)+eps) * w1 */
static void rmsnorm(float *o, const float *x, const float *w1, int n, float eps) {
    const float inv = inv_root(sumsq(x, n) / n, eps);
    for (int i = 0; i < n; i++) o[i] = (x[i] * inv) * w1[i];
}

static void rope(float *v, int pos, const State *s, int half) {
    const float *c = s->cos_t + (size_t)pos * half, *sn = s->sin_t + (size_t)pos * half;
    for (int i = 0; i < half; i++) {
        float x1 = v[i], x2 = v[i + half];
        v[i] = x1 * c[i] - x2 * sn[i];
        v[i + half] = x2 * c[i] + x1 * sn[i];
    }
}

/* out[j] = q . keys[j] for 8 keys (AVX2; D % 8 == 0): 8 dot products, reduced together */
#if defined(LT_AVX2)
static inline void scores8(const float *q, const float *const *kp, int D, float scale, float *out) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (int d = 0; d < D; d += 8) {
        const __m256 qv = _mm256_loadu_ps(q + d);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(kp[0] + d), qv, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(kp[1] + d), qv, a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(kp[2] + d), qv, a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(kp[3] + d), qv, a3);
        a4 = _mm256_fmadd_ps(_mm256_loadu_ps(kp[4] + d), qv, a4);
        a5 = _mm256_fmadd_ps(_mm256_loadu_ps(kp[5] + d), qv, a5);
        a6 = _mm256_fmadd_ps(_mm256_loadu_ps(kp[6] + d), qv, a6);
        a7 = _mm256_fmadd_ps(_mm256_loadu_ps(kp[7] + d), qv, a7);
    }
    __m256 t0 = _mm256_hadd_ps(a0, a1), t1 = _mm256_hadd_ps(a2, a3);
    __m256 t2 = _mm256_hadd_ps(a4, a5), t3 = _mm256_hadd_ps(a6, a7);
    t0 = _mm256_hadd_ps(t0, t1);
    t2 = _mm256_hadd_ps(t2, t3);
    const __m256 r = _mm256_add_ps(_mm256_permute2f128_ps(t0, t2, 0x20), _mm256_permute2f128_ps(t0, t2, 0x31));
    _mm256_storeu_ps(out, _mm256_mul_ps(r, _mm256_set1_ps(scale)));
}
#endif

/* softmax over att[0..nk) then o = sum_j att[j] V_j, V_j at V + j*ld, or for a ring buffer
 * (ring > 0) at V + ((lo + j) % ring)*ld + kvoff */
static void softmax_av(float *o, float *att, int nk, const float *V, int ld, int ring, int lo, int kvoff, int D) {
    float mx = -INFINITY;
    for (int j = 0; j < nk; j++) mx = att[j] > mx ? att[j] : mx;
    float sum = 0.0f;
    int j = 0;
#if defined(LT_AVX2)
    __m256 sv = _mm256_setzero_ps();
    for (; j + 8 <= nk; j += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(att + j), _mm256_set1_ps(mx)));
        _mm256_storeu_ps(att + j, e);
        sv = _mm256_add_ps(sv, e);
    }
    sum = hsum8(sv);
#endif
    for (; j < nk; j++) { att[j] = expf(att[j] - mx); sum += att[j]; }
    const float inv = 1.0f / sum;
    memset(o, 0, (size_t)D * 4);
    int slot = ring ? lo % ring : 0;
    const float *vp[4];
    float pw[4];
    int nb = 0;
    for (j = 0; j < nk; j++) {
        vp[nb] = ring ? V + (size_t)slot * ld + kvoff : V + (size_t)j * ld;
        pw[nb++] = att[j] * inv;
        if (ring && ++slot == ring) slot = 0;
        if (nb == 4 || j == nk - 1) { /* o += sum of up to 4 weighted rows, one pass over o */
            for (int i = nb; i < 4; i++) { vp[i] = vp[0]; pw[i] = 0.0f; }
            for (int d = 0; d < D; d++) o[d] += pw[0] * vp[0][d] + pw[1] * vp[1][d] + pw[2] * vp[2][d] + pw[3] * vp[3][d];
            nb = 0;
        }
    }
}

/* o = softmax(q.K^T * scale) V over nk rows of K/V (row stride ld), att scratch */
static void attend(float *o, const float *q, const float *K, const float *V, int ld, int nk, int D,
                   float scale, float *att) {
    int j = 0;
#if defined(LT_AVX2)
    if (D % 8 == 0)
        for (; j + 8 <= nk; j += 8) {
            const float *kp[8];
            for (int i = 0; i < 8; i++) kp[i] = K + (size_t)(j + i) * ld;
            scores8(q, kp, D, scale, att + j);
        }
#endif
    for (; j < nk; j++) att[j] = dotf(q, K + (size_t)j * ld, D) * scale;
    softmax_av(o, att, nk, V, ld, 0, 0, 0, D);
}

/* ring-buffer attention: keys at positions [lo, hi] stored at slot p % ring */
static void attend_ring(float *o, const float *q, const float *K, const float *V, int ring, int lo, int hi,
                        int kvoff, int KV, int D, float scale, float *att) {
    const int nk = hi - lo + 1;
    int j = 0;
#if defined(LT_AVX2)
    if (D % 8 == 0)
        for (; j + 8 <= nk; j += 8) {
            const float *kp[8];
            for (int i = 0; i < 8; i++) kp[i] = K + (size_t)((lo + j + i) % ring) * KV + kvoff;
            scores8(q, kp, D, scale, att + j);
        }
#endif
    for (; j < nk; j++) att[j] = dotf(q, K + (size_t)((lo + j) % ring) * KV + kvoff, D) * scale;
    softmax_av(o, att, nk, V, KV, ring, lo, kvoff, D);
}

/* One pass over columns [j0, j0 + w) of a Gated DeltaNet state S [Dk, Dv] (w = 16, 8 or 1..7):
 * S = d S + k dl^T, then (when kn != NULL) a = S^T kn, b = S^T qn on those columns. The columns
 * of S are independent, so column blocks of different heads run on different threads. */
static void gdn_pass(float *S, int Dk, int Dv, int j0, int w, float d, const float *k, const float *dl,
                     const float *kn, const float *qn, float *a, float *b) {
#if defined(LT_AVX2)
    const __m256 dv = _mm256_set1_ps(d);
    if (w == 16) {
        const __m256 l0 = _mm256_loadu_ps(dl + j0), l1 = _mm256_loadu_ps(dl + j0 + 8);
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
        for (int i = 0; i < Dk; i++) {
            float *row = S + (size_t)i * Dv + j0;
            const __m256 ki = _mm256_broadcast_ss(k + i);
            __m256 s0 = _mm256_fmadd_ps(ki, l0, _mm256_mul_ps(dv, _mm256_loadu_ps(row)));
            __m256 s1 = _mm256_fmadd_ps(ki, l1, _mm256_mul_ps(dv, _mm256_loadu_ps(row + 8)));
            _mm256_storeu_ps(row, s0);
            _mm256_storeu_ps(row + 8, s1);
            if (kn) {
                const __m256 kni = _mm256_broadcast_ss(kn + i), qni = _mm256_broadcast_ss(qn + i);
                a0 = _mm256_fmadd_ps(kni, s0, a0); a1 = _mm256_fmadd_ps(kni, s1, a1);
                b0 = _mm256_fmadd_ps(qni, s0, b0); b1 = _mm256_fmadd_ps(qni, s1, b1);
            }
        }
        if (kn) {
            _mm256_storeu_ps(a + j0, a0); _mm256_storeu_ps(a + j0 + 8, a1);
            _mm256_storeu_ps(b + j0, b0); _mm256_storeu_ps(b + j0 + 8, b1);
        }
        return;
    }
    if (w == 8) {
        const __m256 l0 = _mm256_loadu_ps(dl + j0);
        __m256 a0 = _mm256_setzero_ps(), b0 = a0;
        for (int i = 0; i < Dk; i++) {
            float *row = S + (size_t)i * Dv + j0;
            __m256 s0 = _mm256_fmadd_ps(_mm256_broadcast_ss(k + i), l0, _mm256_mul_ps(dv, _mm256_loadu_ps(row)));
            _mm256_storeu_ps(row, s0);
            if (kn) {
                a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(kn + i), s0, a0);
                b0 = _mm256_fmadd_ps(_mm256_broadcast_ss(qn + i), s0, b0);
            }
        }
        if (kn) { _mm256_storeu_ps(a + j0, a0); _mm256_storeu_ps(b + j0, b0); }
        return;
    }
#endif
    if (kn) for (int j = j0; j < j0 + w; j++) { a[j] = 0.0f; b[j] = 0.0f; }
    for (int i = 0; i < Dk; i++) {
        float *row = S + (size_t)i * Dv;
        for (int j = j0; j < j0 + w; j++) {
            const float sv = d * row[j] + k[i] * dl[j];
            row[j] = sv;
            if (kn) { a[j] += kn[i] * sv; b[j] += qn[i] * sv; }
        }
    }
}

/* a = S^T k, b = S^T q on columns [j0, j0 + w) */
static void gdn_read(const float *S, int Dk, int Dv, int j0, int w, const float *k, const float *q, float *a, float *b) {
    for (int j = j0; j < j0 + w; j++) { a[j] = 0.0f; b[j] = 0.0f; }
    for (int i = 0; i < Dk; i++) {
        const float *row = S + (size_t)i * Dv;
        const float ki = k[i], qi = q[i];
        for (int j = j0; j < j0 + w; j++) { a[j] += ki * row[j]; b[j] += qi * row[j]; }
    }
}

static void mixer_linear(const Model *m, const Layer *L, LayerState *ls, State *s, int T) {
    const int C = m->lin_c, K = m->conv_k, Hk = m->lk_heads, Hv = m->lv_heads, Dk = m->lk_dim, Dv = m->lv_dim;
    const int VD = Hv * Dv, P = L->w_in.rows, QK = Hk * Dk;
    const float eps = (float)m->eps, qscale = 1.0f / sqrtf((float)Dk);
    float *gq = s->gdn, *gd = gq + (size_t)T * Hv, *gkq = gd + (size_t)T * Hv; /* beta, decay [T, Hv]; k.q [T, Hk] */
    /* q, k, v of each head packed [head, T, dim] (and the outputs o): the recurrence of one head
     * then streams through contiguous memory */
    float *PQ = s->gp, *PK = PQ + (size_t)T * QK, *PV = PK + (size_t)T * QK, *PO = PV + (size_t)T * VD;
    PROF_BEGIN();
    /* causal depthwise conv + SiLU: u_t[c] = silu(sum_i w[c, i] x_{t-K+1+i}[c]), inputs before the
     * chunk from the conv state; then L2-normalised q (times 1/sqrt(Dk)) and k, beta, decay */
#pragma omp parallel for schedule(static) if (T > 1 && (double)T * C * K * 8 >= g_par_min)
    for (int t = 0; t < T; t++) {
        float *u = s->u + (size_t)t * C;
        const float *xr[64];
        for (int i = 0; i < K; i++) {
            const int r = t - (K - 1) + i;
            xr[i] = r < 0 ? ls->conv + (size_t)(K - 1 + r) * C : s->proj + (size_t)r * P;
        }
        if (K == 4) { /* the usual kernel size: one pass */
            const float *w0 = L->conv_wt, *w1 = w0 + C, *w2 = w1 + C, *w3 = w2 + C;
            for (int c = 0; c < C; c++) u[c] = ((w0[c] * xr[0][c] + w1[c] * xr[1][c]) + w2[c] * xr[2][c]) + w3[c] * xr[3][c];
        } else {
            for (int i = 0; i < K; i++) {
                const float *w = L->conv_wt + (size_t)i * C, *x = xr[i];
                if (i == 0) for (int c = 0; c < C; c++) u[c] = w[c] * x[c];
                else for (int c = 0; c < C; c++) u[c] += w[c] * x[c];
            }
        }
        vsilu_mul(u, u, NULL, C);
        for (int kh = 0; kh < Hk; kh++) {
            float *uq = u + kh * Dk, *uk = u + QK + kh * Dk;
            const float iq = inv_root(sumsq(uq, Dk), 1e-6f), ik = inv_root(sumsq(uk, Dk), 1e-6f);
            for (int i = 0; i < Dk; i++) {
                uq[i] = uq[i] * iq * qscale;
                uk[i] = uk[i] * ik;
            }
            gkq[(size_t)t * Hk + kh] = dotf(uk, uq, Dk);
            memcpy(PQ + ((size_t)kh * T + t) * Dk, uq, (size_t)Dk * 4);
            memcpy(PK + ((size_t)kh * T + t) * Dk, uk, (size_t)Dk * 4);
        }
        for (int h = 0; h < Hv; h++) memcpy(PV + ((size_t)h * T + t) * Dv, u + 2 * QK + h * Dv, (size_t)Dv * 4);
        const float *pr = s->proj + (size_t)t * P;
        for (int h = 0; h < Hv; h++) {
            gq[(size_t)t * Hv + h] = sigmoidf_(pr[C + VD + h]);
            gd[(size_t)t * Hv + h] = expf(L->neg_exp_a[h] * softplusf_(pr[C + VD + Hv + h] + L->dt_bias[h]));
        }
    }
    if (K > 1) { /* conv state: the last K-1 inputs */
        const int keep = T < K - 1 ? K - 1 - T : 0;
        if (keep) memmove(ls->conv, ls->conv + (size_t)T * C, (size_t)keep * C * 4);
        for (int r = keep; r < K - 1; r++) memcpy(ls->conv + (size_t)r * C, s->proj + (size_t)(T - (K - 1) + r) * P, (size_t)C * 4);
    }
    PROF_END(PF_CONV);
    /* Recurrence S_t = d S_{t-1} + k (beta (v - d S_{t-1}^T k))^T, o_t = S_t^T q, evaluated as
     * a = S_{t-1}^T k, b = S_{t-1}^T q, delta = beta (v - d a), o = d b + (k.q) delta, so one
     * pass over S per token both applies token t's update and reads a, b for token t+1.
     * Work units: (head, block of 16 columns of S). */
    const int rep = Hv / Hk, nbj = (Dv + 15) / 16, nunits = Hv * nbj;
#pragma omp parallel for schedule(static) if ((double)T * Hv * Dk * Dv * 4 >= g_par_min)
    for (int un = 0; un < nunits; un++) {
        const int h = un / nbj, j0 = (un % nbj) * 16, w = Dv - j0 < 16 ? Dv - j0 : 16;
        float *tmp = s->hd + (size_t)thread_id() * s->hd_len;
        float *a = tmp, *bq = a + Dv, *dl = bq + Dv;
        float *S = ls->S + (size_t)h * Dk * Dv;
        const int kh = h / rep;
        const float *qh = PQ + (size_t)kh * T * Dk, *kh_ = PK + (size_t)kh * T * Dk;
        gdn_read(S, Dk, Dv, j0, w, kh_, qh, a, bq);
        for (int t = 0; t < T; t++) {
            const float *k = kh_ + (size_t)t * Dk, *v = PV + ((size_t)h * T + t) * Dv;
            const float beta = gq[(size_t)t * Hv + h], d = gd[(size_t)t * Hv + h], kq = gkq[(size_t)t * Hk + kh];
            float *o = PO + ((size_t)h * T + t) * Dv;
            for (int j = j0; j < j0 + w; j++) {
                dl[j] = beta * (v[j] - d * a[j]);
                o[j] = d * bq[j] + kq * dl[j];
            }
            const float *kn = t + 1 < T ? k + Dk : NULL, *qn = t + 1 < T ? qh + (size_t)(t + 1) * Dk : NULL;
            if (w != 16 && w != 8 && kn) { /* odd width: split into 8 + rest */
                int jj = j0, ww = w;
                if (ww > 8) { gdn_pass(S, Dk, Dv, jj, 8, d, k, dl, kn, qn, a, bq); jj += 8; ww -= 8; }
                gdn_pass(S, Dk, Dv, jj, ww, d, k, dl, kn, qn, a, bq);
            } else {
                gdn_pass(S, Dk, Dv, j0, w, d, k, dl, kn, qn, a, bq);
            }
        }
    }
    PROF_END(PF_GDN);
    /* gated RMSNorm: o / rms(o) * w * silu(z) */
#pragma omp parallel for schedule(static) if ((double)T * VD * 8 >= g_par_min)
    for (int t = 0; t < T; t++) {
        const float *pr = s->proj + (size_t)t * P;
        float *sz = s->hd + (size_t)thread_id() * s->hd_len;
        for (int h = 0; h < Hv; h++) {
            const float *o = PO + ((size_t)h * T + t) * Dv;
            float *out = s->mo + (size_t)t * VD + h * Dv;
            const float inv = inv_root(sumsq(o, Dv) / Dv, eps);
            vsilu_mul(sz, pr + C + h * Dv, L->gnorm, Dv);
            for (int j = 0; j < Dv; j++) out[j] = (o[j] * inv) * sz[j];
        }
    }
    PROF_END(PF_GDN_NORM);
}

static void mixer_full(const Model *m, const Layer *L, LayerState *ls, State *s, int T, int pos0) {
    const int D = m->head_dim, Hq = m->n_heads, Hkv = m->n_kv, QD = m->q_dim, KV = m->kv_dim;
    const int P = L->w_in.rows, half = m->rope_dim / 2;
    const float eps = (float)m->eps, scale = 1.0f / sqrtf((float)D);
    for (int t = 0; t < T; t++) {
        float *pr = s->proj + (size_t)t * P;
        const int pos = pos0 + t;
        for (int h = 0; h < Hq; h++) {
            float *q = pr + (size_t)h * 2 * D;
            rmsnorm(q, q, L->q_norm1, D, eps);
            rope(q, pos, s, half);
        }
        float *kd = ls->k + (size_t)pos * KV, *vd = ls->v + (size_t)pos * KV;
        for (int h = 0; h < Hkv; h++) {
            rmsnorm(kd + h * D, pr + 2 * QD + h * D, L->k_norm1, D, eps);
            rope(kd + h * D, pos, s, half);
        }
        memcpy(vd, pr + 2 * QD + KV, (size_t)KV * 4);
    }
    const int rep = Hq / Hkv;
    if (T >= LT_NT) { /* blocked: (head, block of LT_QB queries) units on the GEMM micro-kernel */
        const int nk = pos0 + T, nqb = (T + LT_QB - 1) / LT_QB;
        for (int kvh = 0; kvh < Hkv; kvh++) kt_fill(s->kt + (size_t)kvh * s->kt_len, ls->k + kvh * D, KV, nk, D);
#pragma omp parallel for schedule(dynamic, 1) if ((double)T * nk * Hq * D >= g_par_min)
        for (int un = 0; un < Hq * nqb; un++) {
            const int h = un % Hq, t0 = (un / Hq) * LT_QB, nq = T - t0 < LT_QB ? T - t0 : LT_QB, kvh = h / rep;
            int lo[LT_QB], hi[LT_QB];
            for (int i = 0; i < nq; i++) { lo[i] = 0; hi[i] = pos0 + t0 + i; }
            float *sc = s->ab + (size_t)thread_id() * s->ab_len, *sg = s->hd + (size_t)thread_id() * s->hd_len;
            float *o0 = s->mo + (size_t)t0 * QD + h * D;
            const float *q0 = s->proj + (size_t)t0 * P + (size_t)h * 2 * D;
            attn_block(q0, P, nq, s->kt + (size_t)kvh * s->kt_len, ls->v + kvh * D, KV, pos0 + t0 + nq, lo, hi, D,
                       scale, sc, (int)(s->ab_sc / LT_QB), o0, QD);
            for (int i = 0; i < nq; i++) {
                float *o = o0 + (size_t)i * QD;
                vsigmoid(sg, q0 + (size_t)i * P + D, D);
                for (int d = 0; d < D; d++) o[d] *= sg[d];
            }
        }
        return;
    }
#pragma omp parallel for schedule(static) if ((double)T * (pos0 + T) * Hq * D >= g_par_min)
    for (int h = 0; h < Hq; h++) {
        float *att = s->att + (size_t)thread_id() * s->att_len;
        const int kvh = h / rep;
        for (int t = 0; t < T; t++) {
            const float *pr = s->proj + (size_t)t * P;
            float *o = s->mo + (size_t)t * QD + h * D;
            attend(o, pr + (size_t)h * 2 * D, ls->k + kvh * D, ls->v + kvh * D, KV, pos0 + t + 1, D, scale, att);
            float *sg = s->hd + (size_t)thread_id() * s->hd_len;
            vsigmoid(sg, pr + (size_t)h * 2 * D + D, D);
            for (int i = 0; i < D; i++) o[i] *= sg[i];
        }
    }
}

static void mixer_csa(const Model *m, const Layer *L, LayerState *ls, State *s, int T, int pos0) {
    const int D = m->head_dim, Hq = m->n_heads, Hkv = m->n_kv, QD = m->q_dim, KV = m->kv_dim;
    const int P = L->w_in.rows, half = m->rope_dim / 2, S = m->csa_stride, W = m->csa_window;
    const float eps = (float)m->eps, scale = 1.0f / sqrtf((float)D);
    int nb = 0;
    PROF_BEGIN();
    for (int t = 0; t < T; t++) {
        float *pr = s->proj + (size_t)t * P;
        const int pos = pos0 + t;
        for (int h = 0; h < Hq; h++) {
            float *q = pr + (size_t)h * 2 * D;
            rmsnorm(q, q, L->q_norm1, D, eps);
            rope(q, pos, s, half);
        }
        const int slot = pos % s->ring;
        float *kr = ls->pk + (size_t)ls->n_part * KV, *vr = ls->pv + (size_t)ls->n_part * KV;
        for (int h = 0; h < Hkv; h++) rmsnorm(kr + h * D, pr + 2 * QD + h * D, L->k_norm1, D, eps);
        memcpy(vr, pr + 2 * QD + KV, (size_t)KV * 4);
        float *kd = ls->k + (size_t)slot * KV, *vd = ls->v + (size_t)slot * KV;
        memcpy(kd, kr, (size_t)KV * 4);
        for (int h = 0; h < Hkv; h++) rope(kd + h * D, pos, s, half);
        memcpy(vd, vr, (size_t)KV * 4);
        if (++ls->n_part == S) { /* block complete: mean-pool */
            float *mk = s->bm_k + (size_t)nb * KV, *mv = s->bm_v + (size_t)nb * KV;
            for (int c = 0; c < KV; c++) {
                float a = 0.0f, b = 0.0f;
                for (int i = 0; i < S; i++) { a += ls->pk[(size_t)i * KV + c]; b += ls->pv[(size_t)i * KV + c]; }
                mk[c] = a / (float)S;
                mv[c] = b / (float)S;
            }
            s->bm_idx[nb++] = ls->n_blocks++;
            ls->n_part = 0;
        }
    }
    if (nb) {
        matmul(&L->w_ck, s->bm_k, KV, nb, s->bc_k, KV);
        matmul(&L->w_cv, s->bm_v, KV, nb, s->bc_v, KV);
        for (int b = 0; b < nb; b++) {
            const int j = s->bm_idx[b];
            float *kc = ls->kc + (size_t)j * KV, *vc = ls->vc + (size_t)j * KV;
            memcpy(kc, s->bc_k + (size_t)b * KV, (size_t)KV * 4);
            memcpy(vc, s->bc_v + (size_t)b * KV, (size_t)KV * 4);
            for (int h = 0; h < Hkv; h++) rope(kc + h * D, j * S + S / 2, s, half);
        }
    }
    PROF_END(PF_CSA_PRE);
    const int rep = Hq / Hkv;
    if (T >= LT_NT) { /* blocked: (head, block of LT_QB queries) units on the GEMM micro-kernel */
        const int nkc = (pos0 + T - 1) / S, nqb = (T + LT_QB - 1) / LT_QB;
        for (int kvh = 0; kvh < Hkv && nkc > 0; kvh++) kt_fill(s->kt + (size_t)kvh * s->kt_len, ls->kc + kvh * D, KV, nkc, D);
        const int ldsc = (int)(s->ab_sc / LT_QB);
#pragma omp parallel for schedule(dynamic, 1) if ((double)T * (W + nkc) * Hq * D >= g_par_min)
        for (int un = 0; un < Hq * nqb; un++) {
            const int h = un % Hq, t0 = (un / Hq) * LT_QB, nq = T - t0 < LT_QB ? T - t0 : LT_QB, kvh = h / rep;
            const int p0 = pos0 + t0, kbase = p0 - W + 1 > 0 ? p0 - W + 1 : 0, nloc = p0 + nq - kbase;
            int lo[LT_QB], hi[LT_QB];
            float *sc = s->ab + (size_t)thread_id() * s->ab_len;
            float *ktl = sc + s->ab_sc, *vl = ktl + (size_t)(LT_QB + W + LT_PANEL) * D;
            float *loc = vl + (size_t)(LT_QB + W + LT_PANEL) * D + LT_PANEL, *cmp = loc + (size_t)LT_QB * D;
            float *tmp = s->hd + (size_t)thread_id() * s->hd_len, *sb = tmp, *sg = tmp + D;
            const float *q0 = s->proj + (size_t)t0 * P + (size_t)h * 2 * D;
            /* local window: gather keys kbase..p0+nq-1 from the ring */
            for (int j = 0; j < nloc; j++) {
                const int slot = (kbase + j) % s->ring;
                float *dst = ktl + (size_t)(j / LT_PANEL) * D * LT_PANEL + j % LT_PANEL;
                const float *kr = ls->k + (size_t)slot * KV + kvh * D;
                for (int d = 0; d < D; d++) dst[(size_t)d * LT_PANEL] = kr[d];
                memcpy(vl + (size_t)j * D, ls->v + (size_t)slot * KV + kvh * D, (size_t)D * 4);
            }
            for (int i = 0; i < nq; i++) {
                const int p = p0 + i;
                lo[i] = (p - W + 1 > 0 ? p - W + 1 : 0) - kbase;
                hi[i] = p - kbase;
            }
            attn_block(q0, P, nq, ktl, vl, D, nloc, lo, hi, D, scale, sc, ldsc, loc, D);
            /* compressed blocks: query at p sees blocks j < p / S */
            const int nku = (p0 + nq - 1) / S;
            if (nku > 0) {
                for (int i = 0; i < nq; i++) { lo[i] = 0; hi[i] = (p0 + i) / S - 1; }
                attn_block(q0, P, nq, s->kt + (size_t)kvh * s->kt_len, ls->vc + kvh * D, KV, nku, lo, hi, D, scale,
                           sc, ldsc, cmp, D);
            } else {
                memset(cmp, 0, (size_t)nq * D * 4);
            }
            for (int i = 0; i < nq; i++) {
                const float *pr = s->proj + (size_t)(t0 + i) * P;
                const float *bl = pr + 2 * QD + 2 * KV + h * D, *gate = pr + (size_t)h * 2 * D + D;
                const float *lc = loc + (size_t)i * D, *cm = cmp + (size_t)i * D;
                float *o = s->mo + (size_t)(t0 + i) * QD + h * D;
                vsigmoid(sb, bl, D);
                vsigmoid(sg, gate, D);
                for (int d = 0; d < D; d++) o[d] = (sb[d] * cm[d] + (1.0f - sb[d]) * lc[d]) * sg[d];
            }
        }
        PROF_END(PF_CSA_ATT);
        return;
    }
#pragma omp parallel for schedule(static) if ((double)T * (W + pos0 / S + 1) * Hq * D >= g_par_min)
    for (int h = 0; h < Hq; h++) {
        float *att = s->att + (size_t)thread_id() * s->att_len;
        float *tmp = s->hd + (size_t)thread_id() * s->hd_len;
        float *loc = tmp, *cmp = tmp + D;
        const int kvh = h / rep;
        for (int t = 0; t < T; t++) {
            const int pos = pos0 + t;
            const float *pr = s->proj + (size_t)t * P;
            const float *q = pr + (size_t)h * 2 * D;
            int lo = pos - W + 1;
            if (lo < 0) lo = 0;
            attend_ring(loc, q, ls->k, ls->v, s->ring, lo, pos, kvh * D, KV, D, scale, att);
            const int nvis = pos / S;
            if (nvis > 0) attend(cmp, q, ls->kc + kvh * D, ls->vc + kvh * D, KV, nvis, D, scale, att);
            else memset(cmp, 0, (size_t)D * 4);
            const float *bl = pr + 2 * QD + 2 * KV + h * D, *gate = q + D;
            float *o = s->mo + (size_t)t * QD + h * D, *sb = cmp + D, *sg = sb + D;
            vsigmoid(sb, bl, D);
            vsigmoid(sg, gate, D);
            for (int i = 0; i < D; i++) o[i] = (sb[i] * cmp[i] + (1.0f - sb[i]) * loc[i]) * sg[i];
        }
    }
    PROF_END(PF_CSA_ATT);
}

/* h = r1 * h + s1 * y (hyper-connections) or h += y, then (xn != NULL) xn = rmsnorm(h) * w1, for T rows */
static void residual_norm(const Model *m, const float *r1, const float *s1, float *hh, const float *yy, float *xn,
                          const float *w1, int T) {
    const int H = m->dim;
    const float eps = (float)m->eps;
#pragma omp parallel for schedule(static) if ((double)T * H * 8 >= g_par_min)
    for (int t = 0; t < T; t++) {
        float *h = hh + (size_t)t * H;
        const float *y = yy + (size_t)t * H;
        if (m->hyper) for (int i = 0; i < H; i++) h[i] = r1[i] * h[i] + s1[i] * y[i];
        else for (int i = 0; i < H; i++) h[i] += y[i];
        if (xn) rmsnorm(xn + (size_t)t * H, h, w1, H, eps);
    }
}

/* g = silu(g) * u for T rows [g | u] of 2I */
static void swiglu_rows(float *gu, int I, int T) {
#pragma omp parallel for schedule(static) if ((double)T * I * 8 >= g_par_min)
    for (int t = 0; t < T; t++) {
        float *g = gu + (size_t)t * 2 * I;
        vsilu_mul(g, g, g + I, I);
    }
}

/* Run T (<= chunk) tokens at positions s->pos.. ; logits for the last token (all_logits=0) into
 * s->logits[0..V), for every token (all_logits=1) into s->logits[t*V..], or none (all_logits<0:
 * a prefill chunk that is not the last). */
static void forward(const Model *m, State *s, const int *tok, int T, int all_logits) {
    const int H = m->dim, I = m->inter, pos0 = s->pos;
    const float eps = (float)m->eps;
    PROF(PF_EMBED, for (int t = 0; t < T; t++) mat_row(&m->embed, tok[t], s->h + (size_t)t * H));
    for (int l = 0; l < m->n_layers; l++) {
        const Layer *L = &m->layers[l];
        LayerState *ls = &s->ls[l];
        if (l == 0) {
            PROF(PF_NORM, for (int t = 0; t < T; t++) rmsnorm(s->xn + (size_t)t * H, s->h + (size_t)t * H, L->in_ln1, H, eps));
        }
        const int P = L->w_in.rows;
        PROF(PF_MM_IN, matmul(&L->w_in, s->xn, H, T, s->proj, P));
        if (L->blend_b) /* the blend rows follow q (2 QD), k and v (2 KV) */
            for (int t = 0; t < T; t++) {
                float *bl = s->proj + (size_t)t * P + 2 * m->q_dim + 2 * m->kv_dim;
                for (int i = 0; i < m->q_dim; i++) bl[i] += L->blend_b[i];
            }
        int O;
        if (L->type == MIX_LINEAR) { mixer_linear(m, L, ls, s, T); O = m->lv_heads * m->lv_dim; }
        else if (L->type == MIX_FULL) { PROF(PF_FULL, mixer_full(m, L, ls, s, T, pos0)); O = m->q_dim; }
        else { mixer_csa(m, L, ls, s, T, pos0); O = m->q_dim; }
        PROF(PF_MM_OUT, matmul(&L->w_out, s->mo, O, T, s->y, H));
        PROF(PF_NORM, residual_norm(m, L->mix_r1, L->mix_s1, s->h, s->y, s->xn, L->post_ln1, T));
        PROF(PF_MM_GU, matmul(&L->w_gu, s->xn, H, T, s->proj, 2 * I));
        PROF(PF_MISC, swiglu_rows(s->proj, I, T));
        PROF(PF_MM_DOWN, matmul(&L->w_down, s->proj, 2 * I, T, s->y, H));
        /* the MLP residual, fused with the next layer's input norm */
        const float *nw = l + 1 < m->n_layers ? m->layers[l + 1].in_ln1 : NULL;
        PROF(PF_NORM, residual_norm(m, L->mlp_r1, L->mlp_s1, s->h, s->y, nw ? s->xn : NULL, nw, T));
    }
    s->pos += T;
    if (all_logits < 0) return;
    const int t0 = all_logits ? 0 : T - 1, nt = T - t0;
    for (int t = t0; t < T; t++) rmsnorm(s->xn + (size_t)(t - t0) * H, s->h + (size_t)t * H, m->final_norm1, H, eps);
    PROF(PF_MM_HEAD, matmul(&m->lm_head, s->xn, H, nt, s->logits, m->vocab));
}

/* feed n tokens in chunks; logits of the last token end in s->logits */
static void prefill(const Model *m, State *s, const int *tok, int n) {
    for (int i = 0; i < n; i += s->chunk) {
        int T = n - i < s->chunk ? n - i : s->chunk;
        forward(m, s, tok + i, T, i + T < n ? -1 : 0);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* tokenizer                                                                                   */
/* ------------------------------------------------------------------------------------------ */
enum { TT_NORMAL = 1, TT_UNKNOWN = 2, TT_CONTROL = 3, TT_USER = 4, TT_UNUSED = 5, TT_BYTE = 6 };
typedef struct {
    int n, max_len, bos, eos, unk, byte0, flags;
    const uint8_t **str;  /* pointers into the file image */
    int *len;
    float *score;
    uint8_t *type;
    int *sorted;          /* ids of mergeable tokens sorted by bytes */
    int n_sorted;
    int n_markers;
    const uint8_t **mk_key, **mk_val;
    int *mk_key_len, *mk_val_len;
    uint8_t *image;
    size_t size;
} Tokenizer;

static const Tokenizer *g_tok_cmp;
static int cmp_bytes(const uint8_t *a, int la, const uint8_t *b, int lb) {
    int n = la < lb ? la : lb, c = memcmp(a, b, (size_t)n);
    return c ? c : (la > lb) - (la < lb);
}
static int cmp_tok(const void *a, const void *b) {
    int x = *(const int *)a, y = *(const int *)b;
    return cmp_bytes(g_tok_cmp->str[x], g_tok_cmp->len[x], g_tok_cmp->str[y], g_tok_cmp->len[y]);
}

static void free_tokenizer(Tokenizer *t) {
    free(t->str); free(t->len); free(t->score); free(t->type); free(t->sorted);
    free(t->mk_key); free(t->mk_val); free(t->mk_key_len); free(t->mk_val_len);
    free(t->image);
    memset(t, 0, sizeof(*t));
}

/* Parse a tokenizer image (takes ownership of img). Returns 0 or -1 with err. */
static int tokenizer_init(Tokenizer *t, uint8_t *img, size_t size, char *err, size_t errn) {
    memset(t, 0, sizeof(*t));
    t->image = img;
    t->size = size;
    if (size < TK_HEADER_SIZE || rd_u32(img) != TK_MAGIC) { set_err(err, errn, "%s: bad tokenizer magic or size %lld", "tokenizer", (long long)size); goto fail; }
    if (rd_u32(img + 4) != TK_VERSION) { set_err(err, errn, "%s: unsupported tokenizer version %lld", "tokenizer", rd_u32(img + 4)); goto fail; }
    if (rd_u32(img + 8) != TK_HEADER_SIZE) { set_err(err, errn, "%s: bad tokenizer header size %lld", "tokenizer", rd_u32(img + 8)); goto fail; }
    t->n = rd_i32(img + 12);
    t->max_len = rd_i32(img + 16);
    t->bos = rd_i32(img + 20);
    t->eos = rd_i32(img + 24);
    t->unk = rd_i32(img + 28);
    t->byte0 = rd_i32(img + 32);
    t->flags = rd_i32(img + 36);
    t->n_markers = rd_i32(img + 40);
    /* every field in range, in 64-bit arithmetic (byte0 + 256 must not wrap), and the counts
     * possible for the file: a piece takes at least 9 bytes, a marker at least 8 */
#define TK_FIELD(name, v, lo, hi)                                                                      \
    do {                                                                                               \
        if ((long long)(v) < (long long)(lo) || (long long)(v) > (long long)(hi)) {                     \
            set_err(err, errn, "tokenizer: header field %s out of range: %lld", name, (long long)(v));  \
            goto fail;                                                                                 \
        }                                                                                              \
    } while (0)
    TK_FIELD("vocab_size", t->n, 1, 1 << 22);
    TK_FIELD("max_piece_length", t->max_len, 1, 65536);
    TK_FIELD("n_markers", t->n_markers, 0, 1024);
    TK_FIELD("bos_id", t->bos, -1, (long long)t->n - 1);
    TK_FIELD("eos_id", t->eos, -1, (long long)t->n - 1);
    TK_FIELD("unk_id", t->unk, -1, (long long)t->n - 1);
    if (t->byte0 != -1) TK_FIELD("byte_fallback_base", t->byte0, 0, (long long)t->n - 256);
    TK_FIELD("flags", t->flags, 0, TK_FLAGS_ALL);
#undef TK_FIELD
    if ((uint64_t)TK_HEADER_SIZE + 9u * (uint64_t)t->n + 8u * (uint64_t)t->n_markers > (uint64_t)size) {
        set_err(err, errn, "%s: file too small (%lld bytes) for its vocab_size and marker count", "tokenizer",
                (long long)size);
        goto fail;
    }
    t->str = (const uint8_t **)calloc((size_t)t->n, sizeof(*t->str));
    t->len = (int *)calloc((size_t)t->n, sizeof(int));
    t->score = (float *)calloc((size_t)t->n, sizeof(float));
    t->type = (uint8_t *)calloc((size_t)t->n, 1);
    t->sorted = (int *)calloc((size_t)t->n, sizeof(int));
    t->mk_key = (const uint8_t **)calloc((size_t)t->n_markers + 1, sizeof(*t->mk_key));
    t->mk_val = (const uint8_t **)calloc((size_t)t->n_markers + 1, sizeof(*t->mk_val));
    t->mk_key_len = (int *)calloc((size_t)t->n_markers + 1, sizeof(int));
    t->mk_val_len = (int *)calloc((size_t)t->n_markers + 1, sizeof(int));
    if (!t->str || !t->len || !t->score || !t->type || !t->sorted || !t->mk_key || !t->mk_val || !t->mk_key_len || !t->mk_val_len) {
        set_err(err, errn, "%s: out of memory%lld", "tokenizer", 0);
        goto fail;
    }
    size_t off = TK_HEADER_SIZE;
    for (int i = 0; i < t->n; i++) {
        if (size - off < 9) { set_err(err, errn, "%s: truncated at token %lld", "tokenizer", i); goto fail; }
        t->score[i] = rd_f32(img + off);
        uint32_t len = rd_u32(img + off + 4);
        t->type[i] = img[off + 8];
        off += 9;
        if (len > (uint32_t)t->max_len || len > size - off) { set_err(err, errn, "%s: bad length for token %lld", "tokenizer", i); goto fail; }
        t->str[i] = img + off;
        t->len[i] = (int)len;
        off += len;
        if ((t->type[i] == TT_NORMAL || t->type[i] == TT_USER) && len > 0) t->sorted[t->n_sorted++] = i;
    }
    for (int i = 0; i < t->n_markers; i++) {
        for (int kv = 0; kv < 2; kv++) {
            if (size - off < 4) { set_err(err, errn, "%s: truncated marker %lld", "tokenizer", i); goto fail; }
            uint32_t len = rd_u32(img + off);
            off += 4;
            if (len > size - off || len > 65536) { set_err(err, errn, "%s: bad marker length %lld", "tokenizer", i); goto fail; }
            if (kv == 0) { t->mk_key[i] = img + off; t->mk_key_len[i] = (int)len; }
            else { t->mk_val[i] = img + off; t->mk_val_len[i] = (int)len; }
            off += len;
        }
    }
    if (off != size) { set_err(err, errn, "%s: %lld trailing bytes", "tokenizer", (long long)(size - off)); goto fail; }
    g_tok_cmp = t;
    qsort(t->sorted, (size_t)t->n_sorted, sizeof(int), cmp_tok);
    return 0;
fail:
    free_tokenizer(t);
    return -1;
}

static int tok_lookup(const Tokenizer *t, const uint8_t *s, int len) {
    int lo = 0, hi = t->n_sorted - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2, id = t->sorted[mid];
        int c = cmp_bytes(t->str[id], t->len[id], s, len);
        if (c == 0) return id;
        if (c < 0) lo = mid + 1; else hi = mid - 1;
    }
    return -1;
}

static const char *tok_marker(const Tokenizer *t, const char *key, int *len) {
    for (int i = 0; i < t->n_markers; i++)
        if ((size_t)t->mk_key_len[i] == strlen(key) && !memcmp(t->mk_key[i], key, strlen(key))) {
            *len = t->mk_val_len[i];
            return (const char *)t->mk_val[i];
        }
    return NULL;
}

/* U+FDD0 (UTF-8 EF B7 90), the noncharacter llamathink.chat_format.TEXT_GUARD: the chat template writes it
 * after every "<" of message content and the guarded tokenizer's normalizer deletes it */
static inline int is_text_guard(const char *s, size_t i, size_t n) {
    return i + 3 <= n && (uint8_t)s[i] == 0xEF && (uint8_t)s[i + 1] == 0xB7 && (uint8_t)s[i + 2] == 0x90;
}
static int has_text_guard(const char *s, size_t n) { return memmem(s, n, "\xef\xb7\x90", 3) != NULL; }

/* Offset of the first byte that is not well-formed UTF-8 (Unicode 15, table 3-7: no overlong forms, no
 * surrogates, nothing above U+10FFFF), or -1 when all of s[0..n) is. Python decodes such bytes to lone
 * surrogates (surrogateescape), which llamathink.chat_format refuses; chat messages are refused here alike. */
static long long utf8_invalid_at(const char *str, size_t n) {
    const uint8_t *s = (const uint8_t *)str;
    for (size_t i = 0; i < n;) {
        const uint8_t c = s[i];
        size_t k;
        uint8_t lo = 0x80, hi = 0xBF; /* allowed range of the second byte */
        if (c < 0x80) { i++; continue; }
        if (c >= 0xC2 && c <= 0xDF) k = 1;
        else if (c >= 0xE0 && c <= 0xEF) { k = 2; if (c == 0xE0) lo = 0xA0; else if (c == 0xED) hi = 0x9F; }
        else if (c >= 0xF0 && c <= 0xF4) { k = 3; if (c == 0xF0) lo = 0x90; else if (c == 0xF4) hi = 0x8F; }
        else return (long long)i;
        if (i + k >= n) return (long long)i; /* cut short at the end */
        if (s[i + 1] < lo || s[i + 1] > hi) return (long long)i;
        for (size_t j = 2; j <= k; j++) if ((s[i + j] & 0xC0) != 0x80) return (long long)i;
        i += k + 1;
    }
    return -1;
}

/* BPE merge queue entry: adjacent symbols l, r (indices of their first character) whose
 * concatenation is piece id with score sc; vl, vr: the symbols' versions when it was queued.
 * A merge changes its left symbol (version + 1) and removes its right one, so an entry whose
 * symbols changed since is stale and skipped when popped (lazy invalidation). */
typedef struct { float sc; int l, r, id; unsigned vl, vr; } BpePair;

/* queue order: higher score first, then the leftmost pair */
static inline int bpe_before(const BpePair *a, const BpePair *b) {
    return a->sc > b->sc || (a->sc == b->sc && a->l < b->l);
}
static void bpe_push(BpePair *h, int *nh, BpePair e) {
    int i = (*nh)++;
    while (i > 0) {
        int p = (i - 1) / 2;
        if (!bpe_before(&e, &h[p])) break;
        h[i] = h[p];
        i = p;
    }
    h[i] = e;
}
static BpePair bpe_pop(BpePair *h, int *nh) {
    BpePair top = h[0], last = h[--*nh];
    int i = 0, n = *nh;
    if (!n) return top;
    for (;;) {
        int c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && bpe_before(&h[c + 1], &h[c])) c++;
        if (!bpe_before(&h[c], &last)) break;
        h[i] = h[c];
        i = c;
    }
    h[i] = last;
    return top;
}
/* queue the pair (l, r) if their concatenation is a mergeable piece (byte pieces never merge) */
static void bpe_try(const Tokenizer *t, const int *ids, const unsigned *ver, int l, int r, uint8_t *buf,
                    BpePair *h, int *nh) {
    const int a = ids[l], b = ids[r], la = t->len[a], lb = t->len[b];
    if (t->type[a] == TT_BYTE || t->type[b] == TT_BYTE || la + lb > t->max_len) return;
    memcpy(buf, t->str[a], (size_t)la);
    memcpy(buf + la, t->str[b], (size_t)lb);
    const int id = tok_lookup(t, buf, la + lb);
    if (id >= 0 && t->score[id] > -1e29f) {
        BpePair e = {t->score[id], l, r, id, ver[l], ver[r]};
        bpe_push(h, nh, e);
    }
}

/* Encode text (HF Llama semantics: "\xe2\x96\x81" for spaces, a dummy prefix unless the text
 * already starts with a space or U+2581 (flag 4), per-character lookup with byte fallback, then BPE merges by
 * highest score, leftmost first). The merges use a binary heap of adjacent pairs over a doubly
 * linked list of symbols, as SentencePiece's bpe_model.cc does: O(n log n) in the text length
 * (n symbols: at most n - 1 merges, each popping and pushing O(1) heap entries), with exactly the
 * result of the plain "rescan for the best pair" loop. Writes at most cap ids to out and returns
 * their number, or -1 when out of memory or the text is longer than INT_MAX / 4 bytes. */
static int encode(const Tokenizer *t, const char *text, size_t tlen, int add_bos, int *out, int cap) {
    int n = 0;
    if (tlen > (size_t)INT32_MAX / 4) return -1;
    if (add_bos && t->bos >= 0 && n < cap) out[n++] = t->bos;
    /* flag 8: U+FDD0 is deleted before every other rule (HF runs that Replace step first), so the
     * prefix rule and "empty text" look at the text without it */
    const int drop_guard = (t->flags & TK_FLAG_DROP_TEXT_GUARD) != 0;
    size_t i0 = 0;
    while (drop_guard && is_text_guard(text, i0, tlen)) i0 += 3;
    if (i0 == tlen) return n;
    /* normalise */
    uint8_t *norm = (uint8_t *)malloc(tlen * 3 + 4);
    if (!norm) return -1;
    size_t p = 0;
    /* flag 4, HF's Metaspace: it sees spaces as U+2581 already, so a text starting with a literal U+2581 gets
     * no prefix either; flag 16: nor does one whose first characters the guard deleted (i0 > 0) */
    const int starts_spaced = text[i0] == ' ' || (tlen - i0 >= 3 && !memcmp(text + i0, "\xe2\x96\x81", 3));
    const int no_prefix = ((t->flags & 4) && starts_spaced) || ((t->flags & TK_FLAG_PREFIX_AT_OFFSET_0) && i0 > 0);
    if ((t->flags & 1) && !no_prefix) { memcpy(norm, "\xe2\x96\x81", 3); p = 3; }
    for (size_t i = i0; i < tlen; i++) {
        if (drop_guard && is_text_guard(text, i, tlen)) i += 2;
        else if (text[i] == ' ') { memcpy(norm + p, "\xe2\x96\x81", 3); p += 3; }
        else norm[p++] = (uint8_t)text[i];
    }
    /* symbols (at most one per byte): id, list links, version */
    int *ids = (int *)malloc(sizeof(int) * (p + 1));
    int *prv = (int *)malloc(sizeof(int) * (p + 1));
    int *nxt = (int *)malloc(sizeof(int) * (p + 1));
    unsigned *ver = (unsigned *)calloc(p + 1, sizeof(unsigned));
    BpePair *heap = (BpePair *)malloc(sizeof(BpePair) * (3 * p + 4)); /* ns - 1 pairs + 2 per merge */
    uint8_t *buf = (uint8_t *)malloc((size_t)2 * t->max_len + 8);
    int ns = 0, nh = 0, rc = -1;
    if (!ids || !prv || !nxt || !ver || !heap || !buf) goto done;
    for (size_t i = 0; i < p;) {
        size_t cl = 1;
        uint8_t c0 = norm[i];
        if (c0 >= 0xF0) cl = 4; else if (c0 >= 0xE0) cl = 3; else if (c0 >= 0xC0) cl = 2;
        if (i + cl > p) cl = p - i;
        for (size_t j = 1; j < cl; j++) if ((norm[i + j] & 0xC0) != 0x80) { cl = j; break; }
        int id = tok_lookup(t, norm + i, (int)cl);
        if (id >= 0) ids[ns++] = id;
        else if (t->byte0 >= 0) for (size_t j = 0; j < cl; j++) ids[ns++] = t->byte0 + norm[i + j];
        else if (t->unk >= 0) ids[ns++] = t->unk;
        i += cl;
    }
    for (int i = 0; i < ns; i++) { prv[i] = i - 1; nxt[i] = i + 1 < ns ? i + 1 : -1; }
    for (int i = 0; i + 1 < ns; i++) bpe_try(t, ids, ver, i, i + 1, buf, heap, &nh);
    while (nh) {
        const BpePair e = bpe_pop(heap, &nh);
        if (nxt[e.l] != e.r || ver[e.l] != e.vl || ver[e.r] != e.vr) continue; /* stale */
        ids[e.l] = e.id;
        ver[e.l]++;
        ver[e.r]++;
        nxt[e.l] = nxt[e.r];
        if (nxt[e.r] >= 0) prv[nxt[e.r]] = e.l;
        nxt[e.r] = -2; /* removed: never matches a queued pair again */
        if (prv[e.l] >= 0) bpe_try(t, ids, ver, prv[e.l], e.l, buf, heap, &nh);
        if (nxt[e.l] >= 0) bpe_try(t, ids, ver, e.l, nxt[e.l], buf, heap, &nh);
    }
    /* symbol 0 is never removed (a merge keeps its left symbol) */
    for (int i = ns ? 0 : -1; i >= 0 && n < cap; i = nxt[i]) out[n++] = ids[i];
    rc = n;
done:
    free(norm); free(ids); free(prv); free(nxt); free(ver); free(heap); free(buf);
    return rc;
}

/* the text of token id into out (room for t->max_len bytes; the text is never longer than the
 * piece); *first: strip one leading space from the first printed piece. Returns its length. */
static int piece_bytes(const Tokenizer *t, int id, int *first, char *out) {
    if (id < 0 || id >= t->n) return 0;
    int ty = t->type[id], k = 0;
    if (ty == TT_CONTROL || ty == TT_UNKNOWN || ty == TT_UNUSED) return 0;
    if (ty == TT_BYTE) { out[0] = (char)(t->byte0 >= 0 ? id - t->byte0 : '?'); *first = 0; return 1; }
    const uint8_t *s = t->str[id];
    int len = t->len[id];
    for (int i = 0; i < len; i++) {
        if (i + 2 < len && s[i] == 0xE2 && s[i + 1] == 0x96 && s[i + 2] == 0x81) {
            if (!(*first && (t->flags & 1))) out[k++] = ' ';
            i += 2;
        } else {
            out[k++] = (char)s[i];
        }
        *first = 0;
    }
    return k;
}

/* write the text of token id; *first: strip one leading space from the first printed piece */
static void decode_piece(const Tokenizer *t, int id, int *first, FILE *f) {
    char sbuf[256], *b = t->max_len <= (int)sizeof sbuf ? sbuf : (char *)malloc((size_t)t->max_len);
    if (!b) return;
    int k = piece_bytes(t, id, first, b);
    if (k) fwrite(b, 1, (size_t)k, f);
    if (b != sbuf) free(b);
}

/* ------------------------------------------------------------------------------------------ */
/* sampling                                                                                    */
/* ------------------------------------------------------------------------------------------ */
static uint64_t g_rng = 0x853c49e6748fea9bULL;
static uint32_t rng_u32(void) {
    g_rng ^= g_rng >> 12; g_rng ^= g_rng << 25; g_rng ^= g_rng >> 27;
    return (uint32_t)((g_rng * 0x2545F4914F6CDD1DULL) >> 32);
}
static float rng_f32(void) { return (rng_u32() >> 8) / 16777216.0f; }

typedef struct { float p; int i; } ProbIdx;
#define NONFINITE_MSG "the model produced a NaN or infinite logit (non-finite weights in model.bin, or weights so large that a hidden state overflows float32?)"
static int cmp_prob(const void *a, const void *b) {
    float x = ((const ProbIdx *)a)->p, y = ((const ProbIdx *)b)->p;
    return (x < y) - (x > y);
}

static int argmax(const float *x, int n) {
    int b = 0;
    for (int i = 1; i < n; i++) if (x[i] > x[b]) b = i;
    return b;
}

/* The next token id, or -1 when a logit is NaN or infinite (NaN / inf weights in model.bin: any
 * choice would be a silent wrong answer). */
static int sample(float *logits, int n, float temp, int top_k, float top_p, ProbIdx *pi) {
    for (int i = 0; i < n; i++) if (!isfinite(logits[i])) return -1;
    if (temp <= 0.0f) return argmax(logits, n);
    float mx = -INFINITY;
    for (int i = 0; i < n; i++) if (logits[i] > mx) mx = logits[i];
    double sum = 0;
    for (int i = 0; i < n; i++) { logits[i] = expf((logits[i] - mx) / temp); sum += logits[i]; }
    int m = 0;
    for (int i = 0; i < n; i++) { pi[m].p = (float)(logits[i] / sum); pi[m].i = i; m++; }
    /* top-p keeps at least the most probable token (as transformers' TopPLogitsWarper), so -p 0 is the
     * limit of small p (greedy-like), not "off"; only p = 1 turns it off */
    if ((top_k > 0 && top_k < n) || top_p < 1.0f) {
        qsort(pi, (size_t)m, sizeof(ProbIdx), cmp_prob);
        if (top_k > 0 && top_k < m) m = top_k;
        if (top_p < 1.0f) {
            double c = 0;
            int k = 0;
            for (; k < m; k++) { c += pi[k].p; if (c >= top_p) { k++; break; } }
            m = k < m ? k : m;
        }
    }
    double tot = 0;
    for (int i = 0; i < m; i++) tot += pi[i].p;
    double r = rng_f32() * tot, c = 0;
    for (int i = 0; i < m; i++) { c += pi[i].p; if (r < c) return pi[i].i; }
    return pi[m - 1].i;
}

/* ------------------------------------------------------------------------------------------ */
/* main                                                                                        */
/* ------------------------------------------------------------------------------------------ */
static void usage(void) {
    fprintf(stderr,
        "usage: run model.bin [options]\n"
        "  -m MODE          generate (default) | chat | encode | decode | logits\n"
        "  -i TEXT          prompt text (needs -z); in encode mode the text to encode\n"
        "  -z FILE          tokenizer.bin\n"
        "  --ids \"1 2 3\"    prompt as token ids (no tokenizer needed); decode mode: ids to decode\n"
        "  -n N             tokens to generate (default 256)\n"
        "  -t T             temperature (default 1.0; 0 = greedy)\n"
        "  -k K             top-k (default 0 = off)\n"
        "  -p P             top-p (default 0.9; 1 = off; 0 = the most likely token only)\n"
        "  -s SEED          random seed (default: time)\n"
        "  -T THREADS       OpenMP threads (default: OMP_NUM_THREADS or all cores)\n"
        "  --chunk N        prefill chunk size (default 256; 1 = token by token)\n"
        "  --no-bos         do not prepend BOS to a text prompt\n"
        "  --ignore-eos     keep generating after EOS (chat: EOS becomes part of the reply)\n"
        "  --print-ids      print generated token ids (one line) instead of text\n"
        "  -y TEXT          chat mode: system prompt\n"
        "  --print-prompt-ids  chat mode: print each turn's prompt ids (BOS .. assistant prefix) to stderr\n"
        "  --logits-for \"ids\" --logits-out FILE   write float32 logits [n_ids, vocab] for every position\n"
        "  --stats          print prefill / decode speed to stderr\n"
        "The prompt is kept whole and -n shrinks to what the context (max_position_embeddings) leaves\n"
        "after it; a prompt of max_position_embeddings tokens or more is refused. Generation stops at\n"
        "any of the model's EOS ids. Numbers must be whole and in range (-n 0..2^31-1, -t 0..1e6,\n"
        "-p 0..1, -k >= 0, -T 0..1024, --chunk 1..2^20); texts are limited to 16 MiB. Each mode takes only\n"
        "the options it reads (encode: -i -z --no-bos; decode: --ids -z; logits: --logits-for --logits-out\n"
        "--chunk -T -z; -y and --print-prompt-ids are chat's, --stats and --no-bos generate's); any other\n"
        "is an error.\n"
        "Chat (-m chat -z tokenizer.bin): the llamathink-chat template; -i TEXT answers one message\n"
        "('-' reads it from stdin) and exits, without -i lines are read from stdin until EOF or /exit.\n"
        "The oldest exchanges are dropped when the history outgrows the context window. Ctrl-C stops\n"
        "the reply being written (the turn keeps it as far as it got); at the prompt it quits.\n");
}

/* Strict option numbers: the whole string must be one number (leading / trailing blanks allowed,
 * nothing else), inside [lo, hi]; otherwise a message naming the option and the range is printed
 * and -1 returned. */
static int parse_long_opt(const char *opt, const char *v, long long lo, long long hi, long long *out) {
    char *e;
    errno = 0;
    long long x = strtoll(v, &e, 10);
    while (e != v && (*e == ' ' || *e == '\t' || *e == '\n')) e++;
    if (e == v || *e || errno == ERANGE || x < lo || x > hi) {
        fprintf(stderr, "error: %s must be an integer between %lld and %lld (got '%s')\n", opt, lo, hi, v);
        return -1;
    }
    *out = x;
    return 0;
}
static int parse_int_opt(const char *opt, const char *v, int lo, int hi, int *out) {
    long long x;
    if (parse_long_opt(opt, v, lo, hi, &x)) return -1;
    *out = (int)x;
    return 0;
}
static int parse_float_opt(const char *opt, const char *v, double lo, double hi, float *out) {
    char *e;
    errno = 0;
    double x = strtod(v, &e);
    while (e != v && (*e == ' ' || *e == '\t' || *e == '\n')) e++;
    /* ERANGE on underflow (1e-400) leaves a number that is still in range: only overflow is refused */
    if (e == v || *e || (errno == ERANGE && fabs(x) == HUGE_VAL) || !(x >= lo && x <= hi)) { /* !(..): NaN */
        fprintf(stderr, "error: %s must be a number between %g and %g (got '%s')\n", opt, lo, hi, v);
        return -1;
    }
    *out = (float)x;
    return 0;
}

/* Token ids separated by blanks or commas; NULL on anything else (a non-number, trailing
 * characters, a value outside int) or when out of memory. */
static int *parse_ids(const char *s, int *n) {
    int cap = 16, k = 0;
    int *v = (int *)malloc(sizeof(int) * cap);
    if (!v) return NULL;
    const char *p = s;
    while (*p) {
        while (*p == ' ' || *p == ',' || *p == '\t' || *p == '\n') p++;
        if (!*p) break;
        char *e;
        errno = 0;
        long long x = strtoll(p, &e, 10);
        if (e == p || errno == ERANGE || x < INT32_MIN || x > INT32_MAX ||
            (*e && *e != ' ' && *e != ',' && *e != '\t' && *e != '\n')) { free(v); return NULL; }
        if (k == cap) { if (cap > INT32_MAX / 4) { free(v); return NULL; } cap *= 2; int *nv = (int *)realloc(v, sizeof(int) * cap); if (!nv) { free(v); return NULL; } v = nv; }
        v[k++] = (int)x;
        p = e;
    }
    *n = k;
    return v;
}

/* A regular file's bytes (+ one spare byte); NULL with errno set otherwise (EISDIR for a directory,
 * EINVAL for a pipe or device, whose size is not known in advance). */
static uint8_t *read_file(const char *path, size_t *size) {
    /* opened without blocking: a FIFO given as the file would otherwise wait for a writer forever (refused
     * below as not a regular file) */
    int fd = open(path, O_RDONLY | O_NONBLOCK);
    if (fd < 0) return NULL;
    FILE *f = fdopen(fd, "rb");
    if (!f) { int e = errno; close(fd); errno = e; return NULL; }
    struct stat st;
    if (fstat(fileno(f), &st) != 0) { int e = errno; fclose(f); errno = e; return NULL; }
    if (!S_ISREG(st.st_mode)) { fclose(f); errno = S_ISDIR(st.st_mode) ? EISDIR : EINVAL; return NULL; }
    if (fseek(f, 0, SEEK_END) != 0) { fclose(f); return NULL; }
    long n = ftell(f);
    if (n < 0) { fclose(f); return NULL; }
    rewind(f);
    uint8_t *b = (uint8_t *)malloc((size_t)n + 1);
    if (b && fread(b, 1, (size_t)n, f) != (size_t)n) { free(b); b = NULL; }
    fclose(f);
    *size = (size_t)n;
    return b;
}

#ifndef LT_NO_MAIN
/* 1 when everything written to stdout reached it; else a message (a full disk or a closed stdout
 * must not pass for a finished run) and 0 */
static int stdout_ok(void) {
    errno = 0;
    if (fflush(stdout) == 0 && !ferror(stdout)) return 1;
    fprintf(stderr, "error: writing the output failed: %s\n", errno ? strerror(errno) : "stream error");
    return 0;
}

/* 1 when path and other (may be NULL) name one existing file: the same device and inode */
static int same_file(const char *path, const char *other) {
    struct stat a, b;
    return other && stat(path, &a) == 0 && stat(other, &b) == 0 && a.st_dev == b.st_dev && a.st_ino == b.st_ino;
}

/* delete a half-written output file (no truncated file left that looks like a result); only a regular
 * file: --logits-out may name a device */
static void remove_regular(const char *path) {
    struct stat st;
    if (stat(path, &st) == 0 && S_ISREG(st.st_mode)) remove(path);
}

static int check_ids(const Model *m, const int *ids, int n) {
    for (int i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= m->vocab) { fprintf(stderr, "error: token id %d out of range [0, %d)\n", ids[i], m->vocab); return -1; }
    return 0;
}

#if defined(_OPENMP) && defined(__linux__)
/* OpenMP teams spin at barriers by default: best on an idle machine, but when other processes
 * keep the cores busy a spinning thread burns the time slice its partner needs and decode gets
 * 10-30x slower.  libgomp reads its wait policy once at start-up, so when neither
 * OMP_WAIT_POLICY nor GOMP_SPINCOUNT is set and the load average says the cores are busy, the
 * program re-executes itself once with OMP_WAIT_POLICY=passive (LT_NO_REEXEC=1 disables this). */
static void maybe_reexec_passive(char **argv) {
    if (getenv("OMP_WAIT_POLICY") || getenv("GOMP_SPINCOUNT") || getenv("LT_NO_REEXEC")) return;
    FILE *f = fopen("/proc/loadavg", "r");
    double load = 0;
    if (!f) return;
    int ok = fscanf(f, "%lf", &load) == 1;
    fclose(f);
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    if (!ok || ncpu < 1 || load < (double)ncpu - 0.5) return;
    setenv("OMP_WAIT_POLICY", "passive", 1);
    setenv("LT_NO_REEXEC", "1", 1);
    execv("/proc/self/exe", argv); /* returns only on failure: carry on as we are */
}
#endif

/* ------------------------------------------------------------------------------------------ */
/* chat mode: the LlamaThink chat template (llamathink/chat_format.py, see export_c/README.md)        */
/* ------------------------------------------------------------------------------------------ */
/* The conversation is rendered exactly as tokenizer.apply_chat_template(messages,
 * add_generation_prompt=True) does it:
 *   BOS  [system_prefix + system + system_suffix] user_prefix + text + user_suffix + assistant_prefix
 *        (one string, encoded with the dummy prefix, no BOS)  reply tokens  EOS
 *        user_prefix + text + user_suffix + assistant_prefix  reply tokens  EOS  ...
 * Contents are stripped like Python's str.strip(). The reply tokens are kept as sampled. When
 * the history no longer fits the context window minus the room kept for the reply, the oldest
 * exchanges are dropped (the system prompt stays) and the kept ones are fed again from BOS.
 * Markers come from tokenizer.bin; a file with none gets LlamaThink's (llamathink.chat_format.CHAT_MARKERS). */
enum { MK_SYS_PRE, MK_SYS_SUF, MK_USER_PRE, MK_USER_SUF, MK_ASST_PRE, MK_COUNT };
static const char *const CHAT_KEYS[MK_COUNT] = {"system_prefix", "system_suffix", "user_prefix",
                                                 "user_suffix", "assistant_prefix"};
static const char *const CHAT_DEFAULTS[MK_COUNT] = {"### System:\n", "\n\n", "### User:\n", "\n\n",
                                                     "### Assistant:\n"};

/* length of the Python str.isspace() character starting at s[i] (UTF-8), 0 if none */
static int ws_at(const unsigned char *s, size_t i, size_t n) {
    unsigned char c = s[i];
    if (c == ' ' || (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x1F)) return 1;
    if (c == 0xC2 && i + 1 < n && (s[i + 1] == 0x85 || s[i + 1] == 0xA0)) return 2;
    if (i + 2 < n) {
        unsigned char d = s[i + 1], e = s[i + 2];
        if (c == 0xE1 && d == 0x9A && e == 0x80) return 3;                                  /* U+1680 */
        if (c == 0xE2 && d == 0x80 && ((e >= 0x80 && e <= 0x8A) || e == 0xA8 || e == 0xA9 || e == 0xAF))
            return 3;                                                 /* U+2000-200A, 2028, 2029, 202F */
        if (c == 0xE2 && d == 0x81 && e == 0x9F) return 3;                                  /* U+205F */
        if (c == 0xE3 && d == 0x80 && e == 0x80) return 3;                                  /* U+3000 */
    }
    return 0;
}
/* length of the whitespace character ending just before s[j] (not before s[lo]), 0 if none */
static int ws_before(const unsigned char *s, size_t lo, size_t j) {
    for (int k = 1; k <= 3; k++)
        if (j >= lo + (size_t)k && ws_at(s, j - k, j) == k) return k;
    return 0;
}
/* [*a, *b): s[0..n) without leading and trailing whitespace (str.strip) */
static void strip_span(const char *str, size_t n, size_t *a, size_t *b) {
    const unsigned char *s = (const unsigned char *)str;
    size_t i = 0, j = n;
    int k;
    while (i < j && (k = ws_at(s, i, j))) i += (size_t)k;
    while (j > i && (k = ws_before(s, i, j))) j -= (size_t)k;
    *a = i;
    *b = j;
}
static char *strip_dup(const char *s) {
    size_t a, b;
    strip_span(s, strlen(s), &a, &b);
    char *o = (char *)malloc(b - a + 1);
    if (!o) return NULL;
    memcpy(o, s + a, b - a);
    o[b - a] = 0;
    return o;
}

/* How many ids are sampled from where a tokenizer is loaded (-z): a model vocabulary larger than the tokenizer's
 * (a padded embedding table) has ids without a piece, which would print as nothing; they are left out, with a
 * note (llamathink-chat suppresses the same ids). */
static int text_vocab(const Model *m, const Tokenizer *tk) {
    if (tk->n >= m->vocab) return m->vocab;
    fprintf(stderr, "note: the model's vocabulary has %d ids past the tokenizer's %d; they have no text and are "
            "never sampled\n", m->vocab - tk->n, tk->n);
    return tk->n;
}

/* Streams a reply the way llamathink-chat prints it: the decoded text without leading and
 * trailing whitespace, written as it grows (trailing whitespace and an incomplete UTF-8
 * character are held back until more text follows). */
typedef struct { char *buf; size_t n, cap, printed; } ReplyOut;

static int reply_add(ReplyOut *r, const char *p, size_t k) {
    if (r->n + k > r->cap) {
        size_t cap = (r->cap ? r->cap * 2 : 256) + k;
        char *nb = (char *)realloc(r->buf, cap);
        if (!nb) return -1;
        r->buf = nb;
        r->cap = cap;
    }
    memcpy(r->buf + r->n, p, k);
    r->n += k;
    return 0;
}
static void reply_flush(ReplyOut *r, int final, FILE *f) {
    size_t end = r->n;
    if (!final && end) {
        size_t i = end;
        while (i > 0 && end - i < 3 && ((unsigned char)r->buf[i - 1] & 0xC0) == 0x80) i--;
        if (i > 0) {
            unsigned char c = (unsigned char)r->buf[i - 1];
            size_t need = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
            if (need > end - (i - 1)) end = i - 1;
        }
    }
    size_t a, b;
    strip_span(r->buf ? r->buf : "", end, &a, &b);
    if (b <= a) return;
    if (r->printed < a) r->printed = a;
    if (b > r->printed) {
        fwrite(r->buf + r->printed, 1, b - r->printed, f);
        r->printed = b;
    }
    fflush(f);
}

typedef struct {
    char *text;           /* the user message, stripped */
    int *ids, n_ids;      /* user_prefix + text + user_suffix + assistant_prefix, encoded */
    int *reply, n_reply;  /* the sampled reply (without its EOS) */
} ChatTurn;

typedef struct {
    const Model *m;
    State *s;
    const Tokenizer *tk;
    ProbIdx *pi;
    const char *mk[MK_COUNT];
    int mk_len[MK_COUNT];
    char *system;                    /* stripped system prompt, NULL if none */
    ChatTurn *turns;
    int n_turns, cap_turns, first;   /* the history is turns[first..n_turns) */
    int *ctx, n_ctx;                 /* the conversation's tokens; s->pos of them are in the state */
    int bos, eos, steps, top_k, print_ids, print_prompt_ids, ignore_eos;
    int n_sample;                    /* ids sampled from: those the tokenizer has text for (text_vocab) */
    float temp, top_p;
} Chat;

/* Ctrl-C in interactive chat: during a reply it stops that reply (the turn keeps what was
 * generated); at the prompt, or a second time before the reply has stopped, it ends the program
 * (exit 0). Only flags are set here; the loops poll them. */
static volatile sig_atomic_t g_in_reply, g_stop_reply, g_quit;
static void on_sigint(int sig) {
    (void)sig;
    if (g_in_reply && !g_stop_reply) g_stop_reply = 1;
    else if (!g_quit) g_quit = 1;
    else _exit(130); /* a third Ctrl-C while something does not notice: leave now */
}

static void chat_free(Chat *c) {
    for (int i = 0; i < c->n_turns; i++) { free(c->turns[i].text); free(c->turns[i].ids); free(c->turns[i].reply); }
    free(c->turns);
    free(c->ctx);
    free(c->system);
}

/* encode [system block +] user_prefix + text + user_suffix + assistant_prefix as one string
 * (dummy prefix as usual, no BOS); returns malloc'd ids (NULL: out of memory) */
static int *chat_encode(const Chat *c, int with_system, const char *text, int *n) {
    const char *parts[6];
    size_t lens[6];
    int np = 0;
    if (with_system && c->system) {
        parts[np] = c->mk[MK_SYS_PRE]; lens[np++] = (size_t)c->mk_len[MK_SYS_PRE];
        parts[np] = c->system; lens[np++] = strlen(c->system);
        parts[np] = c->mk[MK_SYS_SUF]; lens[np++] = (size_t)c->mk_len[MK_SYS_SUF];
    }
    parts[np] = c->mk[MK_USER_PRE]; lens[np++] = (size_t)c->mk_len[MK_USER_PRE];
    parts[np] = text; lens[np++] = strlen(text);
    parts[np] = c->mk[MK_USER_SUF]; lens[np++] = (size_t)c->mk_len[MK_USER_SUF];
    size_t L = 0;
    for (int i = 0; i < np; i++) L += lens[i];
    L += (size_t)c->mk_len[MK_ASST_PRE];
    char *str = (char *)malloc(L + 1);
    int *ids = (int *)malloc(sizeof(int) * (3 * L + 8)); /* a space may fall back to 3 byte pieces */
    if (!str || !ids) { free(str); free(ids); return NULL; }
    size_t p = 0;
    for (int i = 0; i < np; i++) { memcpy(str + p, parts[i], lens[i]); p += lens[i]; }
    memcpy(str + p, c->mk[MK_ASST_PRE], (size_t)c->mk_len[MK_ASST_PRE]);
    p += (size_t)c->mk_len[MK_ASST_PRE];
    *n = encode(c->tk, str, p, 0, ids, (int)(3 * L + 8));
    free(str);
    if (*n < 0) { free(ids); return NULL; }
    return ids;
}

/* zero the recurrent state and caches and go back to position 0 */
static void state_reset(State *s, const Model *m) {
    const int C = m->lin_c, KV = m->kv_dim;
    const int nblk = m->max_pos / m->csa_stride + 1;
    for (int l = 0; l < m->n_layers; l++) {
        LayerState *L = &s->ls[l];
        if (m->types[l] == MIX_LINEAR) {
            memset(L->conv, 0, sizeof(float) * (size_t)(m->conv_k - 1) * C);
            memset(L->S, 0, sizeof(float) * (size_t)m->lv_heads * m->lk_dim * m->lv_dim);
        } else if (m->types[l] == MIX_FULL) {
            memset(L->k, 0, sizeof(float) * (size_t)m->max_pos * KV);
            memset(L->v, 0, sizeof(float) * (size_t)m->max_pos * KV);
        } else {
            memset(L->k, 0, sizeof(float) * (size_t)s->ring * KV);
            memset(L->v, 0, sizeof(float) * (size_t)s->ring * KV);
            memset(L->kc, 0, sizeof(float) * (size_t)nblk * KV);
            memset(L->vc, 0, sizeof(float) * (size_t)nblk * KV);
            memset(L->pk, 0, sizeof(float) * (size_t)m->csa_stride * KV);
            memset(L->pv, 0, sizeof(float) * (size_t)m->csa_stride * KV);
        }
        L->n_part = 0;
        L->n_blocks = 0;
    }
    s->pos = 0;
}

/* One exchange: add the user message, trim the history, feed, stream the reply.
 * Returns 0, 1 when the message is refused (nothing is kept; the reason is in err): it contains
 * U+FDD0 or does not fit the context window even alone, or -1 on a fatal error (printed). */
static int chat_turn(Chat *c, const char *text, char *err, size_t errn) {
    const Model *m = c->m;
    State *s = c->s;
    const int has_bos = c->bos >= 0, has_eos = c->eos >= 0;
    int n_new = 0, n_first = 0, f;
    if (has_text_guard(text, strlen(text))) { /* as llamathink.chat refuses it */
        snprintf(err, errn, "message contains U+FDD0 (a reserved noncharacter: the chat template uses it to keep "
                 "content from forming special tokens); remove it");
        return 1;
    }
    const long long bad = utf8_invalid_at(text, strlen(text));
    if (bad >= 0) { /* as llamathink.chat refuses the lone surrogates Python decodes such bytes to */
        snprintf(err, errn, "message is not valid UTF-8 (byte 0x%02X at offset %lld); nothing was kept",
                 (unsigned)(uint8_t)text[bad], bad);
        return 1;
    }
    int *new_ids = chat_encode(c, 0, text, &n_new), *first_ids = NULL;
    if (!new_ids) { fprintf(stderr, "error: out of memory\n"); return -1; }
    /* room kept for the reply: -n, at most half the window (llamathink.chat.ChatSession.reserve) */
    int reserve = c->steps < m->max_pos / 2 ? c->steps : m->max_pos / 2;
    if (reserve < 1) reserve = 1;
    const long budget = (long)m->max_pos - reserve;
    long total = 0;
    for (f = c->first;; f++) {
        /* BOS + turns[f..) + the new message; the first of them carries the system prompt */
        free(first_ids);
        first_ids = chat_encode(c, 1, f < c->n_turns ? c->turns[f].text : text, &n_first);
        if (!first_ids) { free(new_ids); fprintf(stderr, "error: out of memory\n"); return -1; }
        total = has_bos + n_first;
        for (int i = f; i < c->n_turns; i++) total += (i > f ? c->turns[i].n_ids : 0) + c->turns[i].n_reply + has_eos;
        if (f < c->n_turns) total += n_new;
        if (total <= budget) break;
        if (f == c->n_turns) {
            snprintf(err, errn, "the message is too long for the context window (%ld tokens with the template; "
                     "at most %ld leave room for the reply)", total, budget);
            free(new_ids); free(first_ids);
            return 1;
        }
    }
    if (f > c->first) {
        int dropped = 2 * (f - c->first); /* a user message and its reply per exchange */
        fprintf(stderr, "[dropped the %d oldest message%s to fit the %d-token context window]\n", dropped,
                dropped > 1 ? "s" : "", m->max_pos);
        c->first = f;
    }
    /* the new token sequence */
    int *nc = (int *)malloc(sizeof(int) * ((size_t)total + 1)), n = 0;
    if (!nc) { fprintf(stderr, "error: out of memory\n"); return -1; }
    if (has_bos) nc[n++] = c->bos;
    memcpy(nc + n, first_ids, sizeof(int) * (size_t)n_first);
    n += n_first;
    for (int i = f; i < c->n_turns; i++) {
        const ChatTurn *t = &c->turns[i];
        if (i > f) { memcpy(nc + n, t->ids, sizeof(int) * (size_t)t->n_ids); n += t->n_ids; }
        memcpy(nc + n, t->reply, sizeof(int) * (size_t)t->n_reply);
        n += t->n_reply;
        if (has_eos) nc[n++] = c->eos;
    }
    if (f < c->n_turns) { memcpy(nc + n, new_ids, sizeof(int) * (size_t)n_new); n += n_new; }
    free(first_ids);
    if (n == 0) { free(nc); free(new_ids); snprintf(err, errn, "empty prompt (no BOS and no chat markers)"); return 1; }
    if (check_ids(m, nc, n)) { free(nc); free(new_ids); return -1; }
    /* keep what the state already holds when it is a prefix of the new sequence; else start over */
    int keep = s->pos;
    if (keep >= n || keep > c->n_ctx || memcmp(nc, c->ctx, sizeof(int) * (size_t)keep) != 0) {
        if (s->pos) state_reset(s, m);
        keep = 0;
    }
    memcpy(c->ctx, nc, sizeof(int) * (size_t)n);
    c->n_ctx = n;
    free(nc);
    if (c->print_prompt_ids) {
        fprintf(stderr, "prompt ids:");
        for (int i = 0; i < n; i++) fprintf(stderr, " %d", c->ctx[i]);
        fprintf(stderr, "\n");
        fflush(stderr);
    }
    g_stop_reply = 0;
    g_in_reply = 1; /* from here Ctrl-C stops this turn's reply (during the prompt: an empty reply) */
    prefill(m, s, c->ctx + keep, n - keep);
    /* the reply */
    int max_new = c->steps < m->max_pos - n ? c->steps : m->max_pos - n;
    int *reply = (int *)malloc(sizeof(int) * ((size_t)max_new + 1)), nr = 0, first = 1;
    char *pb = (char *)malloc((size_t)c->tk->max_len + 1);
    ReplyOut ro = {0};
    if (!reply || !pb) { fprintf(stderr, "error: out of memory\n"); return -1; }
    for (int g = 0; g < max_new && !g_stop_reply && !g_quit; g++) {
        int next = sample(s->logits, c->n_sample, c->temp, c->top_k, c->top_p, c->pi);
        if (next < 0) { fprintf(stderr, "\nerror: " NONFINITE_MSG "\n"); return -1; }
        if (!c->ignore_eos && ((has_eos && next == c->eos) || is_eos(m, next))) break;
        reply[nr++] = next;
        if (c->print_ids) {
            printf(nr > 1 ? " %d" : "%d", next);
            fflush(stdout);
        } else {
            int k = piece_bytes(c->tk, next, &first, pb);
            if (k && reply_add(&ro, pb, (size_t)k)) { fprintf(stderr, "error: out of memory\n"); return -1; }
            reply_flush(&ro, 0, stdout);
        }
        if (g + 1 < max_new) forward(m, s, &next, 1, 0);
    }
    g_in_reply = 0;
    if (!c->print_ids) reply_flush(&ro, 1, stdout);
    printf("\n");
    fflush(stdout);
    if (g_stop_reply) { fprintf(stderr, "[reply stopped]\n"); g_stop_reply = 0; }
    free(ro.buf);
    free(pb);
    /* remember the exchange; its reply and EOS are fed with the next message */
    if (c->n_turns == c->cap_turns) {
        int cap = c->cap_turns ? 2 * c->cap_turns : 16;
        ChatTurn *nt = (ChatTurn *)realloc(c->turns, sizeof(ChatTurn) * (size_t)cap);
        if (!nt) { fprintf(stderr, "error: out of memory\n"); return -1; }
        c->turns = nt;
        c->cap_turns = cap;
    }
    ChatTurn *t = &c->turns[c->n_turns];
    t->text = strdup(text);
    t->ids = new_ids;
    t->n_ids = n_new;
    t->reply = reply;
    t->n_reply = nr;
    if (!t->text) { fprintf(stderr, "error: out of memory\n"); return -1; }
    c->n_turns++;
    memcpy(c->ctx + c->n_ctx, reply, sizeof(int) * (size_t)nr);
    c->n_ctx += nr;
    if (has_eos) c->ctx[c->n_ctx++] = c->eos;
    return 0;
}

/* all of f, NUL-terminated, but no more than limit + 1 bytes (the caller refuses longer text: an endless
 * stream must not fill the memory first); *len: its length (a NUL inside makes it longer than strlen) */
static char *read_all(FILE *f, size_t *len, size_t limit) {
    size_t n = 0, cap = 4096;
    char *b = (char *)malloc(cap);
    if (!b) return NULL;
    while (n <= limit) {
        if (n + 1 >= cap) {
            char *nb = (char *)realloc(b, cap *= 2);
            if (!nb) { free(b); return NULL; }
            b = nb;
        }
        size_t want = cap - n - 1 < limit + 1 - n ? cap - n - 1 : limit + 1 - n;
        size_t k = fread(b + n, 1, want, f);
        if (k == 0) break;
        n += k;
    }
    b[n] = 0;
    *len = n;
    return b;
}

/* one line of f (its '\n' included), NUL-terminated in *buf (grown as needed, *cap its size), but no more than
 * limit + 1 of its bytes stored: a longer line is read to its end and only counted, never held whole. Returns the
 * line's length in bytes (more than limit: too long, its stored part cut), or -1 at the end of f (or an error, or
 * out of memory) before any byte */
static ssize_t getline_bounded(char **buf, size_t *cap, FILE *f, size_t limit) {
    size_t n = 0, total = 0;
    int c = EOF;
    while ((c = getc(f)) != EOF) {
        total++;
        if (n <= limit) {
            if (n + 2 > *cap) {
                size_t nc = *cap ? *cap : 256;
                while (nc < n + 2) nc *= 2;
                char *nb = (char *)realloc(*buf, nc);
                if (!nb) return -1;
                *buf = nb;
                *cap = nc;
            }
            (*buf)[n++] = (char)c;
        }
        if (c == '\n') break;
    }
    if (total == 0) return -1;
    (*buf)[n] = 0;
    return (ssize_t)total;
}

#define CHAT_HELP "/reset clears the history, /exit or Ctrl-D quits; Ctrl-C stops a reply, at the prompt it quits"

/* chat mode: one message (-i; "-" reads it from stdin) or an interactive loop over stdin lines */
static int chat_main(const Model *m, State *s, const Tokenizer *tk, ProbIdx *pi, const char *prompt,
                     const char *system, int steps, float temp, int top_k, float top_p, int print_ids,
                     int print_prompt_ids, int ignore_eos) {
    Chat c;
    memset(&c, 0, sizeof c);
    c.m = m; c.s = s; c.tk = tk; c.pi = pi;
    c.steps = steps; c.temp = temp; c.top_k = top_k; c.top_p = top_p;
    c.print_ids = print_ids; c.print_prompt_ids = print_prompt_ids; c.ignore_eos = ignore_eos;
    c.n_sample = text_vocab(m, tk);
    c.bos = tk->bos >= 0 ? tk->bos : m->bos;
    c.eos = tk->eos >= 0 ? tk->eos : m->eos;
    int any = 0;
    for (int i = 0; i < MK_COUNT; i++) any |= tok_marker(tk, CHAT_KEYS[i], &c.mk_len[i]) != NULL;
    if (!any) fprintf(stderr, "[tokenizer.bin has no chat markers; using LlamaThink's chat template]\n");
    for (int i = 0; i < MK_COUNT; i++) {
        int len = 0;
        const char *v = tok_marker(tk, CHAT_KEYS[i], &len);
        if (!any) { v = CHAT_DEFAULTS[i]; len = (int)strlen(v); }
        c.mk[i] = v ? v : "";
        c.mk_len[i] = v ? len : 0;
    }
    if (system && strlen(system) > LT_MAX_TEXT) {
        fprintf(stderr, "error: -y system prompt too long (%zu bytes; at most %u)\n", strlen(system), LT_MAX_TEXT);
        return 1;
    }
    if (system && has_text_guard(system, strlen(system))) {
        fprintf(stderr, "error: -y system prompt contains U+FDD0 (a reserved noncharacter: the chat template uses it "
                "to keep content from forming special tokens); remove it\n");
        return 1;
    }
    if (system && utf8_invalid_at(system, strlen(system)) >= 0) {
        fprintf(stderr, "error: -y system prompt is not valid UTF-8 (byte offset %lld)\n",
                utf8_invalid_at(system, strlen(system)));
        return 1;
    }
    if (system && !(c.system = strip_dup(system))) { fprintf(stderr, "error: out of memory\n"); return 1; }
    if (c.system && !*c.system) { free(c.system); c.system = NULL; } /* llamathink-chat: a blank --system is none */
    c.ctx = (int *)malloc(sizeof(int) * ((size_t)m->max_pos + 2));
    if (!c.ctx) { fprintf(stderr, "error: out of memory\n"); return 1; }
    char err[256];
    int rc = 0;
    if (c.system) { /* as llamathink-chat: a system prompt that cannot fit is refused once, here */
        int n_first = 0;
        int *first_ids = chat_encode(&c, 1, "", &n_first);
        if (!first_ids) { fprintf(stderr, "error: out of memory\n"); chat_free(&c); return 1; }
        free(first_ids);
        int reserve = c.steps < m->max_pos / 2 ? c.steps : m->max_pos / 2; /* as chat_turn keeps */
        if (reserve < 1) reserve = 1;
        const long taken = (c.bos >= 0) + n_first, budget = (long)m->max_pos - reserve;
        if (taken > budget) {
            fprintf(stderr, "error: the system prompt takes %ld tokens with the chat template; the context window "
                    "holds %d, %d of them kept for the reply: shorten it (or lower -n)\n", taken, m->max_pos, reserve);
            chat_free(&c);
            return 1;
        }
    }
    if (prompt) {
        size_t rlen = 0;
        char *raw = !strcmp(prompt, "-") ? read_all(stdin, &rlen, LT_MAX_TEXT) : strdup(prompt);
        if (raw && rlen > strlen(raw)) { /* the rest would be silently cut off */
            fprintf(stderr, "error: the message contains a NUL byte (at offset %zu)\n", strlen(raw));
            free(raw);
            chat_free(&c);
            return 1;
        }
        if (raw && strlen(raw) > LT_MAX_TEXT) {
            fprintf(stderr, "error: the message is too long (%zu bytes; at most %u)\n", strlen(raw), LT_MAX_TEXT);
            free(raw);
            chat_free(&c);
            return 1;
        }
        char *text = raw ? strip_dup(raw) : NULL;
        free(raw);
        if (!text) { fprintf(stderr, "error: out of memory\n"); chat_free(&c); return 1; }
        if (!*text) { /* as llamathink-chat: an empty pipe must not get a made-up answer */
            fprintf(stderr, "error: the message is empty\n");
            free(text);
            chat_free(&c);
            return 1;
        }
        int r = chat_turn(&c, text, err, sizeof err);
        if (r == 1) fprintf(stderr, "error: %s\n", err);
        rc = r ? 1 : 0;
        free(text);
        chat_free(&c);
        return rc;
    }
    fprintf(stderr, "[" CHAT_HELP "]\n");
    /* SIGINT handler without SA_RESTART, so that Ctrl-C at the prompt interrupts the read. OpenMP
     * threads are started first with SIGINT blocked: the signal then always reaches this thread. */
#ifdef _OPENMP
    sigset_t blk, old;
    sigemptyset(&blk);
    sigaddset(&blk, SIGINT);
    pthread_sigmask(SIG_BLOCK, &blk, &old);
#pragma omp parallel
    { (void)0; }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
#endif
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigint;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;
    sigaction(SIGINT, &sa, NULL);
    char *line = NULL;
    size_t lcap = 0;
    for (;;) {
        if (g_quit) { fprintf(stderr, "\n"); break; }
        fprintf(stderr, "> ");
        fflush(stderr);
        const ssize_t got = getline_bounded(&line, &lcap, stdin, LT_MAX_TEXT);
        if (got < 0) {
            fprintf(stderr, "\n");
            break;
        }
        if ((size_t)got > LT_MAX_TEXT) {
            fprintf(stderr, "[the message is too long (%zd bytes; at most %u); nothing was kept]\n", got, LT_MAX_TEXT);
            continue;
        }
        if (g_quit) { fprintf(stderr, "\n"); break; }
        if (memchr(line, 0, (size_t)got)) { /* the rest of the line would be silently cut off */
            fprintf(stderr, "[the message contains a NUL byte (at offset %zu); nothing was kept]\n", strlen(line));
            continue;
        }
        char *text = strip_dup(line);
        if (!text) { fprintf(stderr, "error: out of memory\n"); rc = 1; break; }
        if (!*text) { free(text); continue; }
        if (!strcmp(text, "/exit") || !strcmp(text, "/quit")) { free(text); break; }
        if (!strcmp(text, "/reset")) {
            c.first = c.n_turns;
            fprintf(stderr, "[history cleared]\n");
            free(text);
            continue;
        }
        if (!strcmp(text, "/help")) { fprintf(stderr, "[" CHAT_HELP "]\n"); free(text); continue; }
        int r = chat_turn(&c, text, err, sizeof err);
        free(text);
        if (r < 0) { rc = 1; break; }
        if (r == 1) fprintf(stderr, "[%s]\n", err);
    }
    free(line);
    chat_free(&c);
    return rc;
}

/* The options each mode reads (space-separated, with a space at both ends). An option the mode would ignore is
 * refused, so that a slip (decode given -i for --ids, -y outside chat) is named instead of running without it. */
static const char *mode_options(const char *mode) {
    if (!strcmp(mode, "generate"))
        return " -i -z --ids -n -t -k -p -s -T --chunk --no-bos --ignore-eos --print-ids --stats ";
    if (!strcmp(mode, "chat"))
        return " -i -z -y -n -t -k -p -s -T --chunk --ignore-eos --print-ids --print-prompt-ids ";
    if (!strcmp(mode, "encode")) return " -i -z --no-bos ";
    if (!strcmp(mode, "decode")) return " -z --ids ";
    return " -z -T --chunk --logits-for --logits-out "; /* logits */
}

/* 0 when every option in given[0 .. n) is one `mode` reads; else a message naming the first that is not, and 1 */
static int check_mode_options(const char *mode, const char **given, int n) {
    const char *reads = mode_options(mode);
    for (int i = 0; i < n; i++) {
        char key[32];
        snprintf(key, sizeof key, " %s ", given[i]);
        if (!strstr(reads, key)) {
            fprintf(stderr, "error: %s does not apply to %s mode, which reads only%s(-m MODE chooses the mode)\n",
                    given[i], mode, reads);
            return 1;
        }
    }
    return 0;
}

int main(int argc, char **argv) {
#if defined(_OPENMP) && defined(__linux__)
    maybe_reexec_passive(argv);
#endif
    if (argc < 2) { usage(); return 1; }
    if (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help")) { usage(); return 0; }
    const char *model_path = argv[1], *mode = "generate", *prompt = NULL, *tok_path = NULL, *ids_str = NULL;
    const char *mode_arg = NULL; /* -m as given: --logits-for chooses logits mode only where no other was asked for */
    const char *logits_for = NULL, *logits_out = NULL, *system = NULL;
    int steps = 256, top_k = 0, threads = 0, chunk = 256, no_bos = 0, ignore_eos = 0, print_ids = 0, stats = 0;
    int print_prompt_ids = 0, steps_given = 0;
    float temp = 1.0f, top_p = 0.9f;
    unsigned long long seed = (unsigned long long)time(NULL);
    const char **given = (const char **)malloc(sizeof(char *) * (size_t)argc); /* the options given, -m and -h aside */
    int n_given = 0;
    if (!given) { fprintf(stderr, "error: out of memory\n"); return 1; }
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "-m")) given[n_given++] = a;
#define NEEDV() do { if (!v) { fprintf(stderr, "error: %s needs a value\n", a); return 1; } i++; } while (0)
        if (!strcmp(a, "-m")) { NEEDV(); mode = mode_arg = v; }
        else if (!strcmp(a, "-i")) { NEEDV(); prompt = v; }
        else if (!strcmp(a, "-z")) { NEEDV(); tok_path = v; }
        else if (!strcmp(a, "--ids")) { NEEDV(); ids_str = v; }
        else if (!strcmp(a, "-n")) { NEEDV(); if (parse_int_opt("-n", v, 0, INT32_MAX, &steps)) return 1; steps_given = 1; }
        else if (!strcmp(a, "-t")) { NEEDV(); if (parse_float_opt("-t", v, 0.0, 1e6, &temp)) return 1; }
        else if (!strcmp(a, "-k")) { NEEDV(); if (parse_int_opt("-k", v, 0, INT32_MAX, &top_k)) return 1; }
        else if (!strcmp(a, "-p")) { NEEDV(); if (parse_float_opt("-p", v, 0.0, 1.0, &top_p)) return 1; }
        else if (!strcmp(a, "-s")) {
            long long sd;
            NEEDV();
            if (parse_long_opt("-s", v, 0, INT64_MAX, &sd)) return 1;
            seed = (unsigned long long)sd;
        }
        else if (!strcmp(a, "-T")) { NEEDV(); if (parse_int_opt("-T", v, 0, 1024, &threads)) return 1; }
        else if (!strcmp(a, "--chunk")) { NEEDV(); if (parse_int_opt("--chunk", v, 1, 1 << 20, &chunk)) return 1; }
        else if (!strcmp(a, "--no-bos")) no_bos = 1;
        else if (!strcmp(a, "--ignore-eos")) ignore_eos = 1;
        else if (!strcmp(a, "--print-ids")) print_ids = 1;
        else if (!strcmp(a, "--print-prompt-ids")) print_prompt_ids = 1;
        else if (!strcmp(a, "-y")) { NEEDV(); system = v; }
        else if (!strcmp(a, "--stats")) stats = 1;
        else if (!strcmp(a, "--logits-for")) { NEEDV(); logits_for = v; }
        else if (!strcmp(a, "--logits-out")) { NEEDV(); logits_out = v; }
        else if (!strcmp(a, "-h") || !strcmp(a, "--help")) { usage(); return 0; }
        else { fprintf(stderr, "error: unknown option %s\n", a); usage(); return 1; }
#undef NEEDV
    }
    if (logits_for && !mode_arg) mode = "logits";
    if (strcmp(mode, "generate") && strcmp(mode, "chat") && strcmp(mode, "encode") && strcmp(mode, "decode") &&
        strcmp(mode, "logits")) {
        fprintf(stderr, "error: unknown mode %s (-m generate | chat | encode | decode | logits)\n", mode);
        return 1;
    }
    if (check_mode_options(mode, given, n_given)) return 1;
    free(given);
    if (prompt && ids_str) {
        fprintf(stderr, "error: give the prompt as -i TEXT or as --ids \"...\", not both\n");
        return 1;
    }
    if (no_bos && ids_str) { /* BOS is added to a text prompt only; ids are fed as given */
        fprintf(stderr, "error: --no-bos applies to a text prompt (-i); --ids are fed as given (leave the BOS id "
                        "out of them for no BOS)\n");
        return 1;
    }
    if (!strcmp(mode, "decode") && !ids_str) {
        fprintf(stderr, "error: decode mode needs --ids \"...\" (the token ids to decode)\n");
        return 1;
    }
    /* every reply would be empty, and kept in the history; with --print-prompt-ids, -n 0 shows the prompts alone */
    if (!strcmp(mode, "chat") && steps_given && steps == 0 && !print_prompt_ids) {
        fprintf(stderr, "error: -n 0 in chat mode: a reply needs at least one token, as llamathink-chat's "
                        "--max-new-tokens (with --print-prompt-ids it prints each prompt's ids alone)\n");
        return 1;
    }
    if (getenv("LT_PAR_MIN")) { /* work (multiply-adds) below which a matmul runs on one thread */
        float pm;
        if (parse_float_opt("LT_PAR_MIN (environment)", getenv("LT_PAR_MIN"), 0.0, 1e18, &pm)) return 1;
        g_par_min = pm;
    }
    g_rng = seed * 0x9E3779B97F4A7C15ULL + 1;
#ifdef _OPENMP
    if (threads > 0) omp_set_num_threads(threads);
#else
    (void)threads;
#endif
    char err[512] = {0};
    Tokenizer tk;
    int have_tok = 0;
    if (tok_path) {
        size_t tsz;
        uint8_t *img = read_file(tok_path, &tsz);
        if (!img) { fprintf(stderr, "error: cannot read %s: %s\n", tok_path, strerror(errno)); return 1; }
        if (tokenizer_init(&tk, img, tsz, err, sizeof err)) { fprintf(stderr, "error: %s\n", err); return 1; }
        have_tok = 1;
    }
    /* tokenizer-only modes (model path may be "-") */
    if (!strcmp(mode, "encode") || !strcmp(mode, "decode")) {
        if (!have_tok) { fprintf(stderr, "error: %s mode needs -z tokenizer.bin\n", mode); return 1; }
        if (!strcmp(mode, "encode")) {
            if (!prompt) { fprintf(stderr, "error: encode mode needs -i TEXT\n"); return 1; }
            size_t L = strlen(prompt);
            if (L > LT_MAX_TEXT) { fprintf(stderr, "error: -i text too long (%zu bytes; at most %u)\n", L, LT_MAX_TEXT); return 1; }
            int *ids = (int *)malloc(sizeof(int) * (L * 4 + 8));
            int n = ids ? encode(&tk, prompt, L, !no_bos, ids, (int)(L * 4 + 8)) : -1;
            if (n < 0) { fprintf(stderr, "error: out of memory encoding the text\n"); return 1; }
            for (int i = 0; i < n; i++) printf(i ? " %d" : "%d", ids[i]);
            printf("\n");
            free(ids);
        } else {
            int n = 0, *ids = parse_ids(ids_str ? ids_str : "", &n), first = 1;
            if (!ids) { fprintf(stderr, "error: bad --ids\n"); return 1; }
            for (int i = 0; i < n; i++)
                if (ids[i] < 0 || ids[i] >= tk.n) {
                    fprintf(stderr, "error: token id %d out of range [0, %d) of the tokenizer\n", ids[i], tk.n);
                    return 1;
                }
            for (int i = 0; i < n; i++) decode_piece(&tk, ids[i], &first, stdout);
            free(ids);
        }
        free_tokenizer(&tk);
        return stdout_ok() ? 0 : 1;
    }

    int fd = open(model_path, O_RDONLY | O_NONBLOCK); /* a FIFO must not block: refused below */
    if (fd < 0) { fprintf(stderr, "error: cannot open %s: %s\n", model_path, strerror(errno)); return 1; }
    struct stat st;
    if (fstat(fd, &st) != 0) { fprintf(stderr, "error: cannot stat %s: %s\n", model_path, strerror(errno)); close(fd); return 1; }
    if (!S_ISREG(st.st_mode)) { fprintf(stderr, "error: %s is not a regular file\n", model_path); close(fd); return 1; }
    if (st.st_size <= 0) { fprintf(stderr, "error: %s is an empty file\n", model_path); close(fd); return 1; }
    size_t fsize = (size_t)st.st_size;
#ifdef MAP_POPULATE /* fault the weights in now (page-cache reads), not during the first forward pass */
    void *map = mmap(NULL, fsize, PROT_READ, MAP_PRIVATE | MAP_POPULATE, fd, 0);
#else
    void *map = mmap(NULL, fsize, PROT_READ, MAP_PRIVATE, fd, 0);
#endif
    close(fd);
    if (map == MAP_FAILED) { fprintf(stderr, "error: mmap failed: %s\n", strerror(errno)); return 1; }
    Model m;
    if (model_init(&m, (const uint8_t *)map, fsize, err, sizeof err)) {
        fprintf(stderr, "error: %s\n", err);
        munmap(map, fsize);
        return 1;
    }
    /* a tokenizer with more pieces than the model has token ids is another model's: its ids would
     * be out of range, or in range and meaning other tokens (a wrong answer with exit 0) */
    if (have_tok && tk.n > m.vocab) {
        fprintf(stderr, "error: the tokenizer %s has %d pieces, more than the model's %d token ids (vocab_size): "
                "it is not this model's tokenizer; export the model's own with export.py --tokenizer-out\n",
                tok_path, tk.n, m.vocab);
        free_tokenizer(&tk);
        free_model(&m);
        munmap(map, fsize);
        return 1;
    }
    State s;
    if (!strcmp(mode, "logits")) {
        int n = 0, *ids = parse_ids(logits_for ? logits_for : "", &n);
        if (!ids || n == 0 || !logits_out) { fprintf(stderr, "error: --logits-for needs ids and --logits-out FILE\n"); return 1; }
        if (check_ids(&m, ids, n)) return 1;
        if (n > m.max_pos) { fprintf(stderr, "error: %d ids exceed max_position_embeddings %d\n", n, m.max_pos); return 1; }
        if (state_init(&s, &m, chunk, 1, err, sizeof err)) { fprintf(stderr, "error: %s\n", err); return 1; }
        /* the model (mapped: truncating it would kill the process) or the tokenizer would be lost */
        if (same_file(logits_out, model_path) || same_file(logits_out, tok_path)) {
            fprintf(stderr, "error: --logits-out %s is the %s file; give another path\n", logits_out,
                    same_file(logits_out, model_path) ? "model" : "tokenizer");
            return 1;
        }
        FILE *f = fopen(logits_out, "wb");
        if (!f) { fprintf(stderr, "error: cannot write %s\n", logits_out); return 1; }
        for (int i = 0; i < n; i += s.chunk) {
            int T = n - i < s.chunk ? n - i : s.chunk;
            forward(&m, &s, ids + i, T, 1);
            for (size_t j = 0; j < (size_t)T * m.vocab; j++) {
                if (!isfinite(s.logits[j])) { /* as generation refuses them: no file of NaN logits */
                    fprintf(stderr, "error: " NONFINITE_MSG " at position %d; %s not written\n",
                            i + (int)(j / m.vocab), logits_out);
                    fclose(f);
                    remove_regular(logits_out);
                    return 1;
                }
            }
            if (fwrite(s.logits, sizeof(float), (size_t)T * m.vocab, f) != (size_t)T * m.vocab) {
                fprintf(stderr, "error: cannot write %s: %s\n", logits_out, strerror(errno));
                fclose(f);
                remove_regular(logits_out);
                return 1;
            }
        }
        if (fclose(f) != 0) { /* buffered data is written here: a full disk shows up now */
            fprintf(stderr, "error: cannot write %s: %s\n", logits_out, strerror(errno));
            remove_regular(logits_out);
            return 1;
        }
        free(ids);
        return 0;
    }
    if (state_init(&s, &m, chunk, 0, err, sizeof err)) { fprintf(stderr, "error: %s\n", err); return 1; }
    ProbIdx *pi = (ProbIdx *)malloc(sizeof(ProbIdx) * (size_t)m.vocab);
    int *seq = (int *)malloc(sizeof(int) * ((size_t)m.max_pos + 1));
    if (!pi || !seq) { fprintf(stderr, "error: out of memory\n"); return 1; }

    if (!strcmp(mode, "generate")) {
        int n = 0, *pr = NULL;
        if (ids_str) {
            pr = parse_ids(ids_str, &n);
            if (!pr) { fprintf(stderr, "error: bad --ids\n"); return 1; }
        } else {
            if (!have_tok) { fprintf(stderr, "error: a text prompt needs -z tokenizer.bin (or use --ids)\n"); return 1; }
            const char *text = prompt ? prompt : "";
            size_t L = strlen(text);
            if (L > LT_MAX_TEXT) { fprintf(stderr, "error: -i text too long (%zu bytes; at most %u)\n", L, LT_MAX_TEXT); return 1; }
            if (utf8_invalid_at(text, L) >= 0) { /* as chat mode and llamathink's tokenizers refuse it */
                fprintf(stderr, "error: -i prompt is not valid UTF-8 (byte offset %lld)\n", utf8_invalid_at(text, L));
                return 1;
            }
            pr = (int *)malloc(sizeof(int) * (L * 4 + 8));
            n = pr ? encode(&tk, text, L, !no_bos, pr, (int)(L * 4 + 8)) : -1;
            if (n < 0) { fprintf(stderr, "error: out of memory encoding the prompt\n"); return 1; }
        }
        if (n == 0) { if (m.bos < 0) { fprintf(stderr, "error: empty prompt and no BOS\n"); return 1; } pr[0] = m.bos; n = 1; }
        if (check_ids(&m, pr, n)) return 1;
        /* the prompt is kept whole (as llamathink's generate / chat do) and -n shrinks to the room
         * the context leaves after it; a prompt that leaves no room is refused */
        if (n >= m.max_pos) {
            fprintf(stderr, "error: the prompt (%d tokens) leaves no room in the %d-token context window "
                    "(max_position_embeddings); shorten it to at most %d tokens\n", n, m.max_pos, m.max_pos - 1);
            return 1;
        }
        if ((long long)n + steps > m.max_pos) {
            if (steps_given)
                fprintf(stderr, "warning: -n %d reduced to %d: the %d-token prompt leaves %d of the %d-token context\n",
                        steps, m.max_pos - n, n, m.max_pos - n, m.max_pos);
            steps = m.max_pos - n;
        }
        memcpy(seq, pr, sizeof(int) * (size_t)n);
        int n_sample = have_tok ? text_vocab(&m, &tk) : m.vocab; /* its note before the prompt's echo */
        int first = 1;
        if (!print_ids && have_tok) for (int i = 0; i < n; i++) decode_piece(&tk, seq[i], &first, stdout);
        fflush(stdout);
        double t0 = now_s();
        prefill(&m, &s, seq, n);
        double t1 = now_s();
        int gen = 0;
        for (; gen < steps; gen++) {
            int next = sample(s.logits, n_sample, temp, top_k, top_p, pi);
            if (next < 0) { fprintf(stderr, "\nerror: " NONFINITE_MSG "\n"); return 1; }
            seq[n + gen] = next;
            if (print_ids) printf(gen ? " %d" : "%d", next);
            else if (have_tok) decode_piece(&tk, next, &first, stdout);
            else printf("%d ", next);
            fflush(stdout);
            if (is_eos(&m, next) && !ignore_eos) { gen++; break; }
            if (gen + 1 < steps) forward(&m, &s, &next, 1, 0);
        }
        double t2 = now_s();
        printf("\n");
        if (stats) {
            const char *wp = getenv("OMP_WAIT_POLICY");
            fprintf(stderr, "threads: %d, OMP_WAIT_POLICY=%s\n", n_threads(), wp ? wp : "(default)");
            fprintf(stderr, "prefill: %d tokens in %.3f s (%.1f tok/s)\n", n, t1 - t0, n / (t1 - t0));
            fprintf(stderr, "decode: %d tokens in %.3f s (%.1f tok/s)\n", gen, t2 - t1, gen > 1 ? (gen - 1) / (t2 - t1) : 0.0);
        }
        free(pr);
#ifdef LT_PROFILE
        prof_print();
#endif
        return stdout_ok() ? 0 : 1;
    }
    if (!strcmp(mode, "chat")) {
        if (!have_tok) { fprintf(stderr, "error: chat mode needs -z tokenizer.bin\n"); return 1; }
        int rc = chat_main(&m, &s, &tk, pi, prompt, system, steps, temp, top_k, top_p, print_ids, print_prompt_ids,
                           ignore_eos);
        free(pi); free(seq); free_tokenizer(&tk); state_free(&s, &m); free_model(&m); munmap(map, fsize);
        return stdout_ok() ? rc : 1;
    }
    fprintf(stderr, "error: unknown mode %s\n", mode);
    return 1;
}
#endif
