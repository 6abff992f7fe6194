"""Checks that round r+1's global model is NumPy's weighted average of round r's updates.

Usage: check_fedavg.py LOG_0 LOG_1
"""
import json
import sys

import numpy as np

logs = [json.load(open(p)) for p in sys.argv[1:]]
rounds = sorted({e["round"] for log in logs for e in log})
assert len(rounds) >= 2, f"need two rounds of fits, got {rounds}"
for r in rounds[:-1]:
    entries = [e for log in logs for e in log if e["round"] == r]
    nxt = [e for log in logs for e in log if e["round"] == r + 1]
    weights = [e["num_examples"] for e in entries]
    for i in range(len(entries[0]["returned"])):
        expected = np.average(
            np.stack([np.asarray(e["returned"][i], dtype=np.float64) for e in entries]),
            axis=0, weights=weights,
        )
        for e in nxt:
            got = np.asarray(e["received"][i])
            assert np.allclose(got, expected, rtol=1e-6, atol=1e-6), (r, i, got, expected)
            assert e["dtypes"][i] == "float32", e["dtypes"]
print(f"fedavg ok over rounds {rounds}")
