/* libFuzzer harness for the loaders of run.c (model and tokenizer images).
 * Build: make -C export_c fuzz_loader   (clang -fsanitize=fuzzer,address,undefined)
 * Run:   ./export_c/fuzz_loader -max_total_time=30 CORPUS_DIR
 * Input: first byte selects the target (even: model file, odd: tokenizer file), the rest is
 * the file image.  A model that loads is also run for a few tokens so that every header the
 * loader accepts is exercised by the forward pass. */
#define LT_NO_MAIN
#include "run.c"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    char err[512];
    const uint8_t sel = data[0];
    data++;
    size--;
    if (sel & 1) {
        uint8_t *img = (uint8_t *)malloc(size ? size : 1);
        if (!img) return 0;
        memcpy(img, data, size);
        Tokenizer t;
        if (tokenizer_init(&t, img, size, err, sizeof err) == 0) {
            static const char text[] = " Hello  world\n\xe4\xb8\xad\xf0\x9f\x98\x80 end ";
            int ids[256];
            int n = encode(&t, text, sizeof(text) - 1, 1, ids, 256);
            FILE *f = fopen("/dev/null", "w");
            int first = 1;
            for (int i = 0; i < n && f; i++) decode_piece(&t, ids[i], &first, f);
            for (int i = 0; i < 300 && f; i++) decode_piece(&t, i, &first, f);
            if (f) fclose(f);
            free_tokenizer(&t);
        }
        return 0;
    }
    /* the runner mmaps the file, so tensors are 64-byte aligned: mimic that */
    uint8_t *img = (uint8_t *)aligned_alloc(64, (size + 63) & ~(size_t)63 ? (size + 63) & ~(size_t)63 : 64);
    if (!img) return 0;
    memcpy(img, data, size);
    Model m;
    if (model_init(&m, img, size, err, sizeof err) == 0) {
        State s;
        g_state_limit = 64e6;
        if (state_init(&s, &m, 2, 1, err, sizeof err) == 0) {
            int tok[5] = {0, 1 % m.vocab, 2 % m.vocab, 3 % m.vocab, m.vocab - 1};
            forward(&m, &s, tok, 2, 1);
            forward(&m, &s, tok + 2, 1, 0);
            forward(&m, &s, tok + 3, 2, 1);
            state_free(&s, &m);
        }
        free_model(&m);
    }
    free(img);
    return 0;
}
