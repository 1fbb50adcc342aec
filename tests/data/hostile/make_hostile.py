#!/usr/bin/env python3
"""Writes the hostile safetensors files in this directory and the fuzzer's seed corpus.

Each file is named "<reason>[.<variant>].safetensors" after the Status reason
("safetensors.<reason>") the parser must reject it with; tests/safetensors_test.cc checks
every file here against its name. Valid files go only to the fuzzer corpus.
Run from anywhere: python3 tests/data/hostile/make_hostile.py
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "..", "..", "fuzz", "corpus", "safetensors_header")


def image(header, data=b"", length=None):
    if isinstance(header, str):
        header = header.encode("utf-8")
    n = len(header) if length is None else length
    return struct.pack("<Q", n) + header + data


def entry(dtype, shape, b, e):
    return '{"dtype":"%s","shape":%s,"data_offsets":[%d,%d]}' % (dtype, shape, b, e)


HOSTILE = {
    "file_too_small": b"\x10\x00\x00",
    "header_too_large": image("{}", length=1 << 63),
    "header_out_of_bounds": image("{}", length=4096),
    "invalid_utf8": image(b'{"w\xed\xa0\x80":' + entry("U8", "[1]", 0, 1).encode() + b"}", b"\x00"),
    "invalid_utf8.overlong": image(b'{"\xc0\xaf":{}}'),
    "invalid_json": image('{"w":' + entry("U8", "[1]", 0, 1), b"\x00"),
    "invalid_json.bom": image(b"\xef\xbb\xbf{}"),
    "not_an_object": image("[]"),
    "not_an_object.entry": image('{"w":[0,1]}', b"\x00"),
    "duplicate_key": image('{"w":%s,"w":%s}' % (entry("U8", "[1]", 0, 1), entry("U8", "[1]", 1, 2)), b"\x00\x00"),
    "duplicate_key.nested": image('{"w":{"dtype":"U8","shape":[1],"shape":[1],"data_offsets":[0,1]}}', b"\x00"),
    "bad_tensor_entry": image('{"w":{"dtype":"U8","shape":[1.0],"data_offsets":[0,1]}}', b"\x00"),
    "bad_tensor_entry.negative": image('{"w":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}}', b"\x00"),
    "bad_tensor_entry.extra": image('{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":0}}', b"\x00"),
    "bad_tensor_entry.huge": image('{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,18446744073709551616]}}', b"\x00"),
    "unsupported_dtype": image('{"w":%s}' % entry("F128", "[1]", 0, 16), b"\x00" * 16),
    "shape_overflow": image('{"w":%s}' % entry("F32", "[4294967296,4294967296]", 0, 0)),
    "partial_byte": image('{"w":%s}' % entry("F4", "[3]", 0, 2), b"\x00" * 2),
    "partial_byte.f6": image('{"w":%s}' % entry("F6_E2M3", "[2,3]", 0, 5), b"\x00" * 5),
    "size_mismatch": image('{"w":%s}' % entry("F32", "[2,2]", 0, 12), b"\x00" * 12),
    "offset_out_of_bounds": image('{"w":%s}' % entry("U8", "[64]", 0, 64), b"\x00" * 8),
    "offset_out_of_bounds.reversed": image('{"w":%s}' % entry("U8", "[4]", 8, 4), b"\x00" * 8),
    "overlap": image('{"a":%s,"b":%s}' % (entry("U8", "[8]", 0, 8), entry("U8", "[8]", 4, 12)), b"\x00" * 12),
    "gap": image('{"a":%s,"b":%s}' % (entry("U8", "[4]", 0, 4), entry("U8", "[4]", 8, 12)), b"\x00" * 12),
    "trailing_data": image('{"a":%s}' % entry("U8", "[4]", 0, 4), b"\x00" * 8),
    "bad_metadata": image('{"__metadata__":{"k":1}}'),
}

VALID = {
    "valid.empty": image("{}      "),
    "valid.two": image(
        '{"__metadata__":{"format":"pt"},"b":%s,"a":%s}' % (entry("F32", "[2]", 8, 16), entry("BF16", "[2,2]", 0, 8)),
        bytes(range(16))),
    "valid.zero_size": image('{"z":%s,"s":%s}' % (entry("F16", "[0,3]", 0, 0), entry("F64", "[]", 0, 8)), b"\x01" * 8),
    "valid.sub_byte": image('{"f4":%s,"f6":%s,"e8":%s}' % (entry("F4", "[2,3]", 0, 3), entry("F6_E3M2", "[4]", 3, 6),
                                                           entry("F8_E8M0", "[2]", 6, 8)), bytes(range(8))),
}


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)


def main():
    os.makedirs(CORPUS, exist_ok=True)
    for name, data in HOSTILE.items():
        write(os.path.join(HERE, name + ".safetensors"), data)
        write(os.path.join(CORPUS, name), data)
    for name, data in VALID.items():
        write(os.path.join(CORPUS, name), data)


if __name__ == "__main__":
    main()
