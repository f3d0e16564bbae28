"""What a CPU's calibration table looks like: one table measured on a quiet machine,
shipped with KQL as a prior.

Its absolute speed says little about another CPU; its *shape* says a lot: a CPU that
runs a dense convolution at some rate copies memory, pools and dispatches at rates
within a small factor of the same proportions. A busy machine corrupts a table
unevenly (beside six CPU-bound processes on two cores the convolution rates moved 2x
while copy bandwidth fell 40-80x), so each entry is
compared with the prior scaled by the table's own convolution speed
(:func:`kql.planner.calibrate.implausible`), and an entry far off is repaired from it.

Measured with ``kql.planner.calibrate.measure('cpu')`` on an AMD EPYC (AVX-512), 2 threads,
batch 16, torch 2.14.1, load average 0.3; rounded to two digits. No GPU prior is
shipped: a GPU table is checked for its shape only.
"""

CPU = {
    "dense": [[4.0e9, 14e9, 50e9, 100e9, 120e9],
              [15e9, 51e9, 130e9, 180e9, 200e9],
              [42e9, 110e9, 180e9, 210e9, 200e9],
              [48e9, 140e9, 190e9, 210e9, 210e9],
              [60e9, 150e9, 210e9, 220e9, 220e9]],
    "depthwise": [1.3e9, 4.6e9, 16e9, 45e9, 87e9],
    "matmul": 36e9,
    "bandwidth": 66e9,
    "overhead": 1e-5,
    "node_overhead": 1e-4,
    "gather_rate": 4.6e9,
    "pool": 12e9,
}
