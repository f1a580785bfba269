"""The maintained benchmarks (training, sampling, onnxruntime, time to quality) and the results report;
see bench/README.md."""
