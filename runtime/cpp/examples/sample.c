/* Load an export, sample a latent with guidance from numpy files, write it: libstarflow's C API.
 *
 * usage: sample_c ARTIFACTS NOISE.npy TEXT.npy TEXT_UNCOND.npy GUIDANCE OUT.npy
 */
#include <stdio.h>
#include <stdlib.h>

#include <starflow.h>

/* Prints the error (if any), frees it, and says whether the call failed. */
static int failed(sf_status* status) {
  if (!status) return 0;
  fprintf(stderr, "sample_c: %s\n", sf_status_message(status));
  sf_status_free(status);
  return 1;
}

int main(int argc, char** argv) {
  if (argc != 7) {
    fprintf(stderr, "usage: %s ARTIFACTS NOISE.npy TEXT.npy TEXT_UNCOND.npy GUIDANCE OUT.npy\n", argv[0]);
    return 2;
  }
  sf_config* config = NULL;
  sf_pipeline* pipeline = NULL;
  sf_sampling* sampling = NULL;
  sf_tensor *noise = NULL, *text = NULL, *uncond = NULL, *latent = NULL;
  int code = 1;

  if (failed(sf_config_create(&config)) || failed(sf_config_set_threads(config, 1))) goto done;
  if (failed(sf_pipeline_load(argv[1], config, &pipeline))) goto done;
  if (failed(sf_sampling_create(pipeline, &sampling))) goto done; /* the export's defaults */
  if (failed(sf_sampling_set_guidance(sampling, atof(argv[5])))) goto done;
  if (failed(sf_tensor_load_npy(argv[2], &noise)) || failed(sf_tensor_load_npy(argv[3], &text)) ||
      failed(sf_tensor_load_npy(argv[4], &uncond)))
    goto done;
  if (failed(sf_pipeline_sample(pipeline, sampling, noise, text, uncond, &latent))) goto done;
  if (failed(sf_tensor_save_npy(latent, argv[6]))) goto done;
  printf("latent (%lld, %lld, %lld, %lld) written to %s\n", (long long)sf_tensor_shape(latent)[0],
         (long long)sf_tensor_shape(latent)[1], (long long)sf_tensor_shape(latent)[2],
         (long long)sf_tensor_shape(latent)[3], argv[6]);
  printf("blocks: %s\n", sf_pipeline_stats(pipeline));
  code = 0;

done: /* every free function accepts NULL */
  sf_tensor_free(latent);
  sf_tensor_free(uncond);
  sf_tensor_free(text);
  sf_tensor_free(noise);
  sf_sampling_free(sampling);
  sf_pipeline_free(pipeline);
  sf_config_free(config);
  return code;
}
