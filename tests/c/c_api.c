/* Drives Acorn's C API as an app would; tests/tests/c_api.rs builds it with the system C
 * compiler (also under AddressSanitizer), runs it and compares what it writes with the Rust
 * API's results bit for bit.
 *
 *   c_api minilm MODEL IDS.i64 MASK.i64 BATCH LEN OUT.f32   embeddings of a tokenized batch
 *     (MODEL as FILE@OFFSET:LEN: the model stored inside a larger file, opened by descriptor)
 *   c_api vad MODEL AUDIO.f32 OUT.f32                      speech probability per 32 ms chunk
 *   c_api generate MODEL PROMPT MAX_TOKENS OUT.txt         greedy token ids, one per line
 *   c_api errors MINILM_MODEL DAMAGED_MODEL                bad input of every kind
 *   c_api intent CLASSIFIER OTHER_ENCODER HEAD_PATH OUT.txt  classify a fixed list of utterances
 *     (with and without exits), learn a new intent on the device, save and reload its head
 *     (OTHER_ENCODER: an encoder with other weights and no head)
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "acorn.h"

static int failures = 0;

#define CHECK(cond, ...)                                                                      \
  do {                                                                                        \
    if (!(cond)) {                                                                            \
      fprintf(stderr, "%s:%d: check failed: %s: ", __FILE__, __LINE__, #cond);                \
      fprintf(stderr, __VA_ARGS__);                                                           \
      fprintf(stderr, "\n");                                                                  \
      failures++;                                                                             \
    }                                                                                         \
  } while (0)

/* A call that must succeed: on failure print the library's message and stop. */
#define OK(call)                                                                              \
  do {                                                                                        \
    AcornStatus s_ = (call);                                                                  \
    if (s_ != ACORN_STATUS_OK) {                                                              \
      fprintf(stderr, "%s:%d: %s -> status %d: %s\n", __FILE__, __LINE__, #call, (int)s_,      \
              acorn_last_error());                                                            \
      exit(1);                                                                                \
    }                                                                                         \
  } while (0)

/* A call that must fail with `want` and leave a message. */
#define FAILS(call, want)                                                                     \
  do {                                                                                        \
    AcornStatus s_ = (call);                                                                  \
    CHECK(s_ == (want), "%s -> status %d, want %d (%s)", #call, (int)s_, (int)(want),         \
          acorn_last_error());                                                                \
    CHECK(strlen(acorn_last_error()) > 0, "%s left no message", #call);                       \
    if (s_ == (want)) printf("refused as expected: %s: %s\n", #call, acorn_last_error());     \
  } while (0)

static void *read_file(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (!f) {
    fprintf(stderr, "cannot open %s\n", path);
    exit(1);
  }
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  /* malloc's alignment suits every element type. */
  void *buf = malloc(n > 0 ? (size_t)n : 1);
  if (n > 0 && fread(buf, 1, (size_t)n, f) != (size_t)n) {
    fprintf(stderr, "cannot read %s\n", path);
    exit(1);
  }
  fclose(f);
  *len = (size_t)n;
  return buf;
}

static void write_file(const char *path, const void *data, size_t len) {
  FILE *f = fopen(path, "wb");
  if (!f || fwrite(data, 1, len, f) != len || fclose(f) != 0) {
    fprintf(stderr, "cannot write %s\n", path);
    exit(1);
  }
}

static AcornTensor tensor(const char *name, AcornDtype dtype, const int64_t *shape, size_t rank,
                          const void *data, size_t byte_len) {
  AcornTensor t = {name, dtype, shape, rank, data, byte_len};
  return t;
}

static int minilm(int argc, char **argv) {
  if (argc != 8) return 2;
  size_t ids_len, mask_len;
  int64_t *ids = read_file(argv[3], &ids_len);
  int64_t *mask = read_file(argv[4], &mask_len);
  int64_t shape[2] = {atoll(argv[5]), atoll(argv[6])};
  AcornModel model;
  char *at = strchr(argv[2], '@');
  if (at) {
    /* A region of a file, as an APK's uncompressed asset is: open the file, hand the library
     * the descriptor, close it again at once (the library keeps a duplicate). */
    *at = 0;
    unsigned long long offset = 0, len = 0;
    CHECK(sscanf(at + 1, "%llu:%llu", &offset, &len) == 2, "region %s", at + 1);
    int fd = open(argv[2], O_RDONLY);
    CHECK(fd >= 0, "open %s", argv[2]);
    OK(acorn_model_open_fd(fd, offset, len, &model));
    close(fd);
  } else {
    OK(acorn_model_open(argv[2], &model));
  }
  size_t n_in;
  OK(acorn_model_input_count(model, &n_in));
  for (size_t i = 0; i < n_in; i++) {
    AcornIoInfo info;
    OK(acorn_model_input(model, i, &info));
    printf("input %zu: %s, dtype %d, rank %lld\n", i, info.name, (int)info.dtype, (long long)info.rank);
  }
  AcornSession session;
  OK(acorn_session_new(model, 1, &session));
  /* The session keeps the model alive: the app may drop its handle now. */
  OK(acorn_model_free(model));
  AcornTensor in[2] = {
      tensor("input_ids", ACORN_DTYPE_I64, shape, 2, ids, ids_len),
      tensor("attention_mask", ACORN_DTYPE_I64, shape, 2, mask, mask_len),
  };
  OK(acorn_session_run(session, in, 2));
  AcornTensor out;
  OK(acorn_session_output_by_name(session, "461", &out));
  CHECK(out.dtype == ACORN_DTYPE_F32 && out.rank == 2 && out.shape[0] == shape[0] && out.shape[1] == 384,
        "embedding output: dtype %d rank %zu", (int)out.dtype, out.rank);
  write_file(argv[7], out.data, out.byte_len);
  OK(acorn_session_free(session));
  free(ids);
  free(mask);
  return failures ? 1 : 0;
}

static int vad(int argc, char **argv) {
  if (argc != 5) return 2;
  enum { CHUNK = 512, CONTEXT = 64 };
  size_t audio_len;
  float *audio = read_file(argv[3], &audio_len);
  size_t chunks = audio_len / sizeof(float) / CHUNK;
  AcornModel model;
  OK(acorn_model_open(argv[2], &model));
  AcornSession session;
  OK(acorn_session_new(model, 1, &session));
  float frame[CONTEXT + CHUNK] = {0};
  float state[2 * 128] = {0};
  int64_t sr = 16000;
  int64_t frame_shape[2] = {1, CONTEXT + CHUNK}, state_shape[3] = {2, 1, 128};
  float *probs = malloc(chunks * sizeof(float) + 1);
  for (size_t c = 0; c < chunks; c++) {
    memmove(frame, frame + CHUNK, CONTEXT * sizeof(float));
    memcpy(frame + CONTEXT, audio + c * CHUNK, CHUNK * sizeof(float));
    AcornTensor in[3] = {
        tensor("input", ACORN_DTYPE_F32, frame_shape, 2, frame, sizeof frame),
        tensor("state", ACORN_DTYPE_F32, state_shape, 3, state, sizeof state),
        tensor("sr", ACORN_DTYPE_I64, NULL, 0, &sr, sizeof sr),
    };
    OK(acorn_session_run(session, in, 3));
    AcornTensor p, s;
    OK(acorn_session_output(session, 0, &p));
    OK(acorn_session_output(session, 1, &s));
    CHECK(p.dtype == ACORN_DTYPE_F32 && p.byte_len == sizeof(float), "probability output");
    CHECK(s.byte_len == sizeof state, "state output: %zu bytes", s.byte_len);
    memcpy(&probs[c], p.data, sizeof(float));
    memcpy(state, s.data, sizeof state);
  }
  write_file(argv[4], probs, chunks * sizeof(float));
  printf("%zu chunks\n", chunks);
  OK(acorn_session_free(session));
  OK(acorn_model_free(model));
  free(probs);
  free(audio);
  return failures ? 1 : 0;
}

typedef struct {
  FILE *out;
  int count;
  int stop_after; /* 0: never */
  AcornGenerator self;
  AcornStatus reentrant; /* what a call back into the running generator returned */
  uint32_t ids[64];      /* the first tokens, for comparing two generations */
} Collect;

static int32_t on_token(void *user, const char *piece, size_t len, uint32_t token) {
  Collect *c = user;
  CHECK(strlen(piece) == len, "piece length");
  if (c->out) fprintf(c->out, "%u\n", token);
  if (c->count < 64) c->ids[c->count] = token;
  printf("%s", piece);
  fflush(stdout);
  c->count++;
  if (c->self.id != 0) c->reentrant = acorn_generate(c->self, "again", NULL, NULL, NULL, NULL);
  return c->stop_after != 0 && c->count >= c->stop_after;
}

static int generate(int argc, char **argv) {
  if (argc != 6) return 2;
  AcornModel model;
  OK(acorn_model_open(argv[2], &model));
  AcornGenerator gen;
  OK(acorn_generator_new(model, 1, 256, &gen));
  AcornGenerateOptions opts = acorn_generate_options_default();
  opts.max_tokens = (uint32_t)atoi(argv[4]);
  Collect c = {fopen(argv[5], "w"), 0, 0, {0}, ACORN_STATUS_OK, {0}};
  AcornGenerateStats stats;
  OK(acorn_generate(gen, argv[3], &opts, on_token, &c, &stats));
  fclose(c.out);
  printf("\n%u prompt tokens, %u generated (%.1f ms prefill, %.1f ms decode), stop reason %d\n",
         stats.prompt_tokens, stats.generated_tokens, stats.prefill_ms, stats.decode_ms,
         (int)stats.stop_reason);
  CHECK(stats.generated_tokens == (uint32_t)c.count, "stats count the callback's tokens");
  /* Self-speculative decoding with the model's exit after layer 16: the same greedy tokens. */
  OK(acorn_generator_reset(gen));
  AcornGenerateOptions spec = opts;
  spec.decoding = ACORN_DECODING_SPECULATIVE;
  spec.exit_layer = 16;
  spec.draft_tokens = 3;
  Collect s = {NULL, 0, 0, {0}, ACORN_STATUS_OK, {0}};
  OK(acorn_generate(gen, argv[3], &spec, on_token, &s, &stats));
  printf("\n");
  CHECK(s.count == c.count && memcmp(s.ids, c.ids, sizeof(uint32_t) * (size_t)(c.count < 64 ? c.count : 64)) == 0,
        "speculative tokens differ from plain decoding");
  CHECK(stats.mean_layers_per_token == 30.0, "layers per token %.2f", stats.mean_layers_per_token);
  spec.exit_layer = 9; /* no exit there */
  FAILS(acorn_generate(gen, argv[3], &spec, NULL, NULL, NULL), ACORN_STATUS_INPUT);
  spec.decoding = 7;
  FAILS(acorn_generate(gen, argv[3], &spec, NULL, NULL, NULL), ACORN_STATUS_INVALID_ARGUMENT);
  OK(acorn_generator_reset(gen));
  /* The callback stops it after 3 tokens; a call back into the busy generator is refused. */
  OK(acorn_generator_reset(gen));
  Collect stop = {NULL, 0, 3, gen, ACORN_STATUS_OK, {0}};
  OK(acorn_generate(gen, argv[3], &opts, on_token, &stop, &stats));
  printf("\n");
  CHECK(stop.count == 3 && stats.generated_tokens == 3, "stopped after %d tokens", stop.count);
  CHECK(stats.stop_reason == ACORN_STOP_REASON_CANCELLED, "stop reason %d", (int)stats.stop_reason);
  CHECK(stop.reentrant == ACORN_STATUS_BUSY, "reentrant call -> %d", (int)stop.reentrant);
  /* Token-id prompts, and a prompt longer than the context. */
  uint32_t ids[2] = {504, 3458};
  OK(acorn_generate_tokens(gen, ids, 2, &opts, NULL, NULL, NULL));
  OK(acorn_generator_reset(gen));
  uint32_t *many = calloc(300, sizeof(uint32_t));
  FAILS(acorn_generate_tokens(gen, many, 300, &opts, NULL, NULL, NULL), ACORN_STATUS_INPUT);
  FAILS(acorn_generate_tokens(gen, many, 0, &opts, NULL, NULL, NULL), ACORN_STATUS_INPUT);
  free(many);
  AcornGenerateOptions bad = opts;
  bad.top_p = 0.0f;
  bad.temperature = 1.0f;
  FAILS(acorn_generate(gen, "hi", &bad, NULL, NULL, NULL), ACORN_STATUS_INPUT);
  FAILS(acorn_generate(gen, NULL, &opts, NULL, NULL, NULL), ACORN_STATUS_NULL_ARGUMENT);
  FAILS(acorn_generate(gen, "\xff\xfe", &opts, NULL, NULL, NULL), ACORN_STATUS_INVALID_ARGUMENT);
  OK(acorn_generator_cancel(gen));
  OK(acorn_generator_free(gen));
  FAILS(acorn_generator_free(gen), ACORN_STATUS_INVALID_HANDLE);
  FAILS(acorn_generate(gen, "hi", &opts, NULL, NULL, NULL), ACORN_STATUS_INVALID_HANDLE);
  OK(acorn_model_free(model));
  return failures ? 1 : 0;
}

static int errors(int argc, char **argv) {
  if (argc != 4) return 2;
  AcornModel model, none = {0}, made_up = {0x7fffffff12345ull};
  /* Opening. */
  FAILS(acorn_model_open(NULL, &model), ACORN_STATUS_NULL_ARGUMENT);
  FAILS(acorn_model_open(argv[2], NULL), ACORN_STATUS_NULL_ARGUMENT);
  FAILS(acorn_model_open("/nonexistent/model.acorn", &model), ACORN_STATUS_IO);
  FAILS(acorn_model_open_fd(-1, 0, 16, &model), ACORN_STATUS_INVALID_ARGUMENT);
  FAILS(acorn_model_open_fd(987654, 0, 16, &model), ACORN_STATUS_IO);
  FAILS(acorn_model_open_fd(0, 0, 16, NULL), ACORN_STATUS_NULL_ARGUMENT);
  {
    /* A region past the end of the file. */
    int fd = open(argv[2], O_RDONLY);
    FAILS(acorn_model_open_fd(fd, 1ull << 40, 4096, &model), ACORN_STATUS_INPUT);
    close(fd);
  }
  AcornStatus damaged = acorn_model_open(argv[3], &model);
  CHECK(damaged == ACORN_STATUS_FORMAT || damaged == ACORN_STATUS_CHECKSUM, "damaged file -> %d (%s)",
        (int)damaged, acorn_last_error());
  printf("refused as expected: damaged file: %s\n", acorn_last_error());
  const char garbage[] = "this is not an acorn file at all, just text........................";
  FAILS(acorn_model_open_bytes((const uint8_t *)garbage, sizeof garbage, &model), ACORN_STATUS_FORMAT);
  FAILS(acorn_model_open_bytes(NULL, 10, &model), ACORN_STATUS_NULL_ARGUMENT);
  /* Handles that name nothing. */
  size_t n;
  FAILS(acorn_model_input_count(none, &n), ACORN_STATUS_INVALID_HANDLE);
  FAILS(acorn_model_input_count(made_up, &n), ACORN_STATUS_INVALID_HANDLE);
  FAILS(acorn_model_free(none), ACORN_STATUS_INVALID_HANDLE);

  size_t len;
  void *bytes = read_file(argv[2], &len);
  OK(acorn_model_open_bytes(bytes, len, &model));
  free(bytes); /* the library copied them */
  FAILS(acorn_model_input_count(model, NULL), ACORN_STATUS_NULL_ARGUMENT);
  AcornIoInfo info;
  FAILS(acorn_model_input(model, 99, &info), ACORN_STATUS_INVALID_ARGUMENT);
  AcornSession session;
  OK(acorn_session_new(model, 2, &session));
  AcornSession wrong_kind = {model.id};
  FAILS(acorn_session_run(wrong_kind, NULL, 0), ACORN_STATUS_INVALID_HANDLE);
  AcornGenerator gen;
  FAILS(acorn_generator_new(model, 1, 0, &gen), ACORN_STATUS_NO_TEXT);

  int64_t ids[8] = {101, 7592, 2088, 102, 0, 0, 0, 0}, mask[8] = {1, 1, 1, 1, 0, 0, 0, 0};
  int64_t shape[2] = {1, 8}, shape3[3] = {1, 1, 8}, negative[2] = {1, -8};
  float fids[8] = {0};
  AcornTensor good[2] = {tensor("input_ids", ACORN_DTYPE_I64, shape, 2, ids, sizeof ids),
                         tensor("attention_mask", ACORN_DTYPE_I64, shape, 2, mask, sizeof mask)};
  OK(acorn_session_run(session, good, 2));
  AcornTensor out;
  FAILS(acorn_session_output(session, 5, &out), ACORN_STATUS_INVALID_ARGUMENT);
  FAILS(acorn_session_output(session, 0, NULL), ACORN_STATUS_NULL_ARGUMENT);
  FAILS(acorn_session_output_by_name(session, "nope", &out), ACORN_STATUS_INVALID_ARGUMENT);
  /* Bad inputs: each refused, and the session still runs afterwards. */
  AcornTensor t[2];
  memcpy(t, good, sizeof t);
  t[0] = tensor("input_ids", ACORN_DTYPE_F32, shape, 2, fids, sizeof fids);
  FAILS(acorn_session_run(session, t, 2), ACORN_STATUS_INPUT);
  t[0] = tensor("input_ids", ACORN_DTYPE_I64, shape3, 3, ids, sizeof ids);
  FAILS(acorn_session_run(session, t, 2), ACORN_STATUS_INPUT);
  t[0] = tensor("input_ids", ACORN_DTYPE_I64, shape, 2, ids, sizeof ids - 8);
  FAILS(acorn_session_run(session, t, 2), ACORN_STATUS_INPUT);
  t[0] = tensor("input_ids", ACORN_DTYPE_I64, negative, 2, ids, sizeof ids);
  FAILS(acorn_session_run(session, t, 2), ACORN_STATUS_INVALID_ARGUMENT);
  t[0] = tensor("input_ids", (AcornDtype)99, shape, 2, ids, sizeof ids);
  FAILS(acorn_session_run(session, t, 2), ACORN_STATUS_INVALID_ARGUMENT);
  t[0] = tensor("input_ids", ACORN_DTYPE_I64, shape, 2, NULL, sizeof ids);
  FAILS(acorn_session_run(session, t, 2), ACORN_STATUS_NULL_ARGUMENT);
  t[0] = tensor("input_ids", ACORN_DTYPE_I64, NULL, 2, ids, sizeof ids);
  FAILS(acorn_session_run(session, t, 2), ACORN_STATUS_NULL_ARGUMENT);
  t[0] = tensor(NULL, ACORN_DTYPE_I64, shape, 2, ids, sizeof ids);
  FAILS(acorn_session_run(session, t, 2), ACORN_STATUS_NULL_ARGUMENT);
  t[0] = tensor("no_such_input", ACORN_DTYPE_I64, shape, 2, ids, sizeof ids);
  FAILS(acorn_session_run(session, t, 2), ACORN_STATUS_INPUT);
  FAILS(acorn_session_run(session, good, 1), ACORN_STATUS_INPUT);
  FAILS(acorn_session_run(session, NULL, 2), ACORN_STATUS_NULL_ARGUMENT);
  /* Misaligned data: refused by the op that reads it, never read out of bounds. */
  int64_t *spare = malloc(sizeof ids + 1);
  memcpy((char *)spare + 1, ids, sizeof ids);
  t[0] = tensor("input_ids", ACORN_DTYPE_I64, shape, 2, (char *)spare + 1, sizeof ids);
  AcornStatus misaligned = acorn_session_run(session, t, 2);
  CHECK(misaligned != ACORN_STATUS_PANIC, "misaligned -> %d", (int)misaligned);
  printf("misaligned input: status %d %s\n", (int)misaligned, misaligned ? acorn_last_error() : "(read as is)");
  free(spare);
  OK(acorn_session_run(session, good, 2));
  size_t outs;
  OK(acorn_session_output_count(session, &outs));
  CHECK(outs >= 1, "outputs after a good run: %zu", outs);

  /* Freeing twice, using after free. */
  OK(acorn_session_free(session));
  FAILS(acorn_session_free(session), ACORN_STATUS_INVALID_HANDLE);
  FAILS(acorn_session_run(session, good, 2), ACORN_STATUS_INVALID_HANDLE);
  FAILS(acorn_session_output_count(session, &outs), ACORN_STATUS_INVALID_HANDLE);
  OK(acorn_model_free(model));
  FAILS(acorn_model_free(model), ACORN_STATUS_INVALID_HANDLE);
  FAILS(acorn_session_new(model, 1, &session), ACORN_STATUS_INVALID_HANDLE);

#ifdef ACORN_PANIC_TEST
  /* A panic inside the library is a status, not an abort. */
  FAILS(acorn_debug_panic(), ACORN_STATUS_PANIC);
#endif
  printf("library %s: %s\n", acorn_version(), failures ? "FAILED" : "all bad input refused");
  return failures ? 1 : 0;
}

static const char *UTTERANCES[] = {
    "set a timer for twenty minutes", "what's the weather like in rome tomorrow",
    "turn off the kitchen lights", "text sam that i'm running late", "what's the capital of peru",
};

/* Classification and on-device learning. OUT gets, per utterance, "label exit_layer layers"
 * with exits and then without. */
static int intent(int argc, char **argv) {
  if (argc != 6) return 2;
  AcornModel model, other;
  OK(acorn_model_open(argv[2], &model));
  OK(acorn_model_open(argv[3], &other));
  AcornClassifier clf;
  OK(acorn_classifier_new(model, 1, &clf));
  size_t labels;
  OK(acorn_classifier_label_count(clf, &labels));
  CHECK(labels == 16, "%zu labels", labels);
  const size_t n = sizeof UTTERANCES / sizeof *UTTERANCES;
  AcornPrediction p[5];
  FILE *out = fopen(argv[5], "w");
  for (int pass = 0; pass < 2; pass++) {
    OK(acorn_classifier_set_exits(clf, pass == 0));
    OK(acorn_classify(clf, UTTERANCES, n, p));
    for (size_t i = 0; i < n; i++) {
      const char *label;
      OK(acorn_classifier_label(clf, p[i].label, &label));
      fprintf(out, "%s %u %u\n", label, p[i].exit_layer, p[i].layers);
      printf("%-45s %-13s %.3f layer %u/%u\n", UTTERANCES[i], label, p[i].score, p[i].exit_layer, p[i].layers);
    }
  }
  fclose(out);
  /* Thresholds: one per exit, each in (0, 1]. */
  float bad[1] = {0.5f}, zero[5] = {0, 0, 0, 0, 0};
  FAILS(acorn_classifier_set_thresholds(clf, bad, 1), ACORN_STATUS_INPUT);
  FAILS(acorn_classifier_set_thresholds(clf, zero, 5), ACORN_STATUS_INPUT);
  FAILS(acorn_classifier_set_thresholds(clf, NULL, 5), ACORN_STATUS_NULL_ARGUMENT);
  const char *label;
  FAILS(acorn_classifier_label(clf, 99, &label), ACORN_STATUS_INVALID_ARGUMENT);
  FAILS(acorn_classify(clf, NULL, 1, p), ACORN_STATUS_NULL_ARGUMENT);
  const char *bad_utf8[1] = {"\xff\xfe"};
  FAILS(acorn_classify(clf, bad_utf8, 1, p), ACORN_STATUS_INVALID_ARGUMENT);
  AcornClassifier none_clf;
  FAILS(acorn_classifier_new(other, 1, &none_clf), ACORN_STATUS_INPUT); /* a plain encoder: no head */

  /* On-device learning: a new intent from five utterances, with two known ones. */
  static const char *LEARN[][2] = {
      {"tv_on", "turn on the tv"},        {"tv_on", "switch the television on"},
      {"tv_on", "put the telly on"},      {"tv_on", "can you turn the tv on"},
      {"tv_on", "power on the tv"},       {"weather", "is it going to rain today"},
      {"weather", "what's the forecast"}, {"timer", "set a timer for ten minutes"},
      {"timer", "start a five minute countdown"},
  };
  AcornEmbedder emb;
  OK(acorn_embedder_new(model, 1, &emb));
  size_t dim;
  OK(acorn_embed(emb, "hello", NULL, 0, &dim));
  CHECK(dim == 384, "embedding width %zu", dim);
  float *x = malloc(dim * sizeof *x), small[4];
  FAILS(acorn_embed(emb, "hello", small, 4, &dim), ACORN_STATUS_INVALID_ARGUMENT);
  AcornTrainer trainer;
  OK(acorn_trainer_new(&trainer));
  for (size_t i = 0; i < sizeof LEARN / sizeof *LEARN; i++) {
    OK(acorn_embed(emb, LEARN[i][1], x, dim, &dim));
    OK(acorn_trainer_add(trainer, LEARN[i][0], x, dim));
  }
  FAILS(acorn_trainer_add(trainer, "", x, dim), ACORN_STATUS_INPUT);
  FAILS(acorn_trainer_add(trainer, "short", x, 10), ACORN_STATUS_INPUT);
  AcornHead head;
  FAILS(acorn_trainer_fit(trainer, 7, &head), ACORN_STATUS_INVALID_ARGUMENT);
  OK(acorn_trainer_fit(trainer, ACORN_HEAD_KIND_PROTOTYPE, &head));
  int32_t l;
  float score;
  OK(acorn_embed(emb, "switch on the tv please", x, dim, &dim));
  OK(acorn_head_predict(head, x, dim, 0.3f, &l, &score));
  const int32_t l_saved = l;
  const float score_saved = score;
  CHECK(l >= 0, "unknown (%.3f)", score);
  if (l >= 0) {
    OK(acorn_head_label(head, (size_t)l, &label));
    CHECK(strcmp(label, "tv_on") == 0, "predicted %s", label);
    printf("learned on the device: 'switch on the tv please' -> %s %.3f\n", label, score);
  }
  /* Past any probability the head gives this utterance: unknown. */
  OK(acorn_head_predict(head, x, dim, 1.0f, &l, &score));
  CHECK(l == -1 || score >= 1.0f, "threshold 1.0 gave label %d at %.6f", l, score);
  FAILS(acorn_head_predict(head, x, dim, 0.0f, &l, &score), ACORN_STATUS_INPUT);
  FAILS(acorn_head_predict(head, x, dim, 1.5f, &l, &score), ACORN_STATUS_INPUT);
  /* Saved with its encoder; another encoder refuses it. */
  OK(acorn_head_save(head, model, argv[4]));
  AcornHead loaded;
  OK(acorn_head_load(model, argv[4], &loaded));
  int32_t l2;
  float score2;
  OK(acorn_head_predict(loaded, x, dim, 0.3f, &l2, &score2));
  CHECK(l2 == l_saved && score2 == score_saved, "reloaded head answers %d %.6f, saved one %d %.6f", l2, score2,
        l_saved, score_saved);
  FAILS(acorn_head_load(other, argv[4], &loaded), ACORN_STATUS_INPUT);
  /* Handles of the wrong kind and after free. */
  AcornHead not_a_head = {trainer.id};
  FAILS(acorn_head_predict(not_a_head, x, dim, 0.5f, &l, &score), ACORN_STATUS_INVALID_HANDLE);
  OK(acorn_head_free(head));
  FAILS(acorn_head_free(head), ACORN_STATUS_INVALID_HANDLE);
  OK(acorn_head_free(loaded));
  OK(acorn_trainer_free(trainer));
  OK(acorn_embedder_free(emb));
  OK(acorn_classifier_free(clf));
  FAILS(acorn_classify(clf, UTTERANCES, n, p), ACORN_STATUS_INVALID_HANDLE);
  OK(acorn_model_free(model));
  OK(acorn_model_free(other));
  free(x);
  printf("intent: %s\n", failures ? "FAILED" : "ok");
  return failures ? 1 : 0;
}

int main(int argc, char **argv) {
  int rc = 2;
  if (argc >= 2 && strcmp(argv[1], "minilm") == 0) rc = minilm(argc, argv);
  if (argc >= 2 && strcmp(argv[1], "vad") == 0) rc = vad(argc, argv);
  if (argc >= 2 && strcmp(argv[1], "generate") == 0) rc = generate(argc, argv);
  if (argc >= 2 && strcmp(argv[1], "errors") == 0) rc = errors(argc, argv);
  if (argc >= 2 && strcmp(argv[1], "intent") == 0) rc = intent(argc, argv);
  if (rc == 2) fprintf(stderr, "usage: see the top of c_api.c\n");
  return rc;
}
