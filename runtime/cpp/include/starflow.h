/* libstarflow: the STARFlow sampler over exported graphs, through ONNX Runtime's C API.
 *
 * Reads the directory `starflow export onnx` writes (manifest.json + ONNX graphs) and samples
 * with the numbers of the Python runtime (`starflow.runtime.Pipeline` / `Generator`).
 *
 * Errors: every call that can fail returns an `sf_status*`: NULL on success, otherwise an error
 * the caller owns (read it with sf_status_message, free it with sf_status_free). Bad input never
 * aborts or exits the process.
 *
 * Lifetimes: every object made by a `*_create`, `*_load` or an `out` parameter belongs to the
 * caller and is released by its `*_free` function (NULL is accepted). A pipeline does not keep
 * pointers to the config, sampling options or tensors passed to it; they may be freed at once.
 * Strings returned by `sf_*_message`, `sf_pipeline_stats` and `sf_pipeline_describe` stay valid
 * until their owner is freed (stats: until the next call on the pipeline).
 *
 * Threads: different pipelines may be used from different threads at the same time; one
 * pipeline runs one call at a time (calls on the same pipeline must not overlap). Tensors,
 * configs and sampling options are plain values without locks. Loading the ONNX Runtime library
 * is thread-safe; a process uses one ONNX Runtime library (the first one loaded).
 */
#ifndef STARFLOW_H
#define STARFLOW_H

#include <stddef.h>
#include <stdint.h>

#define SF_API __attribute__((visibility("default")))

#ifdef __cplusplus
extern "C" {
#endif

SF_API const char* sf_version(void);

/* ---- errors ---------------------------------------------------------------------------------- */
typedef struct sf_status sf_status;
SF_API const char* sf_status_message(const sf_status* status);
SF_API void sf_status_free(sf_status* status);

/* ---- tensors: dense row-major arrays (the element codes are ONNX's) ---------------------------- */
typedef enum { SF_FLOAT32 = 1, SF_INT64 = 7, SF_FLOAT16 = 10 } sf_dtype;
typedef struct sf_tensor sf_tensor;
/* A zero-filled tensor. */
SF_API sf_status* sf_tensor_create(sf_dtype dtype, const int64_t* shape, size_t rank, sf_tensor** out);
/* A .npy file (little-endian float32, float16 or int64, C order), or a .npy written from it. */
SF_API sf_status* sf_tensor_load_npy(const char* path, sf_tensor** out);
SF_API sf_status* sf_tensor_save_npy(const sf_tensor* tensor, const char* path);
/* Standard normal float32 noise of any shape from `seed`: what numpy draws for
 * `np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)`, starflow's noise
 * (starflow.core.generation.make_noise), so a seed gives the same images as `starflow generate`.
 * Bit for bit as measured on x86-64 glibc against numpy builds that do not fuse multiply-add;
 * another libm (its log1pf, exp) or an FMA-contracting numpy build may differ in rare values.
 * Python accepts any seed >= 0; seeds of 2**64 and more exist only there. */
SF_API sf_status* sf_tensor_noise(uint64_t seed, const int64_t* shape, size_t rank, sf_tensor** out);
SF_API sf_dtype sf_tensor_dtype(const sf_tensor* tensor);
SF_API size_t sf_tensor_rank(const sf_tensor* tensor);
SF_API const int64_t* sf_tensor_shape(const sf_tensor* tensor);
SF_API void* sf_tensor_data(sf_tensor* tensor);
SF_API void sf_tensor_free(sf_tensor* tensor);
/* Image `index` of an (N, H, W, C) float32 batch in [0, 1] (C = 1 or 3) as an 8-bit PNG; an image
 * with NaN or inf pixels gets a status (a PNG cannot hold them). */
SF_API sf_status* sf_image_save_png(const sf_tensor* images, size_t index, const char* path);

/* ---- outputs: the rules of every file written here (those of the Python writer) ---------------
 * sf_tensor_save_npy, sf_image_save_png and sf_pipeline_save_stats write into a hidden sibling
 * `.NAME.partial-PID-HOST-RANDOM` created exclusively (O_CREAT|O_EXCL|O_NOFOLLOW: never through a
 * planted name or link, never shared by two writers, threads or processes), flush it to disk and
 * rename it over NAME. NAME must be absent or a regular file: a symbolic link or a device (such as
 * /dev/full or /dev/stdout) is refused with a status, not replaced. Partials a killed process of
 * this host left are removed by the next write of that name. Files are read (exports, .npy inputs)
 * only when they are regular files: a FIFO or a device gets a status, never a hang. */
/* Whether `path` can take an output, before any work: its folder exists and takes a new file, and
 * `path` is absent or a regular file (`folder` non-zero: absent, a folder or a link to a folder). */
SF_API sf_status* sf_output_check(const char* path, int folder);
/* A new hidden folder beside `path` (named as the partials above; `path`'s stale ones are removed
 * first) to write a folder of outputs in; its path goes to `staged` (`capacity` bytes with the NUL).
 * Until it is placed, the writers above create each file there in place (exclusively, flushed to
 * disk): the folder is this process's alone, and placing it makes it whole at once. */
SF_API sf_status* sf_output_stage_folder(const char* path, char* staged, size_t capacity);
/* The finished `staged` folder to `path`: renamed into place whole when `path` does not exist, or
 * when it is a folder (a link to one, or one another writer has just made) its files moved in one
 * by one (same-named regular files replaced; anything else at a name is refused before any file
 * moves). `staged` is gone afterwards, whatever happened; the status says what `path` holds. */
SF_API sf_status* sf_output_place_folder(const char* staged, const char* path);

/* ---- how to load: precision, threads, the ONNX Runtime library, execution providers ------------ */
typedef struct sf_config sf_config;
SF_API sf_status* sf_config_create(sf_config** out);
/* "fp32" (default) or "fp16": which of the export's graph sets to run. */
SF_API sf_status* sf_config_set_precision(sf_config* config, const char* precision);
/* Intra-op threads per graph; 0 (default): all cores. */
SF_API sf_status* sf_config_set_threads(sf_config* config, int threads);
/* Path of libonnxruntime.so.1.*; NULL (default): the one beside libstarflow, then the system's. */
SF_API sf_status* sf_config_set_onnxruntime_library(sf_config* config, const char* path);
/* An ONNX Runtime execution provider by name, with its string options, tried in the order added
 * before the CPU one: "CUDA", "TensorRT", or any name ONNX Runtime's generic
 * SessionOptionsAppendExecutionProvider accepts. Built, not run: no GPU verified these here. */
SF_API sf_status* sf_config_add_provider(sf_config* config, const char* name, const char* const* keys,
                                         const char* const* values, size_t count);
SF_API void sf_config_free(sf_config* config);

/* ---- a loaded export --------------------------------------------------------------------------- */
typedef struct sf_pipeline sf_pipeline;
/* Checks manifest.json (schema version, digest, names, paths inside the directory, references)
 * and every file's sha256, then opens each graph once. `config` NULL: the defaults. */
SF_API sf_status* sf_pipeline_load(const char* artifacts_dir, const sf_config* config, sf_pipeline** out);
SF_API void sf_pipeline_free(sf_pipeline* pipeline);
/* JSON: latent channels, patch, sizes, text dim, max_rows (graph rows per call: guidance doubles a
 * batch, a frame-local block takes a row per frame of a clip), defaults, denoise kind,
 * video (null for an image export; else frames min/opt/max, window, context, later_chunk_factor,
 * warm_start, fps). */
SF_API const char* sf_pipeline_describe(const sf_pipeline* pipeline);

/* ---- sampling options: start from the export's defaults, change what you need ------------------ */
typedef struct sf_sampling sf_sampling;
SF_API sf_status* sf_sampling_create(const sf_pipeline* pipeline, sf_sampling** out);
/* A preset the export carries ("official": the defaults, as sf_sampling_create; others, e.g.
 * "fast", are calibrated for the model on sample quality; sf_pipeline_describe lists them). */
SF_API sf_status* sf_sampling_create_preset(const sf_pipeline* pipeline, const char* name, sf_sampling** out);
SF_API sf_status* sf_sampling_set_guidance(sf_sampling* sampling, double weight); /* >= 0; 0: none */
SF_API sf_status* sf_sampling_set_method(sf_sampling* sampling, const char* method); /* jacobi|sequential */
/* When a Jacobi chunk stops: "batch" (default, the official) is one test over every row of the
 * batch, so an image depends on what shares its batch; "row": each row stops on its own test and
 * then holds still, so an image is the same alone or in any batch (a server batching requests). */
SF_API sf_status* sf_sampling_set_stop(sf_sampling* sampling, const char* rule);
SF_API sf_status* sf_sampling_set_block_size(sf_sampling* sampling, int block_size);   /* >= 1 */
SF_API sf_status* sf_sampling_set_max_iter(sf_sampling* sampling, int max_iter);       /* >= 1 */
SF_API sf_status* sf_sampling_set_threshold(sf_sampling* sampling, double threshold);  /* >= 0 */
/* A Jacobi chunk's first guess: "noise" (the official) or "chunk-mean" (the previous chunk's mean
 * affine map applied to the chunk's noise). */
SF_API sf_status* sf_sampling_set_init(sf_sampling* sampling, const char* init);
/* Separate Jacobi settings for the shallow blocks (the setters above then apply to the deep one). */
SF_API sf_status* sf_sampling_set_shallow_jacobi(sf_sampling* sampling, int block_size, int max_iter,
                                                 double threshold, const char* init);
/* Clips (video exports; the defaults are the export's video section): the deep block attends to at
 * most `window` frames; when they are full its cache restarts from the last `context` frames,
 * re-encoded, and the next window adds window - context frames (the official rolling generation,
 * Jacobi only). window 0: no limit; context 0: window - 1; context < window; window at most what the
 * export's caches hold (sf_pipeline_describe's video.window, else video.frames.max). */
SF_API sf_status* sf_sampling_set_window(sf_sampling* sampling, int window, int context);
/* Clips: a Jacobi chunk after the first frame starts its first iteration from the tokens one frame
 * earlier (non-zero, the official default) or from its own noise (0). */
SF_API sf_status* sf_sampling_set_warm_start(sf_sampling* sampling, int on);
/* A sample or generation holding NaN or inf fails with a status (nothing is returned), as
 * `starflow generate --check-finite`: non-zero (the default) on, 0 off (the values are returned as
 * they are). */
SF_API sf_status* sf_sampling_set_check_finite(sf_sampling* sampling, int on);
SF_API void sf_sampling_free(sf_sampling* sampling);

/* ---- the stages -------------------------------------------------------------------------------- */
/* noise (B, C, H, W) float32 [, text (B, L, dim) float32 [, text_uncond, same shape]] -> latent.
 * Guidance > 0 needs text_uncond (the encoded empty prompt). A video export takes clips
 * (B, T, C, H, W) of T frames within its range (sf_pipeline_describe's video.frames) and gives
 * clips; an image export refuses clips and a video export images, with a status. */
SF_API sf_status* sf_pipeline_sample(sf_pipeline* pipeline, const sf_sampling* sampling, const sf_tensor* noise,
                                     const sf_tensor* text, const sf_tensor* text_uncond, sf_tensor** latent);
/* JSON list, one entry per block of the last sample call: block, method, iterations per chunk,
 * image_iterations (per chunk, the iterations each image of the batch ran: they differ under the
 * "row" stop rule), evaluations, tokens, seconds. "[]" before the first call. */
SF_API const char* sf_pipeline_stats(const sf_pipeline* pipeline);
/* sf_pipeline_stats's JSON written to `path` through a temporary file beside it, renamed when
 * complete: a failure leaves no partial file. */
SF_API sf_status* sf_pipeline_save_stats(const sf_pipeline* pipeline, const char* path);
/* Prompts (UTF-8; NULL entries are "") -> text embeddings (count, L, dim): sf_pipeline_tokenize,
 * then the text encoder graph. */
SF_API sf_status* sf_pipeline_encode_prompts(sf_pipeline* pipeline, const char* const* prompts, size_t count,
                                             sf_tensor** embeddings);
/* Prompts -> what the text encoder graph takes: token ids and attention mask, int64
 * (count, token_length), equal to the Python runtime's (TextEncoderRunner.tokenize). Label-table
 * exports look each prompt up; T5-family exports carry their SentencePiece model (spiece.model),
 * and the SentencePiece library tokenises with it as the export's tokenizer.json says (its added
 * tokens such as "</s>" matched in the text, "$A </s>", truncation keeping the "</s>", padding).
 * One known exception to "equal": a character the normalizer maps (e.g. the ligature U+FB01)
 * followed by combining marks or a zero-width joiner, or a letter with 3+ decomposed marks:
 * tokenizers maps such a grapheme cluster as a whole (measured: ~2% of such made-up strings
 * differ; none of a 1,341-string test corpus).
 * Prompts longer than token_length are truncated without a warning (Python warns). Other subword
 * tokenizers, and a tokenizer.json or model libstarflow cannot follow exactly (the status says
 * why; the export still loads and takes token ids), get a status: tokenise them with the
 * `tokenizers` library and pass the ids to sf_pipeline_encode_tokens. A prompt that is not valid
 * UTF-8, or that spells a byte piece ("<0xF0>") of a byte-fallback model, gets a status. */
SF_API sf_status* sf_pipeline_tokenize(sf_pipeline* pipeline, const char* const* prompts, size_t count,
                                       sf_tensor** ids, sf_tensor** mask);
/* Token ids and attention mask, int64 (B, token_length) -> text embeddings. Ids must be in
 * [0, V), V the export's tokenizer.json vocabulary (its model's ids and added tokens), mask values 0
 * or 1: anything else gets a status (a negative id would pick another token's embedding). */
SF_API sf_status* sf_pipeline_encode_tokens(sf_pipeline* pipeline, const sf_tensor* ids, const sf_tensor* mask,
                                            sf_tensor** embeddings);
/* The self-denoise step (needs an export made with it; sf_pipeline_describe's denoise_kind): for
 * images x - noise_std^2 * grad, grad the gradient of each sample's NLL through the blocks' fp32
 * forward and vjp graphs (whatever the pipeline's precision; text as for sampling), or for a video
 * export's learned denoiser, clips (B, T, C, H, W) -> x - step * correction, clips longer than the
 * export's video window in its overlapping windows. */
SF_API sf_status* sf_pipeline_denoise(sf_pipeline* pipeline, const sf_tensor* latent, const sf_tensor* text,
                                      sf_tensor** out);
/* Latents -> (N, H, W, C) float32 images in [0, 1] (the decoder graph, or identity); clips
 * (N, T, C, H, W) -> (N, T, H, W, C) frames. */
SF_API sf_status* sf_pipeline_decode(sf_pipeline* pipeline, const sf_tensor* latent, sf_tensor** images);
/* Prompts -> images, as Generator.generate: one image per prompt with its row of `noise`
 * (count, C, H, W); the uncond text is `negative_prompt` or ""; runs in batches of the export's
 * rows (max_rows, halved under guidance; clips: max_rows / T when a block is frame-local);
 * self-denoise when `denoise` is non-zero. `latents` may be NULL. A video export takes clip noise
 * (count, T, C, H, W) and gives clips (count, T, H, W, C) (as `starflow generate --frames T`). */
SF_API sf_status* sf_pipeline_generate(sf_pipeline* pipeline, const sf_sampling* sampling,
                                       const char* const* prompts, size_t count, const char* negative_prompt,
                                       const sf_tensor* noise, int denoise, sf_tensor** images,
                                       sf_tensor** latents);
/* Each sample's exact negative log-likelihood under the flow, in bits per latent dimension, as
 * Generator.bits_per_dim and StarFlow.nll per sample (the density graphs; an export made without them
 * gets a status): latents (B, C, H, W) float32, or clips (B, T, C, H, W) for a video export, and for
 * a text-conditioned model text (B, L, dim) float32, one row per sample (NULL otherwise; prompts ->
 * text: sf_pipeline_encode_prompts or sf_pipeline_encode_tokens) -> bits (B,) float32. Any B: runs in
 * batches of the export's rows, every batch checked before any graph runs. A pixel-space model's
 * latents are its images (N, H, W, C) in [0, 1] as (N, C, H, W) * 2 - 1. */
SF_API sf_status* sf_pipeline_log_likelihood(sf_pipeline* pipeline, const sf_tensor* latents, const sf_tensor* text,
                                             sf_tensor** bits);

#ifdef __cplusplus
}
#endif

#endif /* STARFLOW_H */
