#!/usr/bin/env python3
"""Sums an `ncu --csv` run's kernels (gpu__time_duration.sum and, where measured,
dram__bytes_read.sum) by kernel name and grid: launches, time, time a launch, bytes a launch and
read rate, slowest first. Used by the device scripts (ncu_step.sh, lora.sh).

    ncu_summary.py CSV NAME
"""
import csv, sys
from collections import defaultdict
rows = [l for l in open(sys.argv[1]) if l.startswith('"')]
launches = defaultdict(dict)
unit = {"ns": 1e-6, "nsecond": 1e-6, "us": 1e-3, "usecond": 1e-3, "ms": 1.0, "msecond": 1.0,
        "byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "KB": 1e3, "MB": 1e6, "GB": 1e9}
for r in csv.DictReader(rows):
    key = (r["ID"], r["Kernel Name"].split("(")[0].split("<")[0], r.get("Grid Size", "?"))
    launches[key][r["Metric Name"]] = float(r["Metric Value"].replace(",", "")) * unit[r["Metric Unit"]]
groups = defaultdict(lambda: [0, 0.0, 0.0])
for (_, name, grid), m in launches.items():
    g = groups[(name, grid)]
    g[0] += 1
    g[1] += m.get("gpu__time_duration.sum", 0.0)
    g[2] += m.get("dram__bytes_read.sum", 0.0)
whole = sum(g[1] for g in groups.values())
print(f"{sys.argv[2]}: {whole:.3f} ms over {len(launches)} kernels (serialized)")
for (name, grid), (n, ms, b) in sorted(groups.items(), key=lambda kv: -kv[1][1]):
    print(f"{ms:8.3f} ms x{n:4d} {1e3 * ms / n:7.2f} us {b / n / 1e6:8.2f} MB {b / ms / 1e9:6.2f} TB/s  {name} grid {grid}")
