// first-driver: one FiRST prefill and a few greedy decode steps through the patched C API, so
// two builds of the library (this machine, and an Arm cross build under qemu-user) can be
// compared without Python. Token ids come from the command line: tokenization is not in question.
//
//   first-driver [-t THREADS] [-n STEPS] [-m first|full] [-T THRESHOLD] [-k f16|f32] [-f] MODEL OUT TOKEN...
//
// -f turns flash attention on; it is off by default, as in llama-cpp-python's Llama (so FirstModel).
//
// stdout: "key value..." lines (build key, layers, vocabulary, mask, p_i, greedy tokens);
// OUT: (STEPS + 1) rows of n_vocab little-endian float32 logits, the row after the last prompt
// token first, then the row after each greedy token fed back.

#define _POSIX_C_SOURCE 200809L // getopt under -std=c11

#include "llama.h"
#include "llama-first.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void quiet_log(enum ggml_log_level level, const char * text, void * user_data) {
    (void) user_data;
    if (level == GGML_LOG_LEVEL_ERROR) {
        fputs(text, stderr);
    }
}

static int fail(const char * what) {
    fprintf(stderr, "first-driver: %s\n", what);
    return 1;
}

static int argmax(const float * row, int n) {
    int best = 0;
    for (int i = 1; i < n; ++i) {
        if (row[i] > row[best]) {
            best = i;
        }
    }
    return best;
}

struct options {
    int threads, steps, mode, kv_f32, flash_attn;
    float threshold; // < 0: the file's
};

static int parse_options(int argc, char ** argv, struct options * o) {
    int c;
    while ((c = getopt(argc, argv, "t:n:m:T:k:f")) != -1) {
        switch (c) {
            case 't': o->threads = atoi(optarg); break;
            case 'n': o->steps = atoi(optarg); break;
            case 'm': o->mode = strcmp(optarg, "full") == 0 ? LLAMA_FIRST_MODE_FULL : LLAMA_FIRST_MODE_FIRST; break;
            case 'T': o->threshold = (float) atof(optarg); break;
            case 'k': o->kv_f32 = strcmp(optarg, "f32") == 0; break;
            case 'f': o->flash_attn = 1; break;
            default: return -1;
        }
    }
    return argc - optind >= 3 && o->threads > 0 && o->steps >= 0 ? 0 : -1;
}

// Prefill bracketed by begin/end (the routers decide the mask), then the decode steps; every
// logits row goes to `out` and every argmax to `tokens`.
static int run(struct llama_context * ctx, int n_vocab, llama_token * prompt, int n_prompt,
               int steps, FILE * out, llama_token * tokens) {
    if (llama_first_begin_prefill(ctx) != 0) {
        return fail("llama_first_begin_prefill failed");
    }
    if (llama_decode(ctx, llama_batch_get_one(prompt, n_prompt)) != 0) {
        return fail("llama_decode of the prompt failed");
    }
    if (llama_first_end_prefill(ctx) != 0) {
        return fail("llama_first_end_prefill failed");
    }
    for (int s = 0; s <= steps; ++s) {
        const float * row = llama_get_logits_ith(ctx, -1);
        if (row == NULL || fwrite(row, sizeof(float), (size_t) n_vocab, out) != (size_t) n_vocab) {
            return fail("cannot read or write the logits");
        }
        tokens[s] = argmax(row, n_vocab);
        if (s < steps && llama_decode(ctx, llama_batch_get_one(&tokens[s], 1)) != 0) {
            return fail("llama_decode of a greedy token failed");
        }
    }
    return 0;
}

static void report(struct llama_context * ctx, int n_layer, int mode, const llama_token * tokens, int n_tokens) {
    uint8_t * mask = calloc((size_t) n_layer, 1);
    float * probs = calloc((size_t) n_layer, sizeof(float));
    llama_first_get_mask(ctx, mask, n_layer);
    printf("mask");
    for (int i = 0; i < n_layer; ++i) {
        printf(" %d", mask[i] ? 1 : 0);
    }
    if (mode == LLAMA_FIRST_MODE_FIRST && llama_first_get_probs(ctx, probs, n_layer) == n_layer) {
        printf("\nthreshold %.9g\nprobs", (double) llama_first_get_threshold(ctx));
        for (int i = 0; i < n_layer; ++i) {
            printf(" %.9g", (double) probs[i]);
        }
    }
    printf("\ntokens");
    for (int i = 0; i < n_tokens; ++i) {
        printf(" %d", tokens[i]);
    }
    printf("\n");
    free(mask);
    free(probs);
}

int main(int argc, char ** argv) {
    struct options o = {1, 4, LLAMA_FIRST_MODE_FIRST, 0, 0, -1.0f};
    if (parse_options(argc, argv, &o) != 0) {
        fprintf(stderr, "usage: %s [-t THREADS] [-n STEPS] [-m first|full] [-T THRESHOLD] [-k f16|f32] [-f] "
                        "MODEL OUT TOKEN...\n", argv[0]);
        return 2;
    }
    const char * model_path = argv[optind], * out_path = argv[optind + 1];
    int n_prompt = argc - optind - 2;
    llama_token * prompt = malloc(sizeof(llama_token) * (size_t) n_prompt);
    llama_token * tokens = malloc(sizeof(llama_token) * (size_t) (o.steps + 1));
    for (int i = 0; i < n_prompt; ++i) {
        prompt[i] = atoi(argv[optind + 2 + i]);
    }

    llama_log_set(quiet_log, NULL);
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    struct llama_model * model = llama_model_load_from_file(model_path, mp);
    if (model == NULL) {
        return fail("cannot load the model");
    }
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t) (n_prompt + o.steps + 16);
    cp.n_batch = cp.n_ubatch = (uint32_t) n_prompt;
    cp.n_threads = cp.n_threads_batch = o.threads;
    cp.no_perf = true;
    cp.flash_attn_type = o.flash_attn ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
    if (o.kv_f32) {
        cp.type_k = cp.type_v = GGML_TYPE_F32;
    }
    struct llama_context * ctx = llama_init_from_model(model, cp);
    if (ctx == NULL) {
        return fail("cannot create a context");
    }
    if (o.mode == LLAMA_FIRST_MODE_FIRST && llama_first_model_router_hidden(model) <= 0) {
        return fail("the model has no FiRST routers");
    }
    if (llama_first_set_mode(ctx, o.mode) != 0 || (o.threshold >= 0 && llama_first_set_threshold(ctx, o.threshold) != 0)) {
        return fail("cannot set the FiRST mode or threshold");
    }
    const int n_layer = llama_model_n_layer(model);
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    printf("key %s\nn_layer %d\nn_vocab %d\nn_prompt %d\n", llama_first_build_key(), n_layer, n_vocab, n_prompt);

    FILE * out = fopen(out_path, "wb");
    if (out == NULL) {
        return fail("cannot open the output file");
    }
    int rc = run(ctx, n_vocab, prompt, n_prompt, o.steps, out, tokens);
    if (fclose(out) != 0) {
        rc = fail("cannot write the output file");
    }
    if (rc == 0) {
        report(ctx, n_layer, o.mode, tokens, o.steps + 1);
    }
    llama_free(ctx);
    llama_model_free(model);
    free(prompt);
    free(tokens);
    return rc;
}
