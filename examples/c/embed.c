/* A sentence embedding from C (the README's C example; tests/tests/c_api.rs builds and runs it).
 *   cc -I runtime/ffi/include examples/c/embed.c target/release/libacorn_ffi.a -lpthread -ldl -lm -o embed
 *   ./embed minilm.acorn
 */
#include <stdio.h>

#include "acorn.h"

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: embed MODEL.acorn\n");
    return 2;
  }
  AcornModel model;
  AcornSession session;
  if (acorn_model_open(argv[1], &model) != ACORN_STATUS_OK ||
      acorn_session_new(model, 1, &session) != ACORN_STATUS_OK) {
    fprintf(stderr, "error: %s\n", acorn_last_error());
    return 1;
  }
  int64_t ids[6] = {101, 2735, 2125, 1996, 4597, 102}; /* "turn on the lights" */
  int64_t mask[6] = {1, 1, 1, 1, 1, 1};
  int64_t shape[2] = {1, 6};
  AcornTensor inputs[2] = {
      {"input_ids", ACORN_DTYPE_I64, shape, 2, ids, sizeof ids},
      {"attention_mask", ACORN_DTYPE_I64, shape, 2, mask, sizeof mask},
  };
  size_t n = 0;
  if (acorn_session_run(session, inputs, 2) != ACORN_STATUS_OK ||
      acorn_session_output_count(session, &n) != ACORN_STATUS_OK) {
    fprintf(stderr, "error: %s\n", acorn_last_error());
    return 1;
  }
  for (size_t i = 0; i < n; i++) {
    AcornTensor out; /* owned by the session until its next run or free */
    acorn_session_output(session, i, &out);
    printf("%s: dtype %d, shape [", out.name, (int)out.dtype);
    for (size_t d = 0; d < out.rank; d++) printf(d ? ", %lld" : "%lld", (long long)out.shape[d]);
    printf("]");
    if (out.dtype == ACORN_DTYPE_F32) printf(" %.4f ...", ((const float *)out.data)[0]);
    printf("\n");
  }
  acorn_session_free(session);
  acorn_model_free(model);
  return 0;
}
