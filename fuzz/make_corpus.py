#!/usr/bin/env python3
"""Regenerates the seed corpus in fuzz/corpus/<reader>/ (valid and near-valid files, a few KB
each). Standard library only; deterministic. Run from anywhere: python3 fuzz/make_corpus.py"""
import gzip, json, os, struct

HERE = os.path.dirname(os.path.abspath(__file__))


def put(reader, name, data):
    d = os.path.join(HERE, "corpus", reader)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def pix(n):
    return bytes((i * 37 + 11) % 256 for i in range(n))


# ---- IDX: first byte selects the entry point (see fuzz_idx.cpp) ----------------------------
def idx_images(n, h, w):
    return struct.pack(">IIII", 0x803, n, h, w) + pix(n * h * w)


def idx_labels(n, classes=10):
    return struct.pack(">II", 0x801, n) + bytes(i % classes for i in range(n))


put("idx", "images_3x5x4", b"\x00" + idx_images(3, 5, 4))
put("idx", "images_28x28", b"\x00" + idx_images(2, 28, 28))
put("idx", "images_truncated", b"\x00" + idx_images(3, 5, 4)[:-7])
put("idx", "labels_12", b"\x01" + idx_labels(12))
put("idx", "labels_bad_label", b"\x01" + struct.pack(">II", 0x801, 3) + b"\x01\x0c\x02")
put("idx", "images_gz", b"\x02" + gzip.compress(idx_images(4, 6, 6), mtime=0))
put("idx", "images_gz_truncated", b"\x02" + gzip.compress(idx_images(4, 6, 6), mtime=0)[:-5])
img, lab = idx_images(6, 4, 4), idx_labels(6)
cut = len(img) + 1  # bytes[1:cut] = images, bytes[cut:] = labels (see fuzz_idx.cpp)
total = len(img) + len(lab) + 1
put("idx", "pair", b"\x03" + bytes([((cut - 1) * 255 + total - 2) // (total - 1)]) + img + lab)
put("idx", "pair_gz", b"\x03\x80" + gzip.compress(img, mtime=0) + gzip.compress(lab, mtime=0))

# ---- CIFAR-10: records of 1 label byte + 3072 pixels ----------------------------------------
put("cifar", "one_record", b"\x03" + pix(3072))
put("cifar", "two_records", b"\x00" + pix(3072) + b"\x09" + pix(3072)[::-1])
put("cifar", "bad_label", b"\x0a" + pix(3072))
put("cifar", "truncated", b"\x01" + pix(3000))


# ---- .npy -----------------------------------------------------------------------------------
def npy(header, payload, major=1):
    h = header
    pre = 10 if major == 1 else 12
    while (pre + len(h) + 1) % 64:
        h += " "
    h = (h + "\n").encode("latin1")
    ln = struct.pack("<H", len(h)) if major == 1 else struct.pack("<I", len(h))
    return b"\x93NUMPY" + bytes([major, 0]) + ln + h + payload


f4 = struct.pack("<6f", 1, 2, 3, 4, 5, 6)
put("npy", "f4_2x3", npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", f4))
put("npy", "f8_be_fortran", npy("{'descr': '>f8', 'fortran_order': True, 'shape': (3, 2), }", struct.pack(">6d", 1, 2, 3, 4, 5, 6)))
put("npy", "f4_v2_1d", npy("{'descr': '<f4', 'fortran_order': False, 'shape': (6,), }", f4, major=2))
put("npy", "f4_v3_3d", npy("{'descr': '<f4', 'fortran_order': True, 'shape': (1, 2, 3), }", f4, major=3))
put("npy", "f4_scalar", npy("{'descr': '<f4', 'fortran_order': False, 'shape': (), }", f4[:4]))
put("npy", "f4_empty", npy("{'descr': '<f4', 'fortran_order': False, 'shape': (0, 5), }", b""))
put("npy", "truncated", npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", f4[:-3]))
put("npy", "i4_unsupported", npy("{'descr': '<i4', 'fortran_order': False, 'shape': (2,), }", b"\0" * 8))


# ---- safetensors ----------------------------------------------------------------------------
def safetensors(tensors, metadata=None):
    header, data = {}, b""
    if metadata:
        header["__metadata__"] = metadata
    for name, dtype, shape, payload in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(payload)]}
        data += payload
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


meta = {"fqt.format": "fqt-checkpoint", "fqt.version": "1", "fqt.epoch": "1", "fqt.step": "32",
        "fqt.seed": "0", "fqt.rng.data.shuffle": "17", "fqt.config": "{\"model\": \"cnn\"}"}
put("safetensors", "checkpoint_like", safetensors([
    ("param/conv1.weight", "F32", [2, 1, 3, 3], struct.pack("<18f", *range(18))),
    ("buffer/bn1.running_mean", "F32", [2], struct.pack("<2f", 0.5, -0.5)),
    ("momentum/conv1.weight", "F32", [2, 1, 3, 3], b"\0" * 72)], meta))
put("safetensors", "all_dtypes", safetensors([
    ("a", "F64", [2], struct.pack("<2d", 1.5, -2)), ("b", "I8", [3], b"\x01\xff\x02"),
    ("c", "U8", [2, 2], b"\x00\x01\x02\x03"), ("d", "I32", [1], struct.pack("<i", -7)),
    ("e", "I64", [2], struct.pack("<2q", 1, -1)), ("f", "F32", [0, 3], b"")]))
put("safetensors", "scalar", safetensors([("s", "F32", [], struct.pack("<f", 3.25))]))
put("safetensors", "unsupported_dtype", safetensors([("h", "F16", [2], b"\0" * 4)]))
good = safetensors([("w", "F32", [2, 2], struct.pack("<4f", 1, 2, 3, 4))])
put("safetensors", "truncated", good[:-5])
put("safetensors", "hole", safetensors([("w", "F32", [1], b"\0" * 4)])[:-4] + b"\0" * 8)
