#include "fqt/npy.hpp"

#include "fqt/checkpoint.hpp"  // write_file_atomic
#include "fqt/file.hpp"

#include <algorithm>
#include <bit>
#include <cstring>
#include <filesystem>
#include <fstream>

namespace fqt {

namespace {

[[noreturn]] void fail(const std::string& name, const std::string& msg) {
  throw InputError(fmt::format("{}: not a valid .npy array: {}", name, msg));
}

// Value text of `key` in the header dict, e.g. "'<f4'" or "(3, 4)" or "False".
std::string dict_value(const std::string& h, const std::string& key, const std::string& name) {
  size_t k = h.find("'" + key + "'");
  if (k == std::string::npos) k = h.find("\"" + key + "\"");
  if (k == std::string::npos) fail(name, fmt::format("header has no '{}' entry", key));
  size_t colon = h.find(':', k + key.size() + 2);
  if (colon == std::string::npos) fail(name, fmt::format("header entry '{}' has no value", key));
  size_t b = h.find_first_not_of(' ', colon + 1);
  if (b == std::string::npos) fail(name, fmt::format("header entry '{}' has no value", key));
  size_t e;
  if (h[b] == '(') {
    e = h.find(')', b);
    if (e == std::string::npos) fail(name, "unterminated shape tuple in header");
    ++e;
  } else if (h[b] == '\'' || h[b] == '"') {
    e = h.find(h[b], b + 1);
    if (e == std::string::npos) fail(name, fmt::format("unterminated string for '{}' in header", key));
    ++e;
  } else {
    e = h.find_first_of(",}", b);
    if (e == std::string::npos) fail(name, fmt::format("malformed value for '{}' in header", key));
  }
  std::string v = h.substr(b, e - b);
  while (!v.empty() && v.back() == ' ') v.pop_back();
  return v;
}

Shape parse_shape(const std::string& tuple, const std::string& name) {
  Shape shape;
  std::string inner = tuple.substr(1, tuple.size() - 2);
  size_t i = 0;
  while (i < inner.size()) {
    while (i < inner.size() && (inner[i] == ' ' || inner[i] == ',')) ++i;
    if (i >= inner.size()) break;
    if (inner[i] < '0' || inner[i] > '9')
      fail(name, fmt::format("shape {} is not a tuple of non-negative integers", tuple));
    int64_t d = 0;
    while (i < inner.size() && inner[i] >= '0' && inner[i] <= '9') {
      if (d > (INT64_MAX - 9) / 10) fail(name, fmt::format("dimension in shape {} is too large", tuple));
      d = d * 10 + (inner[i] - '0');
      ++i;
    }
    if (i < inner.size() && inner[i] == 'L') ++i;  // Python 2 longs
    if (i < inner.size() && inner[i] != ',' && inner[i] != ' ')
      fail(name, fmt::format("shape {} is not a tuple of non-negative integers", tuple));
    shape.push_back(d);
  }
  if (shape.size() > 8) fail(name, fmt::format("shape {} has more than 8 dimensions", tuple));
  return shape;
}

}  // namespace

Tensor parse_npy(const std::string& bytes, const std::string& name) {
  static const char magic[] = "\x93NUMPY";
  if (bytes.size() < 10 || std::memcmp(bytes.data(), magic, 6) != 0)
    fail(name, "missing the \\x93NUMPY magic (is this a .npy file? .npz archives are not supported)");
  const uint8_t major = static_cast<uint8_t>(bytes[6]);
  size_t header_len, header_start;
  if (major == 1) {
    header_len = static_cast<uint8_t>(bytes[8]) | (static_cast<size_t>(static_cast<uint8_t>(bytes[9])) << 8);
    header_start = 10;
  } else if (major == 2 || major == 3) {
    if (bytes.size() < 12) fail(name, "file ends inside the header length");
    header_len = 0;
    for (int i = 0; i < 4; ++i) header_len |= static_cast<size_t>(static_cast<uint8_t>(bytes[8 + i])) << (8 * i);
    header_start = 12;
  } else {
    fail(name, fmt::format("unsupported format version {}.{}", major, static_cast<int>(bytes[7])));
  }
  if (header_len > bytes.size() - header_start)
    fail(name, fmt::format("header of {} bytes runs past the end of the {}-byte file", header_len, bytes.size()));
  const std::string h = bytes.substr(header_start, header_len);
  if (h.find('{') == std::string::npos || h.find('}') == std::string::npos)
    fail(name, "header is not a Python dict literal");

  std::string descr = dict_value(h, "descr", name);
  if (descr.size() < 3 || (descr[0] != '\'' && descr[0] != '"')) fail(name, fmt::format("malformed descr {}", descr));
  descr = descr.substr(1, descr.size() - 2);
  const std::string fortran = dict_value(h, "fortran_order", name);
  if (fortran != "False" && fortran != "True") fail(name, fmt::format("fortran_order is '{}', not True or False", fortran));
  const std::string tuple = dict_value(h, "shape", name);
  if (tuple.empty() || tuple.front() != '(') fail(name, fmt::format("shape '{}' is not a tuple", tuple));
  Shape shape = parse_shape(tuple, name);

  DType dtype;
  bool big_endian;
  if (descr == "<f4" || descr == "=f4" || descr == ">f4") dtype = DType::f32;
  else if (descr == "<f8" || descr == "=f8" || descr == ">f8") dtype = DType::f64;
  else
    fail(name, fmt::format("dtype '{}' is not supported: save the array as float32 or float64", descr));
  big_endian = descr[0] == '>';

  // Size check without overflow: numel * itemsize must equal the bytes that follow the header.
  const size_t item = dtype_size(dtype);
  const size_t avail = bytes.size() - header_start - header_len;
  bool empty = false;
  for (int64_t d : shape) empty |= d == 0;
  size_t numel = empty ? 0 : 1;
  if (!empty)
    for (int64_t d : shape) {
      if (numel > avail / item / static_cast<size_t>(d))  // keeps numel * d * item <= avail
        fail(name, fmt::format("shape {} needs more data than the file holds ({} bytes; truncated?)", tuple, avail));
      numel *= static_cast<size_t>(d);
    }
  if (numel * item != avail)
    fail(name, fmt::format("shape {} of {} needs {} data bytes, the file has {}{}", tuple, descr, numel * item,
                           avail, numel * item > avail ? " (truncated?)" : ""));

  Tensor t = Tensor::empty(shape, dtype);
  const char* src = bytes.data() + header_start + header_len;
  std::memcpy(t.raw(), src, numel * item);
  if (big_endian != (std::endian::native == std::endian::big)) {
    auto* p = static_cast<unsigned char*>(t.raw());
    for (size_t i = 0; i < numel; ++i) std::reverse(p + i * item, p + (i + 1) * item);
  }
  if (fortran == "True" && shape.size() >= 2) {
    // Column-major on disk: transpose into row-major.
    Tensor c = Tensor::empty(shape, dtype);
    const auto* in = static_cast<const unsigned char*>(t.raw());
    auto* out = static_cast<unsigned char*>(c.raw());
    const int64_t nd = static_cast<int64_t>(shape.size());
    std::vector<int64_t> idx(nd, 0);
    for (size_t lin = 0; lin < numel; ++lin) {
      // idx is the multi-index of C-order position lin; compute its Fortran-order offset.
      size_t f = 0, stride = 1;
      for (int64_t d = 0; d < nd; ++d) {
        f += idx[d] * stride;
        stride *= shape[d];
      }
      std::memcpy(out + lin * item, in + f * item, item);
      for (int64_t d = nd - 1; d >= 0; --d) {
        if (++idx[d] < shape[d]) break;
        idx[d] = 0;
      }
    }
    t = c;
  }
  return t;
}

Tensor read_npy(const std::string& path) {
  std::error_code ec;
  const auto st = std::filesystem::status(path, ec);
  if (!ec && std::filesystem::is_directory(st)) throw InputError(fmt::format("{}: is a folder, not a .npy file", path));
  return parse_npy(read_whole_file(path), path);  // (a device such as /dev/zero: "not a regular file")
}

void write_npy(const std::string& path, const Tensor& t) {
  std::string descr;
  switch (t.dtype()) {
    case DType::f32: descr = "<f4"; break;
    case DType::f64: descr = "<f8"; break;
    case DType::u8: descr = "|u1"; break;
    case DType::i8: descr = "|i1"; break;
    case DType::i32: descr = "<i4"; break;
  }
  std::string shape = "(";
  for (size_t i = 0; i < t.shape().size(); ++i) shape += std::to_string(t.shape()[i]) + ", ";
  if (t.shape().size() > 1) shape.resize(shape.size() - 2);
  else if (t.shape().size() == 1) shape.resize(shape.size() - 1);
  shape += ")";
  std::string header = fmt::format("{{'descr': '{}', 'fortran_order': False, 'shape': {}, }}", descr, shape);
  while ((10 + header.size() + 1) % 64 != 0) header += ' ';
  header += '\n';
  {  // Never replace what is not an .npy file (a checkpoint, a device node) with one.
    std::error_code ec;
    const auto st = std::filesystem::symlink_status(path, ec);
    if (!ec && std::filesystem::exists(st)) {
      bool npy = false;
      if (std::filesystem::is_regular_file(st)) {
        std::ifstream old(path, std::ios::binary);
        char magic[6] = {};
        npy = old.read(magic, 6) && std::memcmp(magic, "\x93NUMPY", 6) == 0;
      }
      if (!npy)
        throw InputError(fmt::format("{}: exists and is not a .npy file; not replacing it (choose another output path)", path));
    }
  }
  // The same atomic write as the checkpoints (temporary named by pid, fsync, rename): a failure
  // leaves the previous file as it was and no temporary behind.
  std::string bytes("\x93NUMPY\x01\x00", 8);
  const uint16_t hl = static_cast<uint16_t>(header.size());
  bytes += static_cast<char>(hl & 0xff);
  bytes += static_cast<char>(hl >> 8);
  bytes += header;
  bytes.append(static_cast<const char*>(t.raw()), t.nbytes());
  write_file_atomic(path, bytes);
}

}  // namespace fqt
