#!/usr/bin/env python3
"""seeds.py OUTDIR: writes seed corpora for the fuzz harnesses into
OUTDIR/<harness>/ (idx, cifar, csv, image). Small valid inputs plus the
fixtures of tests/fixtures/data/."""
import gzip
import os
import struct
import sys
import zlib

out = sys.argv[1]
fix = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "data")


def put(harness, name, data):
    d = os.path.join(out, harness)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def idx(tc, dims, payload):
    return struct.pack(">BBBB", 0, 0, tc, len(dims)) + b"".join(struct.pack(">I", d) for d in dims) + payload


put("idx", "ubyte", idx(8, [2, 3], bytes(range(6))))
put("idx", "byte", idx(9, [4], b"\x80\x7f\x00\xff"))
put("idx", "short", idx(0x0B, [2, 1], struct.pack(">hh", -5, 300)))
put("idx", "int", idx(0x0C, [1, 1, 2], struct.pack(">ii", -7, 1 << 20)))
put("idx", "float", idx(0x0D, [1, 1, 1, 2], struct.pack(">ff", 1.5, -2)))
put("idx", "double", idx(0x0E, [1], struct.pack(">d", 0.1)))
put("idx", "gz", gzip.compress(idx(8, [3, 4, 4], bytes(range(48))), mtime=0))
for name in ("mnist_images.idx3.gz", "mnist_labels.idx1.gz"):
    with open(os.path.join(fix, name), "rb") as f:
        put("idx", name, f.read())

put("cifar", "one", bytes([3]) + bytes(i % 256 for i in range(3072)))
put("cifar", "two", bytes([0]) + bytes(3072) + bytes([9]) + bytes([255]) * 3072)

put("csv", "plain", b"\x00" + b"1,2,3\n4.5,-6e3,7\n")
put("csv", "header", b"\x01" + b"a,b\r\n1,2\r\n\r\n3,4\r\n")
put("csv", "semi", b"\x02" + b"1;2\n3;4")
put("csv", "tab", b"\x04" + b"1\t2\n 3 \t inf\n")

for name in ("rgb_3x2.png", "gray_3x2.png"):
    with open(os.path.join(fix, name), "rb") as f:
        data = f.read()
    put("image", name, b"\x01" + data)
    put("image", name + ".r", b"\x02" + data)
bmp = struct.pack("<2sIII", b"BM", 54 + 16, 0, 54) + struct.pack("<IiiHHIIiiII", 40, 2, 2, 1, 24, 0, 16, 0, 0, 0, 0)
put("image", "bmp", b"\x01" + bmp + bytes(range(16)))

# safetensors: the format fixtures (written by tests/fixtures/safetensors/make.py)
std = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "safetensors")
for name in sorted(os.listdir(std)):
    if name.endswith(".safetensors"):
        with open(os.path.join(std, name), "rb") as f:
            put("safetensors", name, f.read())
