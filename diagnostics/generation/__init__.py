"""generation: rollouts and teacher scoring behind one backend seam.

`backends` (the protocol, registry, `SamplingConfig`), each backend whole in one file (`hf`: sampling, greedy
generation for accuracy, exact scoring; `vllm`: engine, weight sync, sampling, top-K scoring), `scoring` (the
shared `ScoredBatch` and store helpers), `rollouts` (`generate_rollouts`), `store` (the parquet rollout store).
Imports `diagnostics.core`, `lm`, `data` and `signals`.
"""
