"""From run to service: the HTTP server with dynamic batching, and the ONNX export and runtime."""
