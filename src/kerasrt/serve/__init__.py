"""Serving converted models: KServe's Open Inference Protocol server with dynamic batching
(``kerasrt serve``), and Ray Serve for more than one GPU or machine."""
