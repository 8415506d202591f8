"""Backend adapters: one module per (op, backend), each defining ``IMPLEMENTATION``.

``<op>_<backend>.py`` binds one backend (pure-JAX XLA code, cuDNN through ``jax.nn``, a
Pallas kernel from ``pallas_kernels``) to one op of :mod:`attnlab.ops`: its forward, its
optional backward and block phases, what it cannot compute (``unsupported``) and its config
class. The op's module lists its adapters in its one ``Registry(...)`` statement; see
``attnlab/ops/README.md``.
"""
