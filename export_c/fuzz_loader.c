/* Fuzz harness for the loaders of run.c (model and tokenizer images), two ways to build it:
 *
 *   libFuzzer (clang):  make -C export_c fuzz_loader
 *                       ./export_c/fuzz_loader -max_len=200000 CORPUS_DIR
 *     Input: first byte selects the target (even: model file, odd: tokenizer file), the rest is
 *     the file image.  Besides libFuzzer's byte-level mutations, a custom mutator rewrites whole
 *     header fields with extreme values (below): byte flips alone take minutes to hit a field
 *     such as the byte-fallback base at 0x7FFFFFFF, a structural mutation hits it at once.
 *
 *   standalone (gcc or clang, ASan + UBSan):  make -C export_c fuzz_loader_standalone
 *                       ./export_c/fuzz_loader_standalone [-r ROUNDS] [-s SEED] FILE...
 *     FILEs are valid model.bin / tokenizer.bin images (told apart by their magic).  It first
 *     sets every header field of every file to every extreme value in turn (deterministic), then
 *     runs ROUNDS random structural mutations (1-3 fields at once, sometimes plus byte flips).
 *     A memory or UB fault aborts through the sanitizer; otherwise it prints the counts.
 *
 * A model that loads is also run for a few tokens, so that every header the loader accepts is
 * exercised by the forward pass; a tokenizer that loads encodes and decodes a short text. */
#define LT_NO_MAIN
#include "run.c"

#include <limits.h>

/* ---- the target ------------------------------------------------------------------------- */
static void fuzz_tokenizer(const uint8_t *data, size_t size) {
    char err[512];
    uint8_t *img = (uint8_t *)malloc(size ? size : 1);
    if (!img) return;
    memcpy(img, data, size);
    Tokenizer t;
    if (tokenizer_init(&t, img, size, err, sizeof err) != 0) return; /* img is freed by it */
    static const char text[] = " Hello  world\n\xe4\xb8\xad\xf0\x9f\x98\x80 end \xff\xc3";
    int ids[256];
    int n = encode(&t, text, sizeof(text) - 1, 1, ids, 256);
    FILE *f = fopen("/dev/null", "w");
    int first = 1;
    for (int i = 0; i < n && f; i++) decode_piece(&t, ids[i], &first, f);
    for (int i = -2; i < 300 && f; i++) decode_piece(&t, i, &first, f);
    if (f) fclose(f);
    free_tokenizer(&t);
}

static void fuzz_model(const uint8_t *data, size_t size) {
    char err[512];
    /* the runner mmaps the file, so tensors are 64-byte aligned: mimic that */
    size_t cap = (size + 63) & ~(size_t)63;
    uint8_t *img = (uint8_t *)aligned_alloc(64, cap ? cap : 64);
    if (!img) return;
    memcpy(img, data, size);
    Model m;
    if (model_init(&m, img, size, err, sizeof err) == 0) {
        State s;
        g_state_limit = 64e6;
        if (state_init(&s, &m, 2, 1, err, sizeof err) == 0) {
            /* as the runner feeds tokens: at most s.chunk per call, never past the context */
            int tok[5] = {0, 1 % m.vocab, 2 % m.vocab, 3 % m.vocab, m.vocab - 1};
            static const int steps[3] = {2, 1, 2};
            for (int i = 0, at = 0; i < 3; at += steps[i], i++) {
                const int T = steps[i] < s.chunk ? steps[i] : s.chunk;
                if (s.pos + T > m.max_pos) break;
                forward(&m, &s, tok + at, T, i != 1);
            }
            state_free(&s, &m);
        }
        free_model(&m);
    }
    free(img);
}

static void fuzz_one(int is_tok, const uint8_t *data, size_t size) {
    if (is_tok) fuzz_tokenizer(data, size);
    else fuzz_model(data, size);
}

/* ---- structural mutation ---------------------------------------------------------------- */
/* Header fields (byte offset, width in bytes; 8 = u64, -8 = f64) of the two formats. */
typedef struct { int off, width; } Field;
static const Field MODEL_FIELDS[] = {
    {4, 4}, {8, 4}, {12, 4}, {16, 4}, {20, 4}, {24, 8}, {32, 4}, {36, 4}, {40, 4}, {44, 4}, {48, 4},
    {52, 4}, {56, 4}, {60, 4}, {64, 4}, {68, 4}, {72, 4}, {76, 4}, {80, 4}, {84, 4}, {88, 4},
    {92, 4}, {96, 4}, {100, 4}, {104, 4}, {108, 4}, {112, 4}, {120, -8}, {128, -8}, {136, -8},
    {LT_EOS_OFFSET, 4}, {LT_EOS_OFFSET + 4, 4}, {LT_EOS_OFFSET + 8, 4},
    {LT_TYPES_OFFSET, 1}, {LT_TYPES_OFFSET + 1, 1}, {LT_TYPES_OFFSET + 2, 1},
};
static const Field TOK_FIELDS[] = {
    {4, 4}, {8, 4}, {12, 4}, {16, 4}, {20, 4}, {24, 4}, {28, 4}, {32, 4}, {36, 4}, {40, 4},
    {TK_HEADER_SIZE + 4, 4}, /* the first piece's length */
};
#define N_MODEL_FIELDS (int)(sizeof MODEL_FIELDS / sizeof MODEL_FIELDS[0])
#define N_TOK_FIELDS (int)(sizeof TOK_FIELDS / sizeof TOK_FIELDS[0])

/* extreme integers; the last ones are relative to the file size (set by extreme_int) */
static const int64_t EXTREMES[] = {0, 1, -1, 2, 3, 16, 255, 256, 257, 65535, 65536, 1 << 20, 1 << 22,
                                   (1 << 22) + 1, INT32_MAX - 255, INT32_MAX - 1, INT32_MAX, INT32_MIN,
                                   INT32_MIN + 1, (int64_t)UINT32_MAX, INT64_MAX, INT64_MIN};
#define N_FIXED (int)(sizeof EXTREMES / sizeof EXTREMES[0])
#define N_EXTREMES (N_FIXED + 5)
static int64_t extreme_int(int k, size_t size) {
    if (k < N_FIXED) return EXTREMES[k];
    switch (k - N_FIXED) {
    case 0: return (int64_t)size;
    case 1: return (int64_t)size + 1;
    case 2: return (int64_t)size / 4;
    case 3: return (int64_t)size / 9;
    default: return (int64_t)size * 64;
    }
}
static const double EXTREME_F64[] = {0.0, -1.0, 1e-300, 1e300, 1e12, INFINITY, -INFINITY, NAN, 0.5};
#define N_EXTREME_F64 (int)(sizeof EXTREME_F64 / sizeof EXTREME_F64[0])

/* value k of the extremes for field f of an image of `size` bytes (ignored past the end) */
static void set_field(uint8_t *img, size_t size, Field f, int k) {
    const int w = f.width < 0 ? -f.width : f.width;
    if ((size_t)f.off + (size_t)w > size) return;
    if (f.width == -8) {
        double d = EXTREME_F64[k % N_EXTREME_F64];
        memcpy(img + f.off, &d, 8);
    } else if (f.width == 8) {
        uint64_t v = (uint64_t)extreme_int(k % N_EXTREMES, size);
        memcpy(img + f.off, &v, 8);
    } else if (f.width == 4) {
        uint32_t v = (uint32_t)extreme_int(k % N_EXTREMES, size);
        memcpy(img + f.off, &v, 4);
    } else {
        img[f.off] = (uint8_t)extreme_int(k % N_EXTREMES, size);
    }
}

static uint64_t g_fz_rng = 0x9E3779B97F4A7C15ULL;
static uint64_t fz_next(void) { /* splitmix64 */
    uint64_t z = (g_fz_rng += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* 1-3 random header fields set to random extremes */
static void mutate_fields(int is_tok, uint8_t *img, size_t size) {
    const Field *fs = is_tok ? TOK_FIELDS : MODEL_FIELDS;
    const int nf = is_tok ? N_TOK_FIELDS : N_MODEL_FIELDS;
    int times = 1 + (int)(fz_next() % 3);
    for (int i = 0; i < times; i++) set_field(img, size, fs[fz_next() % (uint64_t)nf], (int)(fz_next() % 64));
}

#ifndef LT_FUZZ_STANDALONE
/* ---- libFuzzer -------------------------------------------------------------------------- */
size_t LLVMFuzzerMutate(uint8_t *data, size_t size, size_t max_size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    fuzz_one(data[0] & 1, data + 1, size - 1);
    return 0;
}

/* half of the time a structural mutation of the header, else libFuzzer's own */
size_t LLVMFuzzerCustomMutator(uint8_t *data, size_t size, size_t max_size, unsigned int seed) {
    g_fz_rng ^= (uint64_t)seed * 0x2545F4914F6CDD1DULL;
    if (size > 1 && fz_next() % 2) {
        mutate_fields(data[0] & 1, data + 1, size - 1);
        return size;
    }
    return LLVMFuzzerMutate(data, size, max_size);
}
#else
/* ---- standalone driver ------------------------------------------------------------------ */
int main(int argc, char **argv) {
    long rounds = 2000;
    int nfiles = 0;
    uint8_t *imgs[16];
    size_t sizes[16];
    int is_tok[16];
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-r") && i + 1 < argc) { rounds = strtol(argv[++i], NULL, 10); continue; }
        if (!strcmp(argv[i], "-s") && i + 1 < argc) { g_fz_rng = strtoull(argv[++i], NULL, 10); continue; }
        if (nfiles == 16) { fprintf(stderr, "error: at most 16 files\n"); return 2; }
        imgs[nfiles] = read_file(argv[i], &sizes[nfiles]);
        if (!imgs[nfiles] || sizes[nfiles] < 8) { fprintf(stderr, "error: cannot read %s\n", argv[i]); return 2; }
        uint32_t magic = rd_u32(imgs[nfiles]);
        if (magic != LT_MAGIC && magic != TK_MAGIC) { fprintf(stderr, "error: %s: unknown magic\n", argv[i]); return 2; }
        is_tok[nfiles] = magic == TK_MAGIC;
        nfiles++;
    }
    if (!nfiles) { fprintf(stderr, "usage: fuzz_loader_standalone [-r ROUNDS] [-s SEED] FILE...\n"); return 2; }
    long runs = 0;
    for (int f = 0; f < nfiles; f++) {
        uint8_t *buf = (uint8_t *)malloc(sizes[f]);
        if (!buf) return 2;
        const Field *fs = is_tok[f] ? TOK_FIELDS : MODEL_FIELDS;
        const int nf = is_tok[f] ? N_TOK_FIELDS : N_MODEL_FIELDS;
        for (int i = 0; i < nf; i++) {
            const int nk = fs[i].width == -8 ? N_EXTREME_F64 : N_EXTREMES;
            for (int k = 0; k < nk; k++) {
                memcpy(buf, imgs[f], sizes[f]);
                set_field(buf, sizes[f], fs[i], k);
                fuzz_one(is_tok[f], buf, sizes[f]);
                runs++;
            }
        }
        free(buf);
    }
    printf("exhaustive: %ld inputs\n", runs);
    for (long r = 0; r < rounds; r++) {
        const int f = (int)(fz_next() % (uint64_t)nfiles);
        size_t size = sizes[f];
        uint8_t *buf = (uint8_t *)malloc(size ? size : 1);
        if (!buf) return 2;
        memcpy(buf, imgs[f], size);
        mutate_fields(is_tok[f], buf, size);
        if (fz_next() % 4 == 0) /* plus a few byte flips */
            for (int j = 0, nflip = 1 + (int)(fz_next() % 4); j < nflip; j++) buf[fz_next() % size] ^= (uint8_t)(1u << (fz_next() % 8));
        if (fz_next() % 8 == 0) size = (size_t)(fz_next() % (size + 1)); /* or a truncation */
        fuzz_one(is_tok[f], buf, size);
        free(buf);
    }
    printf("random: %ld inputs\n", rounds);
    for (int f = 0; f < nfiles; f++) free(imgs[f]);
    return 0;
}
#endif
