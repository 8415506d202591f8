"""attnlab's benchmarks: one harness, one module per benchmark.

* :mod:`~attnlab.bench.harness`: what every benchmark shares: FLOP counting, timing,
  correctness-before-timing (tolerances, errors), the anchors' names, JSON records;
* :mod:`~attnlab.bench.attention` (+ :mod:`~attnlab.bench.candidates`): ``attnlab bench
  attention``, every softmax implementation against cuDNN, XLA and tokamax;
* :mod:`~attnlab.bench.checks`: the correctness grid of ``attnlab demo``;
* :mod:`~attnlab.bench.decode`: decode attention, GB/s against the copy bandwidth;
* :mod:`~attnlab.bench.lightning` and :mod:`~attnlab.bench.lasp`: lightning attention against
  fla and a ``lax.scan`` anchor; LASP / LASP-2 on 1 or 2 devices;
* :mod:`~attnlab.bench.model`: train-step throughput and MFU of whole models;
* :mod:`~attnlab.bench.sp`: ring / striped / zigzag / Ulysses against one device;
* :mod:`~attnlab.bench.scaling` (+ ``scaling_plan``, ``scaling_run``, ``scaling_report``):
  sequence parallelism on meshes of 1 to 8 devices, within a time budget;
* :mod:`~attnlab.bench.autotune`: the Triton block-size search;
* shared pieces: :mod:`~attnlab.bench.memory` (compiled memory, maximum lengths),
  :mod:`~attnlab.bench.sharded` (sharded inputs and strategies as timed),
  :mod:`~attnlab.bench.hlo_comm` (communication volume read from compiled HLO).

Each benchmark with a command line runs as ``python -m attnlab.bench.<name> --help``; the
attention benchmark is ``attnlab bench attention``. Importing any of them changes neither the
environment nor JAX's configuration: a ``main()`` that needs ``XLA_FLAGS`` (``--smoke`` on 8
simulated CPU devices) or ``NCCL_NVLS_ENABLE`` sets it before JAX starts a backend.
"""
