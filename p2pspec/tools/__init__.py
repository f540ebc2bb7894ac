"""Tooling, apart from the system it measures: benchmarks, the delay proxy that emulates
links, peer processes for tests and benchmarks (launch), network namespaces (netns) and
the reports benchmarks write. Nothing below this layer imports it."""
