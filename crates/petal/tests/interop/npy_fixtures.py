"""Writes .npy files NumPy produces, and checks files Petal produced.

Usage: npy_fixtures.py write DIR | npy_fixtures.py check DIR

`check` loads DIR/<dtype>.npy for every dtype Petal writes (values
[[1, 0, 3], [1, 0, 2]]) and DIR/scalar_i64.npy (42, 0-d), and checks dtype,
shape and values as NumPy reads them.
"""
import sys

import numpy as np

if sys.argv[1] == "write":
    d = sys.argv[2]
    np.save(f"{d}/f32.npy", np.arange(6, dtype=np.float32).reshape(2, 3))
    np.save(f"{d}/f64_fortran.npy", np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3)))
    np.save(f"{d}/i64.npy", np.array([-3, 0, 7], dtype=np.int64))
    np.save(f"{d}/f16.npy", np.array([0.5, -2.0], dtype=np.float16))
    np.save(f"{d}/scalar.npy", np.float32(4.25))
    np.save(f"{d}/big_endian.npy", np.array([1.5, 2.5], dtype=">f4"))
    np.save(f"{d}/u8.npy", np.array([[1, 255]], dtype=np.uint8))
    np.save(f"{d}/bool.npy", np.array([True, False]))
    np.save(f"{d}/i32_fortran.npy", np.asfortranarray(np.arange(6, dtype=np.int32).reshape(3, 2)))
else:
    d = sys.argv[2]
    want = np.array([[1, 0, 3], [1, 0, 2]])
    for name in ["bool", "uint8", "int8", "int16", "uint16", "int32", "uint32", "int64",
                 "uint64", "float16", "float32", "float64"]:
        a = np.load(f"{d}/{name}.npy", allow_pickle=False)
        assert str(a.dtype) == name and a.shape == (2, 3), (name, a.dtype, a.shape)
        assert np.array_equal(a, want.astype(name)), (name, a)
    s = np.load(f"{d}/scalar_i64.npy", allow_pickle=False)
    assert s.dtype == np.int64 and s.shape == () and s == 42, s
    print("petal npy ok")
