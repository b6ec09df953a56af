// safetensors reader and writer (see fqt/checkpoint.hpp for the format and the guarantees).
#include "fqt/checkpoint.hpp"
#include "fqt/file.hpp"

#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cerrno>
#include <cstring>
#include <functional>
#include <mutex>
#include <set>
#include <vector>

static_assert(std::endian::native == std::endian::little, "safetensors I/O assumes a little-endian host");

namespace fqt {

namespace {

constexpr uint64_t kMaxHeader = 100'000'000;  // the limit of the reference implementation

enum class StDType { f32, f64, i8, u8, i32, i64 };

const char* st_name(StDType t) {
  switch (t) {
    case StDType::f32: return "F32";
    case StDType::f64: return "F64";
    case StDType::i8: return "I8";
    case StDType::u8: return "U8";
    case StDType::i32: return "I32";
    case StDType::i64: return "I64";
  }
  return "?";
}

size_t st_size(StDType t) {
  switch (t) {
    case StDType::f32: return 4;
    case StDType::f64: return 8;
    case StDType::i8: return 1;
    case StDType::u8: return 1;
    case StDType::i32: return 4;
    case StDType::i64: return 8;
  }
  return 0;
}

StDType to_st(DType t) {
  switch (t) {
    case DType::f32: return StDType::f32;
    case DType::f64: return StDType::f64;
    case DType::i8: return StDType::i8;
    case DType::u8: return StDType::u8;
    case DType::i32: return StDType::i32;
  }
  FQT_CHECK(false, "unknown dtype {}", static_cast<int>(t));
}

DType from_st(StDType t) {
  switch (t) {
    case StDType::f32: return DType::f32;
    case StDType::f64: return DType::f64;
    case StDType::i8: return DType::i8;
    case StDType::u8: return DType::u8;
    case StDType::i32: return DType::i32;
    case StDType::i64: break;
  }
  FQT_CHECK(false, "I64 has no Tensor dtype");
}

[[noreturn]] void fail(const std::string& name, const std::string& msg) {
  throw InputError(fmt::format("{}: {}", name, msg));
}

uint64_t read_u64le(const char* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= static_cast<uint64_t>(static_cast<unsigned char>(p[i])) << (8 * i);
  return v;
}

// ---- header -----------------------------------------------------------------------------

struct Entry {
  std::string name;
  StDType dtype;
  Shape shape;
  uint64_t begin, end;
};

struct Header {
  std::vector<Entry> entries;
  std::map<std::string, std::string> metadata;
};

uint64_t header_size(const std::string& bytes_head, uint64_t file_size, const std::string& name) {
  if (file_size < 8)
    fail(name, fmt::format("file is only {} bytes, shorter than the 8-byte header length (truncated, or not a "
                           "safetensors file?)",
                           file_size));
  const uint64_t n = read_u64le(bytes_head.data());
  if (n > kMaxHeader)
    fail(name, fmt::format("header size {} is absurd (over {} bytes): not a safetensors file, or corrupted", n,
                           kMaxHeader));
  if (n > file_size - 8)
    fail(name, fmt::format("header of {} bytes runs past the end of the {}-byte file (truncated?)", n, file_size));
  return n;
}

Header parse_header(const char* h, size_t n, uint64_t data_size, const std::string& name) {
  using nlohmann::json;
  if (n < 2 || h[0] != '{')
    fail(name, "header does not start with '{' (not a safetensors file, or corrupted)");
  json j;
  std::set<std::string> top_keys;
  std::string duplicate;
  try {
    j = json::parse(h, h + n, [&](int depth, json::parse_event_t ev, json& parsed) {
      if (depth == 1 && ev == json::parse_event_t::key && parsed.is_string()) {
        if (!top_keys.insert(parsed.get<std::string>()).second && duplicate.empty()) duplicate = parsed.get<std::string>();
      }
      return true;
    });
  } catch (const json::parse_error& e) {
    fail(name, fmt::format("header is not valid JSON (error at byte {} of the {}-byte header)", e.byte, n));
  } catch (const json::exception& e) {
    // e.g. out_of_range 406: a number too large for a double ("1e999").
    fail(name, fmt::format("header is not valid JSON ({})", e.what()));
  }
  if (!j.is_object()) fail(name, "header is not a JSON object");
  if (!duplicate.empty()) fail(name, fmt::format("header names '{}' twice", duplicate));

  Header out;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& key = it.key();
    const json& v = it.value();
    if (key == "__metadata__") {
      if (!v.is_object()) fail(name, "__metadata__ is not a JSON object of strings");
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string())
          fail(name, fmt::format("__metadata__ entry '{}' is not a string", m.key()));
        out.metadata[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    if (!v.is_object()) fail(name, fmt::format("tensor '{}': entry is not a JSON object", key));
    Entry e;
    e.name = key;
    // dtype
    auto d = v.find("dtype");
    if (d == v.end()) fail(name, fmt::format("tensor '{}' has no dtype", key));
    if (!d->is_string()) fail(name, fmt::format("tensor '{}': dtype is not a string", key));
    const std::string ds = d->get<std::string>();
    if (ds == "F32") e.dtype = StDType::f32;
    else if (ds == "F64") e.dtype = StDType::f64;
    else if (ds == "I8") e.dtype = StDType::i8;
    else if (ds == "U8") e.dtype = StDType::u8;
    else if (ds == "I32") e.dtype = StDType::i32;
    else if (ds == "I64") e.dtype = StDType::i64;
    else if (ds == "BOOL" || ds == "F16" || ds == "BF16" || ds == "I16" || ds == "U16" || ds == "U32" ||
             ds == "U64" || ds == "F8_E4M3" || ds == "F8_E5M2" || ds == "F8_E8M0" || ds == "F4" || ds == "F6_E2M3" ||
             ds == "F6_E3M2" || ds == "C64")
      fail(name, fmt::format("tensor '{}' has dtype {}, which fqt does not read (convert it to F32, F64, I8, U8, I32 "
                             "or I64)",
                             key, ds));
    else
      fail(name, fmt::format("tensor '{}' has unknown dtype '{}'", key, ds));
    // shape
    auto s = v.find("shape");
    if (s == v.end()) fail(name, fmt::format("tensor '{}' has no shape", key));
    if (!s->is_array()) fail(name, fmt::format("tensor '{}': shape is not a list of integers", key));
    if (s->size() > 64) fail(name, fmt::format("tensor '{}': shape has {} dimensions (more than 64)", key, s->size()));
    uint64_t numel = 1;
    bool overflow = false;
    for (const json& dim : *s) {
      if (!dim.is_number_unsigned())
        fail(name, fmt::format("tensor '{}': shape {} is not a list of non-negative integers", key, s->dump()));
      const uint64_t dv = dim.get<uint64_t>();
      if (dv > static_cast<uint64_t>(INT64_MAX))
        fail(name, fmt::format("tensor '{}': dimension {} is too large", key, dv));
      overflow |= __builtin_mul_overflow(numel, dv, &numel);
      e.shape.push_back(static_cast<int64_t>(dv));
    }
    uint64_t nbytes = 0;
    overflow |= __builtin_mul_overflow(numel, static_cast<uint64_t>(st_size(e.dtype)), &nbytes);
    if (overflow || numel > static_cast<uint64_t>(INT64_MAX))
      fail(name, fmt::format("tensor '{}': shape {} has more elements than can be addressed", key, s->dump()));
    // offsets
    auto o = v.find("data_offsets");
    if (o == v.end()) fail(name, fmt::format("tensor '{}' has no data_offsets", key));
    if (!o->is_array() || o->size() != 2 || !(*o)[0].is_number_unsigned() || !(*o)[1].is_number_unsigned())
      fail(name, fmt::format("tensor '{}': data_offsets {} is not a pair of non-negative integers", key, o->dump()));
    e.begin = (*o)[0].get<uint64_t>();
    e.end = (*o)[1].get<uint64_t>();
    if (e.begin > e.end)
      fail(name, fmt::format("tensor '{}': data_offsets [{}, {}] end before they begin", key, e.begin, e.end));
    if (e.end > data_size)
      fail(name, fmt::format("tensor '{}': data_offsets [{}, {}] run past the {}-byte data buffer (truncated?)", key,
                             e.begin, e.end, data_size));
    if (e.end - e.begin != nbytes)
      fail(name, fmt::format("tensor '{}': data_offsets [{}, {}] hold {} bytes but shape {} of {} needs {}", key,
                             e.begin, e.end, e.end - e.begin, shape_str(e.shape), ds, nbytes));
    out.entries.push_back(std::move(e));
  }
  // The tensors must tile the data buffer exactly: no overlap, no hole, nothing left over.
  std::vector<const Entry*> order;
  for (const Entry& e : out.entries) order.push_back(&e);
  std::sort(order.begin(), order.end(), [](const Entry* a, const Entry* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  uint64_t cursor = 0;
  const Entry* prev = nullptr;
  for (const Entry* e : order) {
    if (e->begin < cursor)
      fail(name, fmt::format("tensors '{}' and '{}' overlap in the data buffer (bytes [{}, {}) and [{}, {}))",
                             prev->name, e->name, prev->begin, prev->end, e->begin, e->end));
    if (e->begin > cursor)
      fail(name, fmt::format("data bytes [{}, {}) before tensor '{}' belong to no tensor", cursor, e->begin, e->name));
    cursor = e->end;
    prev = e;
  }
  if (cursor != data_size)
    fail(name, fmt::format("data bytes [{}, {}) at the end of the file belong to no tensor", cursor, data_size));
  return out;
}

// ---- writer -----------------------------------------------------------------------------

using Sink = std::function<void(const void*, size_t)>;

struct Plan {
  std::string header;  // padded JSON
  std::vector<std::pair<const void*, size_t>> chunks;
  uint64_t data_size = 0;
};

Plan plan(const NamedTensors& tensors, const std::map<std::string, std::string>& metadata,
          const NamedI64Tensors& int64s) {
  using nlohmann::ordered_json;
  ordered_json h = ordered_json::object();
  if (!metadata.empty()) {
    ordered_json m = ordered_json::object();
    for (const auto& [k, v] : metadata) m[k] = v;
    h["__metadata__"] = m;
  }
  Plan p;
  std::set<std::string> seen;
  auto add = [&](const std::string& name, StDType dt, const Shape& shape, const void* data, size_t nbytes) {
    FQT_INPUT_CHECK(!name.empty(), "safetensors: tensor names must not be empty");
    FQT_INPUT_CHECK(name != "__metadata__", "safetensors: '__metadata__' is reserved and cannot name a tensor");
    FQT_INPUT_CHECK(seen.insert(name).second, "safetensors: tensor name '{}' is used twice", name);
    ordered_json e = ordered_json::object();
    e["dtype"] = st_name(dt);
    e["shape"] = shape;
    e["data_offsets"] = {p.data_size, p.data_size + nbytes};
    h[name] = e;
    p.chunks.emplace_back(data, nbytes);
    p.data_size += nbytes;
  };
  for (const auto& [name, t] : tensors) {
    FQT_INPUT_CHECK(t.defined(), "safetensors: tensor '{}' is undefined", name);
    add(name, to_st(t.dtype()), t.shape(), t.raw(), t.nbytes());
  }
  for (const auto& [name, t] : int64s) {
    FQT_INPUT_CHECK(static_cast<int64_t>(t.values.size()) == shape_numel(t.shape),
                    "safetensors: I64 tensor '{}' has {} values for shape {}", name, t.values.size(),
                    shape_str(t.shape));
    add(name, StDType::i64, t.shape, t.values.data(), t.values.size() * sizeof(int64_t));
  }
  try {
    p.header = h.dump();
  } catch (const nlohmann::json::exception& e) {
    throw InputError(fmt::format("safetensors: a tensor name or metadata string is not valid UTF-8 ({})", e.what()));
  }
  while (p.header.size() % 8 != 0) p.header += ' ';
  return p;
}

void emit(const Plan& p, const Sink& sink) {
  char len[8];
  const uint64_t n = p.header.size();
  for (int i = 0; i < 8; ++i) len[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  sink(len, 8);
  sink(p.header.data(), p.header.size());
  for (const auto& [data, nbytes] : p.chunks)
    if (nbytes) sink(data, nbytes);
}

std::atomic<int64_t> g_fault_after{-1};
std::atomic<int> g_open_fault{0};

std::string dir_of(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

// Writes `path`'s temporary file (see the header) and returns its name: fsync'ed and closed, not
// yet renamed. `produce` pushes the bytes through the sink. On failure the temporary is removed.
std::string stage(const std::string& path, const std::function<void(const Sink&)>& produce) {
  {  // A device node or folder in the way would be replaced by the rename (/dev/full as root).
    struct stat st {};
    if (::stat(path.c_str(), &st) == 0 && !S_ISREG(st.st_mode))
      throw InputError(fmt::format("{}: exists and is not a regular file; not replacing it", path));
  }
  const std::string tmp = fmt::format("{}.tmp.{}", path, static_cast<long>(::getpid()));
  int fd = -1;
  if (const int injected = g_open_fault.exchange(0)) errno = injected;  // (test hook)
  else fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0644);
  if (fd < 0) {
    const int err = errno;
    std::string hint;
    if (err == ENOENT) hint = fmt::format("; the folder '{}' does not exist", dir_of(path));
    else if (err == EACCES || err == EROFS) hint = fmt::format("; the folder '{}' is not writable", dir_of(path));
    throw InputError(fmt::format("{}: cannot create the temporary file '{}' ({}){}", path, tmp, std::strerror(err),
                                 hint));
  }
  int64_t fault = g_fault_after.exchange(-1);
  uint64_t written = 0;
  auto cleanup = [&] {
    if (fd >= 0) ::close(fd);
    fd = -1;
    ::unlink(tmp.c_str());
  };
  try {
    Sink sink = [&](const void* data, size_t n) {
      const char* p = static_cast<const char*>(data);
      while (n > 0) {
        size_t chunk = std::min<size_t>(n, size_t{1} << 30);
        if (fault >= 0 && written + chunk > static_cast<uint64_t>(fault)) chunk = static_cast<uint64_t>(fault) - written;
        ssize_t r = chunk ? ::write(fd, p, chunk) : -1;
        if (r < 0 && chunk == 0) errno = ENOSPC;  // injected fault
        if (r < 0) {
          if (errno == EINTR) continue;
          throw InputError(fmt::format("{}: write failed after {} bytes ({}{}); the previous file, if any, is unchanged",
                                       path, written, std::strerror(errno), errno == ENOSPC ? ": disk full?" : ""));
        }
        p += r;
        n -= static_cast<size_t>(r);
        written += static_cast<uint64_t>(r);
      }
    };
    produce(sink);
    if (::fsync(fd) != 0)
      throw InputError(fmt::format("{}: fsync failed ({}); the previous file, if any, is unchanged", path,
                                   std::strerror(errno)));
    const int rc = ::close(fd);
    fd = -1;
    if (rc != 0)
      throw InputError(fmt::format("{}: close failed ({}); the previous file, if any, is unchanged", path,
                                   std::strerror(errno)));
  } catch (...) {
    cleanup();
    throw;
  }
  return tmp;
}

struct CommitFault {
  std::string suffix;
  int err = 0;
  bool after_rename = false;
  int skip = 0;  // matches to let pass first
};
std::mutex g_commit_fault_mutex;
std::vector<CommitFault> g_commit_faults;

// The commit fault hook: the errno to fail with when an armed fault matches `path` (by suffix)
// and this stage (before or after the rename), then disarmed; 0 otherwise.
int commit_fault(const std::string& path, bool after_rename) {
  std::lock_guard<std::mutex> lock(g_commit_fault_mutex);
  for (auto it = g_commit_faults.begin(); it != g_commit_faults.end(); ++it) {
    const std::string& sfx = it->suffix;
    if (it->after_rename != after_rename || path.size() < sfx.size() ||
        path.compare(path.size() - sfx.size(), sfx.size(), sfx) != 0)
      continue;
    if (it->skip > 0) {
      --it->skip;
      continue;
    }
    const int err = it->err;
    g_commit_faults.erase(it);
    return err;
  }
  return 0;
}

// Renames a staged temporary over `path`. On failure the temporary is removed and `path` is as
// it was.
void rename_into_place(const std::string& path, const std::string& tmp) {
  const int injected = commit_fault(path, false);
  if (injected || ::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = injected ? injected : errno;
    ::unlink(tmp.c_str());
    throw InputError(fmt::format("{}: cannot rename '{}' into place ({}); the previous file, if any, is unchanged",
                                 path, tmp, std::strerror(err)));
  }
}

// Makes a rename in `path`'s folder durable. Some file systems cannot fsync a folder (EINVAL):
// that is fine.
void sync_folder_of(const std::string& path) {
  const int dfd = ::open(dir_of(path).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    const int injected = commit_fault(path, true);
    const int rc = injected ? -1 : ::fsync(dfd);
    const int err = injected ? injected : errno;
    ::close(dfd);
    if (rc != 0 && err != EINVAL && err != ENOTSUP)
      throw InputError(fmt::format("{}: written, but syncing its folder failed ({})", path, std::strerror(err)));
  }
}

// Writes a file atomically (see the header).
void atomic_write(const std::string& path, const std::function<void(const Sink&)>& produce) {
  rename_into_place(path, stage(path, produce));
  sync_folder_of(path);
}

}  // namespace

namespace detail {
void set_write_fault_for_testing(int64_t fail_after_bytes) { g_fault_after.store(fail_after_bytes); }
void set_open_fault_for_testing(int err) { g_open_fault.store(err); }
void set_commit_fault_for_testing(const std::string& path_suffix, int err, bool after_rename, int skip) {
  std::lock_guard<std::mutex> lock(g_commit_fault_mutex);
  if (err == 0) g_commit_faults.clear();
  else g_commit_faults.push_back({path_suffix, err, after_rename, skip});
}
}  // namespace detail

std::string serialize_safetensors(const NamedTensors& tensors, const std::map<std::string, std::string>& metadata,
                                  const NamedI64Tensors& int64s) {
  const Plan p = plan(tensors, metadata, int64s);
  std::string out;
  out.reserve(8 + p.header.size() + p.data_size);
  emit(p, [&](const void* d, size_t n) { out.append(static_cast<const char*>(d), n); });
  return out;
}

void write_safetensors(const std::string& path, const NamedTensors& tensors,
                       const std::map<std::string, std::string>& metadata, const NamedI64Tensors& int64s) {
  const Plan p = plan(tensors, metadata, int64s);
  atomic_write(path, [&](const Sink& sink) { emit(p, sink); });
}

void write_file_atomic(const std::string& path, const std::string& bytes) {
  atomic_write(path, [&](const Sink& sink) { sink(bytes.data(), bytes.size()); });
}

StagedFile::StagedFile(const std::string& path, const std::string& bytes)
    : path_(path), tmp_(stage(path, [&](const Sink& sink) { sink(bytes.data(), bytes.size()); })) {}

StagedFile::~StagedFile() {
  if (!tmp_.empty()) ::unlink(tmp_.c_str());
}

void StagedFile::commit() {
  FQT_CHECK(!tmp_.empty(), "StagedFile::commit: {} was already committed or failed to", path_);
  const std::string tmp = std::move(tmp_);
  tmp_.clear();
  rename_into_place(path_, tmp);
  committed_ = true;
  sync_folder_of(path_);
}

int rename_file(const std::string& from, const std::string& to) {
  if (const int injected = commit_fault(to, false)) {
    errno = injected;
    return -1;
  }
  return ::rename(from.c_str(), to.c_str());
}

SafeTensors parse_safetensors(const std::string& bytes, const std::string& name) {
  const uint64_t n = header_size(bytes, bytes.size(), name);
  const uint64_t data_size = bytes.size() - 8 - n;
  Header h = parse_header(bytes.data() + 8, n, data_size, name);
  const char* data = bytes.data() + 8 + n;
  SafeTensors out;
  out.metadata = std::move(h.metadata);
  for (Entry& e : h.entries) {
    if (e.dtype == StDType::i64) {
      I64Tensor t;
      t.values.resize((e.end - e.begin) / 8);
      if (!t.values.empty()) std::memcpy(t.values.data(), data + e.begin, e.end - e.begin);
      t.shape = std::move(e.shape);
      out.int64s.emplace(e.name, std::move(t));
    } else {
      Tensor t = Tensor::empty(e.shape, from_st(e.dtype));
      if (e.end > e.begin) std::memcpy(t.raw(), data + e.begin, e.end - e.begin);
      out.tensors.emplace(e.name, std::move(t));
    }
  }
  return out;
}

SafeTensors read_safetensors(const std::string& path) { return parse_safetensors(read_whole_file(path), path); }

std::map<std::string, std::string> read_safetensors_metadata(const std::string& path) {
  InputFile f(path);  // only the header is read: a checkpoint's tensors can be large
  const uint64_t size = f.size();
  const std::string head = size >= 8 ? f.read(8) : std::string();
  const uint64_t n = header_size(head, size, path);
  const std::string hdr = f.read(static_cast<size_t>(n));
  return parse_header(hdr.data(), hdr.size(), size - 8 - n, path).metadata;
}

}  // namespace fqt
