"""The dtypes the soup reads and writes (a leaf table: the recipe offers `soup.dtype` from it)."""

from __future__ import annotations

# soup.dtype -> the safetensors dtype written.
OUTPUT_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
# Float dtypes of safetensors that can be averaged, by torch name.
FLOAT_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}  # fmt: skip
