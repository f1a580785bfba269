"""GPU benchmarks of training and sampling (bench_train.py, bench_sampling.py); see bench/README.md."""
