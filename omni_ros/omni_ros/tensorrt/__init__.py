"""TensorRT acceleration: ONNX export, engine build/cache/manifest, runtime. Imported lazily."""
