"""Applications built on the layers below: the demo, the benchmarks, the sample-quality judge."""
