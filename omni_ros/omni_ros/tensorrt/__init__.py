"""TensorRT acceleration: ONNX export, engine build/cache/manifest, runtime. Imported lazily.

Modules (nothing here imports ``tensorrt`` or ``pycuda`` at import time; only ``export``, ``tiny``
and the build/run paths import torch):

- ``specs``: the tensor boundary of each component (names, dtypes, shape profiles);
- ``export``: ONNX export, ``onnx.checker``, onnxruntime parity, fp16/bf16 graph conversion, the
  wrappers around the real MiniCPM-o submodules and the reference backend's components;
- ``build``: engine builds for TensorRT 10.x / 11.x through one adapter;
- ``cache``: keys, manifests, atomic writes under a file lock, verification;
- ``runtime``: ``TrtRunner``, the torch fallback with a diagnostics status, backend swapping;
- ``diagnostics``: ``ComponentStatus``;
- ``tiny``: tiny seeded stand-ins (SigLIP / Whisper classes) for CPU tests.

See docs/TENSORRT.md.
"""
