// IDX files (MNIST, Fashion-MNIST) and the gzip layer under them.
//
// IDX layout: 4-byte big-endian magic 0x0000TTDD (TT = 0x08 for u8, DD = number of dims),
// then DD big-endian u32 dims, then the row-major u8 payload. Everything that comes from a
// file is validated before use: these readers are also fuzz targets.
#include "fqt/data.hpp"
#include "fqt/file.hpp"

#include <zlib.h>

#include <algorithm>
#include <cstring>

namespace fqt {

static bool is_gzip(const std::string& b) {
  return b.size() >= 2 && static_cast<uint8_t>(b[0]) == 0x1f && static_cast<uint8_t>(b[1]) == 0x8b;
}

std::string gunzip_if_gzip(const std::string& bytes, const std::string& what, size_t max_output) {
  if (!is_gzip(bytes)) return bytes;
  z_stream zs{};
  // 16 + MAX_WBITS: expect a gzip header and trailer (CRC32 and length are checked by zlib).
  FQT_CHECK(inflateInit2(&zs, 16 + MAX_WBITS) == Z_OK, "inflateInit2 failed");
  struct Guard {
    z_stream* z;
    ~Guard() { inflateEnd(z); }
  } guard{&zs};

  std::string out;
  size_t in_pos = 0;
  char buf[1 << 16];
  for (;;) {
    // zlib counts in uInt: feed at most 1 GiB at a time.
    size_t chunk = std::min<size_t>(bytes.size() - in_pos, size_t{1} << 30);
    zs.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(bytes.data() + in_pos));
    zs.avail_in = static_cast<uInt>(chunk);
    int rc = Z_OK;
    do {
      zs.next_out = reinterpret_cast<Bytef*>(buf);
      zs.avail_out = sizeof(buf);
      rc = inflate(&zs, Z_NO_FLUSH);
      FQT_INPUT_CHECK(rc != Z_DATA_ERROR && rc != Z_NEED_DICT, "{}: corrupt gzip data ({})", what,
                      zs.msg ? zs.msg : "invalid deflate stream");
      FQT_CHECK(rc != Z_MEM_ERROR && rc != Z_STREAM_ERROR, "inflate failed with code {}", rc);
      size_t produced = sizeof(buf) - zs.avail_out;
      FQT_INPUT_CHECK(out.size() + produced <= max_output,
                      "{}: gzip data inflates to more than {} bytes; not a dataset file?", what,
                      max_output);
      out.append(buf, produced);
    } while (zs.avail_out == 0 && rc != Z_STREAM_END);
    in_pos += chunk - zs.avail_in;

    if (rc == Z_STREAM_END) {
      // gzip allows concatenated members; anything else after a member is garbage.
      if (in_pos == bytes.size()) break;
      std::string rest = bytes.substr(in_pos, 2);
      FQT_INPUT_CHECK(is_gzip(rest), "{}: {} bytes of garbage after the gzip stream", what,
                      bytes.size() - in_pos);
      FQT_CHECK(inflateReset(&zs) == Z_OK, "inflateReset failed");
      continue;
    }
    // No progress possible and input exhausted: the stream stops before its end.
    FQT_INPUT_CHECK(in_pos < bytes.size(),
                    "{}: truncated gzip file (stream ends early after {} bytes of data); "
                    "re-download or re-install the file",
                    what, out.size());
  }
  return out;
}

std::string gzip_compress(const std::string& bytes, int level) {
  z_stream zs{};
  FQT_CHECK(deflateInit2(&zs, level, Z_DEFLATED, 16 + MAX_WBITS, 8, Z_DEFAULT_STRATEGY) == Z_OK,
            "deflateInit2 failed");
  std::string out;
  char buf[1 << 16];
  size_t in_pos = 0;
  int rc = Z_OK;
  while (rc != Z_STREAM_END) {
    size_t chunk = std::min<size_t>(bytes.size() - in_pos, size_t{1} << 30);
    zs.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(bytes.data() + in_pos));
    zs.avail_in = static_cast<uInt>(chunk);
    bool last = in_pos + chunk == bytes.size();
    do {
      zs.next_out = reinterpret_cast<Bytef*>(buf);
      zs.avail_out = sizeof(buf);
      rc = deflate(&zs, last ? Z_FINISH : Z_NO_FLUSH);
      FQT_CHECK(rc != Z_STREAM_ERROR, "deflate failed");
      out.append(buf, sizeof(buf) - zs.avail_out);
    } while (zs.avail_out == 0);
    in_pos += chunk - zs.avail_in;
  }
  deflateEnd(&zs);
  return out;
}

namespace {

uint32_t read_be32(const std::string& b, size_t off) {
  auto u = [&](size_t i) { return static_cast<uint32_t>(static_cast<uint8_t>(b[off + i])); };
  return (u(0) << 24) | (u(1) << 16) | (u(2) << 8) | u(3);
}

// Validated header of an IDX u8 file with `want_dims` dimensions. Returns the dims and checks
// that the file holds exactly prod(dims) payload bytes.
std::vector<int64_t> parse_idx_header(const std::string& b, const std::string& what,
                                      int want_dims, const char* kind) {
  const uint32_t want_magic = 0x00000800u | static_cast<uint32_t>(want_dims);
  FQT_INPUT_CHECK(!is_gzip(b), "{}: data is still gzip-compressed; decompress it first", what);
  FQT_INPUT_CHECK(b.size() >= 4, "{}: truncated: {} bytes, too short for an IDX header", what,
                  b.size());
  const uint32_t magic = read_be32(b, 0);
  if (magic != want_magic) {
    std::string hint;
    if (magic == 0x00000801u || magic == 0x00000803u)
      hint = fmt::format(" (this looks like an IDX {} file: are the images and labels files swapped?)",
                         magic == 0x00000801u ? "labels" : "images");
    else if ((magic >> 16) != 0)
      hint = " (not an IDX file)";
    else if (((magic >> 8) & 0xff) != 0x08)
      hint = fmt::format(" (element type 0x{:02x}; only unsigned bytes, 0x08, are supported)",
                         (magic >> 8) & 0xff);
    throw InputError(fmt::format("{}: bad magic number 0x{:08x} for an IDX {} file, expected 0x{:08x}{}",
                                 what, magic, kind, want_magic, hint));
  }
  const size_t header = 4 + 4 * static_cast<size_t>(want_dims);
  FQT_INPUT_CHECK(b.size() >= header,
                  "{}: truncated inside the header: {} bytes, the header alone needs {}", what,
                  b.size(), header);
  std::vector<int64_t> dims(want_dims);
  // Payload size with overflow checks: dims are u32, their product may exceed 2^64.
  uint64_t total = 1;
  bool overflow = false;
  for (int d = 0; d < want_dims; ++d) {
    dims[d] = read_be32(b, 4 + 4 * d);
    if (dims[d] != 0 && total > (uint64_t{1} << 62) / static_cast<uint64_t>(dims[d])) overflow = true;
    else total *= static_cast<uint64_t>(dims[d]);
  }
  FQT_INPUT_CHECK(!overflow, "{}: dimensions {} are too large (their product overflows); corrupt header?",
                  what, shape_str(dims));
  for (int d = 0; d < want_dims; ++d)
    FQT_INPUT_CHECK(dims[d] > 0, "{}: dimension {} is zero in {}: the file holds no data", what, d,
                    shape_str(dims));
  const uint64_t have = b.size() - header;
  FQT_INPUT_CHECK(have >= total,
                  "{}: truncated: header {} needs {} data bytes but the file has {}; "
                  "re-download or re-install the file",
                  what, shape_str(dims), total, have);
  FQT_INPUT_CHECK(have == total, "{}: {} unexpected trailing bytes after the {} data bytes of {}",
                  what, have - total, total, shape_str(dims));
  return dims;
}

}  // namespace

Tensor parse_idx_images(const std::string& bytes, const std::string& what) {
  std::vector<int64_t> dims = parse_idx_header(bytes, what, 3, "images");
  // Images are small (28x28 in the standard sets): a huge H*W means a corrupt header, and
  // would make every per-image buffer enormous.
  FQT_INPUT_CHECK(dims[1] <= 4096 && dims[2] <= 4096, "{}: image size {}x{} is implausible (max 4096)",
                  what, dims[1], dims[2]);
  Tensor t = Tensor::empty({dims[0], 1, dims[1], dims[2]}, DType::u8);
  std::memcpy(t.data<uint8_t>(), bytes.data() + 16, t.nbytes());
  return t;
}

Tensor parse_idx_labels(const std::string& bytes, const std::string& what, int num_classes) {
  FQT_CHECK(num_classes > 0 && num_classes <= 256, "num_classes {} out of range", num_classes);
  std::vector<int64_t> dims = parse_idx_header(bytes, what, 1, "labels");
  Tensor t = Tensor::empty({dims[0]}, DType::i32);
  int32_t* y = t.data<int32_t>();
  const auto* p = reinterpret_cast<const uint8_t*>(bytes.data() + 8);
  for (int64_t i = 0; i < dims[0]; ++i) {
    FQT_INPUT_CHECK(p[i] < num_classes, "{}: label {} at index {} is out of range [0, {})", what,
                    p[i], i, num_classes);
    y[i] = p[i];
  }
  return t;
}

Dataset parse_idx_pair(const std::string& images_bytes, const std::string& labels_bytes,
                       const std::string& name, int num_classes, const std::string& images_what,
                       const std::string& labels_what) {
  Dataset ds;
  ds.images = parse_idx_images(gunzip_if_gzip(images_bytes, images_what), images_what);
  ds.labels = parse_idx_labels(gunzip_if_gzip(labels_bytes, labels_what), labels_what, num_classes);
  FQT_INPUT_CHECK(ds.images.size(0) == ds.labels.size(0),
                  "{}: {} images but {} has {} labels; the files belong to different splits?",
                  images_what, ds.images.size(0), labels_what, ds.labels.size(0));
  ds.num_classes = num_classes;
  ds.name = name;
  return ds;
}

Dataset load_idx_pair(const std::string& images_path, const std::string& labels_path,
                      const std::string& name, int num_classes) {
  Dataset ds = parse_idx_pair(read_whole_file(images_path), read_whole_file(labels_path), name,
                              num_classes, images_path, labels_path);
  ds.source = images_path;
  return ds;
}

}  // namespace fqt
