#!/usr/bin/env python3
"""Requantizes a GGUF with llama.cpp's own quantizer (through llama-cpp-python), for the Q8_0
row of scripts/bench-cpu: the same weights as the source GGUF, in another block type.

The default model ships only as Q4_1, so its Q8_0 twin is requantized from the Q4_1 values
(llama.cpp's `--allow-requantize`): every Q4_1 value is within Q8_0's rounding of its Q8_0
value, so both files compute nearly the same model.

Usage: llamacpp_quantize.py SOURCE.gguf OUT.gguf [--type q8_0] [--threads 2]
"""
import argparse
import ctypes
import sys

import llama_cpp

# llama.h's `llama_ftype` values of the types scripts/bench-cpu and the import checks use.
FTYPES = {
    "q4_0": 2,
    "q4_1": 3,
    "q8_0": 7,
    "q5_1": 9,
    "q3_k_s": 11,
    "q3_k_m": 12,
    "q4_k_m": 15,
    "q5_k_m": 17,
    "q6_k": 18,
    "iq3_xxs": 23,
    "iq4_nl": 25,
    "iq3_s": 26,
    "iq3_m": 27,
    "iq2_s": 28,
    "iq2_m": 29,
    "iq4_xs": 30,
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("source")
    p.add_argument("out")
    p.add_argument("--type", default="q8_0", choices=sorted(FTYPES))
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = a.threads
    params.ftype = FTYPES[a.type]
    params.allow_requantize = True
    # The output (and tied embedding) tensors in the same type as the rest.
    params.quantize_output_tensor = True
    rc = llama_cpp.llama_model_quantize(
        a.source.encode(), a.out.encode(), ctypes.byref(params)
    )
    if rc != 0:
        sys.exit(f"llama_model_quantize failed with {rc}")


if __name__ == "__main__":
    main()
