"""Writes .npy files NumPy produces, and checks files Petal produced.

Usage: npy_fixtures.py write DIR | npy_fixtures.py check FILE
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
else:
    a = np.load(sys.argv[2], allow_pickle=False)
    assert a.dtype == np.float32 and a.shape == (2, 2, 3), (a.dtype, a.shape)
    assert np.array_equal(a.ravel(), np.arange(12, dtype=np.float32) * 0.5), a
    print("petal npy ok")
