// Training checkpoints on top of safetensors (see fqt/checkpoint.hpp).
#include "fqt/checkpoint.hpp"

#include <charconv>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <set>

namespace fqt {

namespace {

const char* const kFormat = "fqt-checkpoint";

std::string f2s(float v) { return fmt::format("{}", v); }  // shortest round-trip form

std::map<std::string, std::string> state_metadata(const TrainState& s) {
  std::map<std::string, std::string> m;
  m["fqt.format"] = kFormat;
  m["fqt.version"] = std::to_string(kCheckpointVersion);
  m["fqt.epoch"] = std::to_string(s.epoch);
  m["fqt.step"] = std::to_string(s.step);
  m["fqt.seed"] = std::to_string(s.seed);
  m["fqt.config"] = s.config_json;
  for (const auto& [k, v] : s.rng_counters) m["fqt.rng." + k] = std::to_string(v);
  for (const auto& [k, v] : s.extra) m["fqt.extra." + k] = v;
  return m;
}

template <typename T>
T parse_int(const std::map<std::string, std::string>& m, const std::string& key, const std::string& path) {
  auto it = m.find(key);
  FQT_INPUT_CHECK(it != m.end(), "{}: checkpoint metadata has no '{}' (not an fqt checkpoint, or damaged)", path, key);
  const std::string& s = it->second;
  T v{};
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  FQT_INPUT_CHECK(!s.empty() && ec == std::errc() && p == s.data() + s.size(),
                  "{}: checkpoint metadata '{}' is '{}', not an integer", path, key, s);
  return v;
}

TrainState state_from_metadata(const std::map<std::string, std::string>& m, const std::string& path) {
  auto f = m.find("fqt.format");
  FQT_INPUT_CHECK(f != m.end() && f->second == kFormat,
                  "{}: not an fqt checkpoint (the safetensors metadata has no fqt.format = {})", path, kFormat);
  const int version = parse_int<int>(m, "fqt.version", path);
  FQT_INPUT_CHECK(version >= 1 && version <= kCheckpointVersion,
                  "{}: checkpoint format version {} is not supported (this build reads versions 1 to {}); use a "
                  "newer fqt",
                  path, version, kCheckpointVersion);
  TrainState s;
  s.epoch = parse_int<int64_t>(m, "fqt.epoch", path);
  s.step = parse_int<int64_t>(m, "fqt.step", path);
  FQT_INPUT_CHECK(s.epoch >= 0 && s.step >= 0 && s.epoch <= s.step,
                  "{}: checkpoint metadata fqt.epoch = {}, fqt.step = {} is impossible (negative, or more epochs "
                  "than steps): the checkpoint is damaged",
                  path, s.epoch, s.step);
  s.seed = parse_int<uint64_t>(m, "fqt.seed", path);
  auto c = m.find("fqt.config");
  FQT_INPUT_CHECK(c != m.end(),
                  "{}: checkpoint metadata has no 'fqt.config' (the run configuration): not a checkpoint written by "
                  "fqt train, or damaged",
                  path);
  s.config_json = c->second;
  for (const auto& [k, v] : m) {
    if (k.rfind("fqt.rng.", 0) == 0) s.rng_counters[k.substr(8)] = parse_int<uint64_t>(m, k, path);
    else if (k.rfind("fqt.extra.", 0) == 0) s.extra[k.substr(10)] = v;
  }
  return s;
}

// A "0"/"1" flag of the metadata.
bool parse_flag(const std::map<std::string, std::string>& m, const std::string& key, const std::string& path) {
  auto it = m.find(key);
  FQT_INPUT_CHECK(it != m.end(), "{}: checkpoint metadata has no '{}' (not an fqt checkpoint, or damaged)", path, key);
  FQT_INPUT_CHECK(it->second == "0" || it->second == "1", "{}: checkpoint metadata '{}' is '{}', not 0 or 1: the "
                  "checkpoint is damaged", path, key, it->second);
  return it->second == "1";
}

// A finite float of the metadata in [0, 1) (momentum, weight decay), as save_checkpoint writes it.
float parse_unit_float(const std::map<std::string, std::string>& m, const std::string& key, const std::string& path) {
  auto it = m.find(key);
  FQT_INPUT_CHECK(it != m.end(), "{}: checkpoint metadata has no '{}' (not an fqt checkpoint, or damaged)", path, key);
  const std::string& s = it->second;
  float v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  FQT_INPUT_CHECK(!s.empty() && ec == std::errc() && p == s.data() + s.size() && std::isfinite(v) && v >= 0 && v < 1,
                  "{}: checkpoint metadata '{}' is '{}', not a number in [0, 1): the checkpoint is damaged", path, key,
                  s);
  return v;
}

// The optimizer settings of the metadata (fqt.optimizer, fqt.sgd.*), each checked.
struct StoredOptimizer {
  SGDOptions options;
  bool momentum_initialized = false;
};

StoredOptimizer optimizer_from_metadata(const std::map<std::string, std::string>& m, const std::string& path) {
  auto o = m.find("fqt.optimizer");
  FQT_INPUT_CHECK(o != m.end(), "{}: checkpoint metadata has no 'fqt.optimizer' (not an fqt checkpoint, or damaged)",
                  path);
  FQT_INPUT_CHECK(o->second == "sgd", "{}: checkpoint metadata 'fqt.optimizer' is '{}': fqt restores only 'sgd' "
                  "(the checkpoint is damaged or was not written by fqt train)", path, o->second);
  StoredOptimizer r;
  r.options.momentum = parse_unit_float(m, "fqt.sgd.momentum", path);
  r.options.weight_decay = parse_unit_float(m, "fqt.sgd.weight_decay", path);
  r.options.nesterov = parse_flag(m, "fqt.sgd.nesterov", path);
  r.momentum_initialized = parse_flag(m, "fqt.sgd.momentum_initialized", path);
  FQT_INPUT_CHECK(!r.options.nesterov || r.options.momentum > 0,
                  "{}: checkpoint metadata has fqt.sgd.nesterov = 1 with fqt.sgd.momentum = 0 (Nesterov needs "
                  "momentum): the checkpoint is damaged", path);
  FQT_INPUT_CHECK(!r.momentum_initialized || r.options.momentum > 0,
                  "{}: checkpoint metadata has fqt.sgd.momentum_initialized = 1 with fqt.sgd.momentum = 0: the "
                  "checkpoint is damaged", path);
  return r;
}

// First NaN/Inf of an f32 tensor (-1 if none).
int64_t first_non_finite(const Tensor& t) {
  if (t.dtype() != DType::f32) return -1;
  const float* p = t.data<float>();
  const int64_t n = t.numel();
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, p + i, sizeof u);
    bad |= static_cast<uint32_t>((u & 0x7f800000u) == 0x7f800000u);
  }
  if (!bad) return -1;
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(p[i])) return i;
  return -1;
}

// The tensor `name` of the file must exist with this shape and dtype.
const Tensor& expect(const SafeTensors& st, const std::string& path, const std::string& name, const Shape& shape,
                     DType dtype, const std::string& model_for) {
  auto it = st.tensors.find(name);
  if (it == st.tensors.end()) {
    FQT_INPUT_CHECK(!st.int64s.count(name), "{}: tensor '{}' is I64 in the checkpoint but {} in the model", path, name,
                    dtype_name(dtype));
    throw InputError(fmt::format("{}: tensor '{}' of the model is missing from the checkpoint (checkpoint was "
                                 "written for a different model?)",
                                 path, name));
  }
  const Tensor& t = it->second;
  FQT_INPUT_CHECK(t.shape() == shape, "{}: tensor '{}' has shape {} in the checkpoint but {} in the model {}", path, name,
                  shape_str(t.shape()), shape_str(shape),
                  model_for.empty() ? "(checkpoint was written for a different model?)"
                                    : fmt::format("built for {} (images of another size than the run was trained on, "
                                                  "or a checkpoint of a different model?)",
                                                  model_for));
  FQT_INPUT_CHECK(t.dtype() == dtype,
                  "{}: tensor '{}' is {} in the checkpoint but {} in the model (checkpoint was written for a "
                  "different model?)",
                  path, name, dtype_name(t.dtype()), dtype_name(dtype));
  return t;
}

}  // namespace

namespace {

// A missing checkpoint whose save was interrupted (train's first save of a --resume/--overwrite
// run renames it aside to "<path>.replaced.tmp.<pid>" before the new one lands): said so, with
// the way to put it back, instead of "cannot open".
void refuse_interrupted_save(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::exists(fs::symlink_status(path, ec))) return;
  const fs::path p(path);
  const fs::path dir = p.has_parent_path() ? p.parent_path() : fs::path(".");
  const std::string prefix = aside_prefix(p.filename().string());
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    if (e.path().filename().string().rfind(prefix, 0) != 0) continue;
    throw InputError(fmt::format("{}: missing: a save of its run was interrupted (or is under way), and the "
                                 "checkpoint saved before it is kept as '{}'; the next `fqt train` with --out {} "
                                 "(--resume to continue the run, --overwrite to replace it) puts the saved run back "
                                 "first",
                                 path, e.path().string(), dir.string()));
  }
}

struct CheckpointContents {
  NamedTensors tensors;
  std::map<std::string, std::string> meta;
};

CheckpointContents checkpoint_contents(const std::vector<Param*>& params, const NamedBuffers& buffers, const SGD& opt,
                                       const TrainState& state) {
  CheckpointContents c;
  NamedTensors& tensors = c.tensors;
  tensors.reserve(params.size() * 2 + buffers.size());
  for (const Param* p : params) {
    FQT_CHECK(p && p->value.defined(), "save_checkpoint: undefined parameter");
    tensors.emplace_back("param/" + p->name, p->value);
  }
  for (const auto& [name, t] : buffers) {
    FQT_CHECK(t && t->defined(), "save_checkpoint: undefined buffer '{}'", name);
    tensors.emplace_back("buffer/" + name, *t);
  }
  if (opt.momentum_initialized()) {
    const auto& bufs = opt.momentum_buffers();
    for (size_t i = 0; i < opt.params().size(); ++i)
      tensors.emplace_back("momentum/" + opt.params()[i]->name, bufs[i]);
  }
  auto& meta = c.meta;
  meta = state_metadata(state);
  const SGDOptions& o = opt.options();
  meta["fqt.optimizer"] = "sgd";
  meta["fqt.sgd.momentum"] = f2s(o.momentum);
  meta["fqt.sgd.weight_decay"] = f2s(o.weight_decay);
  meta["fqt.sgd.nesterov"] = std::to_string(o.nesterov ? 1 : 0);
  meta["fqt.sgd.momentum_initialized"] = std::to_string(opt.momentum_initialized() ? 1 : 0);
  return c;
}

}  // namespace

void save_checkpoint(const std::string& path, const std::vector<Param*>& params, const NamedBuffers& buffers,
                     const SGD& opt, const TrainState& state) {
  const CheckpointContents c = checkpoint_contents(params, buffers, opt, state);
  write_safetensors(path, c.tensors, c.meta);
}

std::string serialize_checkpoint(const std::vector<Param*>& params, const NamedBuffers& buffers, const SGD& opt,
                                 const TrainState& state) {
  const CheckpointContents c = checkpoint_contents(params, buffers, opt, state);
  return serialize_safetensors(c.tensors, c.meta);
}

TrainState load_checkpoint(const std::string& path, const std::vector<Param*>& params, const NamedBuffers& buffers,
                           SGD& opt, const std::string& model_for) {
  refuse_interrupted_save(path);
  const SafeTensors st = read_safetensors(path);
  // ---- validate everything --------------------------------------------------------------
  TrainState state = state_from_metadata(st.metadata, path);
  const StoredOptimizer stored_opt = optimizer_from_metadata(st.metadata, path);
  state.sgd = stored_opt.options;
  std::set<std::string> used;
  std::vector<std::pair<std::string, std::pair<const Tensor*, Tensor*>>> copies;  // name: (from file, into model)
  for (Param* p : params) {
    FQT_CHECK(p && p->value.defined(), "load_checkpoint: undefined parameter");
    const std::string name = "param/" + p->name;
    copies.push_back({name, {&expect(st, path, name, p->value.shape(), p->value.dtype(), model_for), &p->value}});
    used.insert(name);
  }
  for (const auto& [bname, t] : buffers) {
    FQT_CHECK(t && t->defined(), "load_checkpoint: undefined buffer '{}'", bname);
    const std::string name = "buffer/" + bname;
    copies.push_back({name, {&expect(st, path, name, t->shape(), t->dtype(), model_for), t}});
    used.insert(name);
  }
  bool has_momentum = false;
  for (const auto& [name, t] : st.tensors) has_momentum |= name.rfind("momentum/", 0) == 0;
  FQT_INPUT_CHECK(has_momentum == stored_opt.momentum_initialized,
                  "{}: checkpoint metadata fqt.sgd.momentum_initialized = {} but the file holds {}momentum/* tensors: "
                  "the checkpoint is damaged",
                  path, stored_opt.momentum_initialized ? 1 : 0, has_momentum ? "" : "no ");
  if (has_momentum) {
    FQT_INPUT_CHECK(opt.options().momentum != 0.0f,
                    "{}: the checkpoint has SGD momentum buffers but the optimizer has momentum 0 (resume with the "
                    "momentum it was trained with)",
                    path);
    for (size_t i = 0; i < opt.params().size(); ++i) {
      const Param* p = opt.params()[i];
      const std::string name = "momentum/" + p->name;
      copies.push_back({name, {&expect(st, path, name, p->value.shape(), DType::f32, model_for), &opt.momentum_buffers()[i]}});
      used.insert(name);
    }
  }
  std::vector<std::string> extra;
  for (const auto& [name, t] : st.tensors)
    if (!used.count(name)) extra.push_back(name);
  for (const auto& [name, t] : st.int64s) extra.push_back(name);
  if (!extra.empty()) {
    std::string list;
    for (size_t i = 0; i < extra.size() && i < 5; ++i) list += (i ? ", '" : "'") + extra[i] + "'";
    if (extra.size() > 5) list += fmt::format(" and {} more", extra.size() - 5);
    throw InputError(fmt::format("{}: the checkpoint has {} tensor(s) the model does not: {} (checkpoint was written "
                                 "for a different model?)",
                                 path, extra.size(), list));
  }
  // A NaN or Inf is never saved (training stops or skips the step first): the file is damaged.
  for (const auto& [name, c] : copies)
    if (const int64_t i = first_non_finite(*c.first); i >= 0)
      throw InputError(fmt::format("{}: tensor '{}' holds {} at element {} (of {}): a checkpoint never holds "
                                   "NaN/Inf, the file is damaged",
                                   path, name, c.first->data<float>()[i], i, c.first->numel()));
  // ---- then copy ------------------------------------------------------------------------
  for (const auto& [name, c] : copies)
    if (c.first->nbytes()) std::memcpy(c.second->raw(), c.first->raw(), c.first->nbytes());
  if (opt.options().momentum != 0.0f) opt.set_momentum_initialized(has_momentum);
  return state;
}

TrainState read_checkpoint_state(const std::string& path) {
  refuse_interrupted_save(path);
  return state_from_metadata(read_safetensors_metadata(path), path);
}

}  // namespace fqt
