"""The XLA flags of test processes, the suite's and the runs it launches. Imports nothing, so that
conftest can set them before JAX is imported.

At the micro scale the tests are compile-bound. Level 0 compiles a train step about 2.5x faster
than the optimised CPU build; the older loop emitters for fusions, instead of XLA's fusion
emitters, halve what is left (the micro step: 4.6 s to 2.1 s on 2 cores). Results agree with the
default build within float32 rounding.
"""

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
