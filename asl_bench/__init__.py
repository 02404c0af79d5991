"""Benchmark of the ASL bundle against averaging and classical denoisers: a library (:mod:`asl_bench.core`,
:mod:`asl_bench.classical`) and the ``asl-benchmark`` and ``asl-check-cbf`` commands."""
