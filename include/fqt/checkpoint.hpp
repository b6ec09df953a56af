// fqt/checkpoint.hpp — safetensors files and training checkpoints.
//
// safetensors (https://github.com/huggingface/safetensors): an 8-byte little-endian u64 N, then
// N bytes of JSON header
//   {"name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ...,
//    "__metadata__": {"key": "value", ...}}
// (padded with spaces to a multiple of 8), then the data buffer; offsets are relative to the
// start of the buffer, little-endian, C order. fqt reads and writes F32, F64, I8, U8, I32, and
// I64 (held in SafeTensors::int64s since Tensor has no 64-bit integer dtype).
//
// Readers validate everything and throw InputError "<file>: <problem>" for a short file, an
// absurd header size, bad JSON, a missing or unsupported dtype, a malformed shape, offsets that
// are out of range, overlap, leave holes or do not match shape x item size.
//
// Writers are atomic: the file is written to "<path>.tmp.<pid>", flushed and fsync'ed, renamed
// over <path>, and the folder is fsync'ed. On failure the temporary file is removed, an existing
// <path> is left as it was, and InputError says what went wrong.
//
// A checkpoint is a safetensors file with tensors
//   param/<name>     f32 master weights           (one per Param)
//   buffer/<name>    module buffers (batch-norm running statistics)
//   momentum/<name>  SGD momentum buffers, present once the optimizer has taken a step
// and string metadata "fqt.*" (format version, epoch, step, seed, RNG counters, config JSON,
// optimizer settings). Restoring is bit-exact.
#pragma once

#include "fqt/optim.hpp"
#include "fqt/tensor.hpp"

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace fqt {

// ---- safetensors ---------------------------------------------------------------------------

struct I64Tensor {
  Shape shape;
  std::vector<int64_t> values;  // shape_numel(shape) values, C order
};

struct SafeTensors {
  std::map<std::string, Tensor> tensors;     // F32, F64, I8, U8, I32
  std::map<std::string, I64Tensor> int64s;   // I64
  std::map<std::string, std::string> metadata;

  bool contains(const std::string& name) const { return tensors.count(name) || int64s.count(name); }
};

using NamedTensors = std::vector<std::pair<std::string, Tensor>>;
using NamedI64Tensors = std::vector<std::pair<std::string, I64Tensor>>;

// The complete file image (what write_safetensors writes). Names must be unique, non-empty and
// not "__metadata__" (InputError otherwise).
std::string serialize_safetensors(const NamedTensors& tensors, const std::map<std::string, std::string>& metadata = {},
                                  const NamedI64Tensors& int64s = {});
void write_safetensors(const std::string& path, const NamedTensors& tensors,
                       const std::map<std::string, std::string>& metadata = {}, const NamedI64Tensors& int64s = {});

// Any file written the same atomic way as the checkpoints (temporary file, fsync, rename; the
// previous file unchanged on failure, which is an InputError naming the file).
void write_file_atomic(const std::string& path, const std::string& bytes);

// The first half of write_file_atomic: the bytes written to `path`'s temporary file and fsync'ed,
// `path` itself not touched yet (a `path` that exists and is not a regular file is refused here).
// commit() renames the temporary over `path`, then fsyncs the folder; it throws InputError when
// the rename fails (the temporary removed, `path` as it was, committed() false) and when the
// folder's fsync fails (`path` already replaced, committed() true). An uncommitted StagedFile
// removes its temporary when destroyed. Lets a writer put several files on disk before replacing
// any of their predecessors.
class StagedFile {
 public:
  StagedFile(const std::string& path, const std::string& bytes);
  StagedFile(const StagedFile&) = delete;
  StagedFile& operator=(const StagedFile&) = delete;
  ~StagedFile();
  void commit();
  bool committed() const { return committed_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::string tmp_;  // empty once commit() was called
  bool committed_ = false;
};

// The name under which a save keeps the file `path` it replaces while its new one lands: this
// prefix, then the saving process's pid (train's first save of a --resume / --overwrite run;
// trainer.cpp's save_pending and recover_interrupted_save; load_checkpoint names it when `path`
// is missing).
inline std::string aside_prefix(const std::string& path) { return path + ".replaced.tmp."; }

// rename(2) (0, or -1 with errno set) through the commit fault hook below, for writers' own
// renames (a save's asides, its rollback) so that tests can fail them.
int rename_file(const std::string& from, const std::string& to);

// Parses an in-memory file image; `name` is used in messages. Exposed for tests and fuzzing.
SafeTensors parse_safetensors(const std::string& bytes, const std::string& name);
SafeTensors read_safetensors(const std::string& path);
// Only the "__metadata__" of a file (reads just the header).
std::map<std::string, std::string> read_safetensors_metadata(const std::string& path);

// ---- checkpoints ---------------------------------------------------------------------------

inline constexpr int kCheckpointVersion = 1;

struct TrainState {
  int64_t epoch = 0;  // epochs completed
  int64_t step = 0;   // global optimizer steps completed
  uint64_t seed = 0;  // run seed
  std::string config_json;                        // the run configuration, verbatim
  std::map<std::string, uint64_t> rng_counters;   // e.g. {"data.shuffle": 17}
  std::map<std::string, std::string> extra;       // anything else the trainer wants back
  // The optimizer settings the checkpoint was saved with (fqt.optimizer = "sgd", fqt.sgd.momentum,
  // .weight_decay, .nesterov), filled in by load_checkpoint (read_checkpoint_state leaves the
  // defaults); save_checkpoint writes the optimizer's own options, not these.
  SGDOptions sgd;
};

using NamedBuffers = std::vector<std::pair<std::string, Tensor*>>;

// Writes params, buffers, the optimizer's momentum buffers (if initialised) and the state
// atomically. Momentum buffers are saved under the names of opt.params().
void save_checkpoint(const std::string& path, const std::vector<Param*>& params, const NamedBuffers& buffers,
                     const SGD& opt, const TrainState& state);
// The bytes save_checkpoint writes (for StagedFile).
std::string serialize_checkpoint(const std::vector<Param*>& params, const NamedBuffers& buffers, const SGD& opt,
                                 const TrainState& state);

// Validates the whole file against the model first — every param/buffer/momentum tensor
// present with the model's shape and dtype, no tensor the model does not have, no NaN/Inf in any
// f32 tensor, supported format version, well-formed metadata (epoch/step/seed/RNG counters;
// fqt.config present; fqt.optimizer "sgd" with fqt.sgd.momentum and .weight_decay in [0, 1),
// .nesterov and .momentum_initialized 0 or 1, the latter set exactly when the momentum/* tensors
// are there) — then copies the values into the existing tensors (storage
// is kept, so modules see the new values) and restores the optimizer. On any validation error
// nothing is modified and InputError names the tensor.
// `model_for`, when given, says what the model was built for (e.g. "the 1x20x20 images of
// <file>"): a shape mismatch then names it, since the input size shapes the first layers.
TrainState load_checkpoint(const std::string& path, const std::vector<Param*>& params, const NamedBuffers& buffers,
                           SGD& opt, const std::string& model_for = "");

// The TrainState of a checkpoint without loading tensors (e.g. to read the config to resume).
TrainState read_checkpoint_state(const std::string& path);

namespace detail {
// Test hook: when >= 0, the next atomic write fails as if the disk filled up after this many
// bytes (the partial temporary file is then removed). Reset to -1 after it fires.
void set_write_fault_for_testing(int64_t fail_after_bytes);
// Test hook: when nonzero, the next atomic write's temporary file cannot be created, as if open()
// failed with this errno (e.g. EACCES for a read-only folder, which root would not see). One-shot.
void set_open_fault_for_testing(int err);
// Test hook: the next commit (rename into place) or rename_file to a path ending in
// `path_suffix` fails as if rename() returned this errno (e.g. EPERM for an immutable file), or
// with after_rename, as if the folder's fsync after the rename did (EIO); `skip` matching renames
// go through first. One-shot each; several can be armed; err 0 disarms them all.
void set_commit_fault_for_testing(const std::string& path_suffix, int err, bool after_rename = false, int skip = 0);
}  // namespace detail

}  // namespace fqt
