"""Optional CUDA kernels, compiled by CuPy on first use; each has a torch implementation in
:mod:`snn_localrules.functional` that runs wherever they cannot."""
