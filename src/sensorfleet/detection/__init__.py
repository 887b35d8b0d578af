"""Streaming anomaly detection: causal detectors over reading series, NAB-style scoring.

    detectors   pure numpy/scipy: one series in, a score in [0, 1] per reading, causal
    nab         the Numenta Anomaly Benchmark's scoring (Ahmad et al. 2017)
    run         datasets and CSV files in, Parquet scores and a scoring report out
"""
