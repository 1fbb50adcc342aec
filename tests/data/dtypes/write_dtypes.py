#!/usr/bin/env python3
"""An independent safetensors writer: one tensor of every dtype the format defines.

It shares no code with weightd: it follows the format as specified
(https://huggingface.co/docs/safetensors: u64 little-endian header length, the JSON header,
then the data section; sub-byte dtypes packed without padding) with nothing but the Python
standard library, so that tests/dtype_test.cc and tests/torch/shim_test.cc can check that
weightd serves files it did not write, bit for bit. The values are encoded from their
definitions (the format's bias and field widths), not copied from weightd.

    write_dtypes.py OUTDIR [all|unsupported|partial_byte]

writes OUTDIR/model.safetensors and OUTDIR/expected.json:
    {"tensors": [{"name", "dtype", "shape", "hex", "values"}]}
"hex" is the tensor's bytes as written; "values" the numbers they encode (null for NaN, [re, im]
for C64), where the type has a number for each element. The other variants write a file that
a correct reader must refuse: a dtype name of no safetensors release ("unsupported") and F4
values that end inside a byte ("partial_byte").
"""
import json
import os
import struct
import sys


def ieee(fmt, values):
    return b"".join(struct.pack("<" + fmt, v) for v in values)


def bf16(values):
    # bfloat16 is the upper half of a float32; these values are exact in both.
    return b"".join(struct.pack("<I", struct.unpack("<I", struct.pack("<f", v))[0])[2:] for v in values)


def minifloat(value, exp_bits, man_bits, bias):
    """Sign, exponent and mantissa fields of a normal `value` that the format holds exactly."""
    sign = 1 if value < 0 else 0
    m, e = abs(value), 0
    while m >= 2:
        m, e = m / 2, e + 1
    while m < 1:
        m, e = m * 2, e - 1
    field = e + bias
    frac = (m - 1) * (1 << man_bits)
    assert 0 < field < (1 << exp_bits) and frac == int(frac), (value, exp_bits, man_bits)
    return (sign << (exp_bits + man_bits)) | (field << man_bits) | int(frac)


def pack_bits(codes, bits):
    """Packs `bits`-wide codes into bytes, the first code in the lowest bits."""
    acc = 0
    for i, c in enumerate(codes):
        acc |= c << (i * bits)
    total = len(codes) * bits
    assert total % 8 == 0
    return acc.to_bytes(total // 8, "little")


def tensors_all():
    t = []

    def add(name, dtype, shape, data, values=None):
        t.append({"name": name, "dtype": dtype, "shape": shape, "data": data, "values": values})

    add("f64", "F64", [2], ieee("d", [1.5, -2.25]), [1.5, -2.25])
    add("f32", "F32", [3], ieee("f", [0.5, -3.0, 1024.0]), [0.5, -3.0, 1024.0])
    add("f16", "F16", [3], ieee("e", [1.0, -0.5, 65504.0]), [1.0, -0.5, 65504.0])
    add("bf16", "BF16", [3], bf16([1.0, -2.0, 0.15625]), [1.0, -2.0, 0.15625])
    add("i64", "I64", [2], ieee("q", [-1, 1 << 62]), [-1, 1 << 62])
    add("i32", "I32", [2], ieee("i", [-7, (1 << 31) - 1]), [-7, (1 << 31) - 1])
    add("i16", "I16", [2], ieee("h", [-300, 300]), [-300, 300])
    add("i8", "I8", [2], ieee("b", [-128, 127]), [-128, 127])
    add("u64", "U64", [2], ieee("Q", [(1 << 64) - 1, 1]), [(1 << 64) - 1, 1])
    add("u32", "U32", [1], ieee("I", [(1 << 32) - 1]), [(1 << 32) - 1])
    add("u16", "U16", [2], ieee("H", [65535, 7]), [65535, 7])
    add("u8", "U8", [2], bytes([0, 255]), [0, 255])
    add("bool", "BOOL", [3], bytes([1, 0, 1]), [1, 0, 1])
    # FP8 E4M3 ("fn": no infinities), bias 7; E5M2, bias 15.
    e4m3 = [1.0, -2.0, 448.0]
    add("f8_e4m3", "F8_E4M3", [3], bytes(minifloat(v, 4, 3, 7) for v in e4m3), e4m3)
    e5m2 = [1.0, -2.0, 57344.0]
    add("f8_e5m2", "F8_E5M2", [3], bytes(minifloat(v, 5, 2, 15) for v in e5m2), e5m2)
    # E8M0: a biased exponent alone (bias 127), 2^(code - 127); 0xff is NaN.
    add("f8_e8m0", "F8_E8M0", [2, 3], bytes([127, 128, 0, 254, 126, 255]),
        [1.0, 2.0, 2.0 ** -127, 2.0 ** 127, 0.5, None])
    # The fnuz variants: no infinities, no negative zero (0x80 is their one NaN); bias 8 and 16.
    fnuz = [1.0, -2.0, 0.25]
    add("f8_e4m3fnuz", "F8_E4M3FNUZ", [4], bytes([minifloat(v, 4, 3, 8) for v in fnuz] + [0x80]), fnuz + [None])
    add("f8_e5m2fnuz", "F8_E5M2FNUZ", [4], bytes([minifloat(v, 5, 2, 16) for v in fnuz] + [0x80]), fnuz + [None])
    c64 = [(1.5, -2.0), (0.0, 3.25)]
    add("c64", "C64", [2], b"".join(struct.pack("<ff", re, im) for re, im in c64), [list(z) for z in c64])
    # FP4 E2M1 (bias 1): codes 0..7 are 0, 0.5, 1, 1.5, 2, 3, 4, 6; bit 3 is the sign.
    f4_codes = [2, 3, 4, 5, 6, 7, 0xA, 0x1]
    add("f4", "F4", [2, 4], pack_bits(f4_codes, 4), [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -1.0, 0.5])
    # FP6 E2M3 (bias 1) and E3M2 (bias 3): four values in three bytes.
    e2m3 = [1.0, -1.5, 7.5, 0.125 * 9]
    add("f6_e2m3", "F6_E2M3", [2, 4], pack_bits([minifloat(v, 2, 3, 1) for v in e2m3 * 2], 6), e2m3 * 2)
    e3m2 = [1.0, -0.25, 28.0, 1.75]
    add("f6_e3m2", "F6_E3M2", [4], pack_bits([minifloat(v, 3, 2, 3) for v in e3m2], 6), e3m2)
    # Zero-size tensors of sub-byte types are legal (an even last dimension, so that LibTorch's
    # packed float4_e2m1fn_x2 can hold it too: the shim refuses an odd one, OddF4LastDimension...).
    add("f4_empty", "F4", [0, 6], b"", [])
    return t


def tensors_unsupported():
    # A name no safetensors release defines (as a newer writer might produce).
    return [{"name": "w", "dtype": "F8_E3M4", "shape": [2], "data": b"\x01\x02", "values": None}]


def tensors_partial_byte():
    # Three F4 values are 12 bits: the tensor ends inside a byte. The header claims 2 bytes.
    return [{"name": "w", "dtype": "F4", "shape": [3], "data": b"\x21\x03", "values": None}]


def write(out_dir, tensors):
    header, offset = {"__metadata__": {"format": "pt", "writer": "tests/data/dtypes/write_dtypes.py"}}, 0
    for t in tensors:
        header[t["name"]] = {"dtype": t["dtype"], "shape": t["shape"], "data_offsets": [offset, offset + len(t["data"])]}
        offset += len(t["data"])
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned, as the reference pads
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for t in tensors:
            f.write(t["data"])
    expected = [{"name": t["name"], "dtype": t["dtype"], "shape": t["shape"], "hex": t["data"].hex(),
                 "values": t["values"]} for t in tensors]
    with open(os.path.join(out_dir, "expected.json"), "w") as f:
        json.dump({"tensors": expected}, f, indent=1)


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    variant = sys.argv[2] if len(sys.argv) == 3 else "all"
    makers = {"all": tensors_all, "unsupported": tensors_unsupported, "partial_byte": tensors_partial_byte}
    if variant not in makers:
        sys.exit("unknown variant " + variant)
    write(sys.argv[1], makers[variant]())


if __name__ == "__main__":
    main()
