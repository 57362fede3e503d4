"""diagnostics: the base library every command uses, and the fixed-context diagnostic built on it.

Rooms, bottom first; each imports only the rooms above it in this list (held by tests/test_house.py):
    core/         configs and overrides, atomic files, run directories and their lock, the non-finite record,
                  progress, the registry helper, the one seed derivation
    lm/           model loading and the pair check, precision, the one padded forward
    data/         Problem and answer checks, prompt sets, prompt rendering
    signals/      token signals (exact, top-K), normalisation, the score registry, selection
    losses.py     the loss registry
    generation/   the backend seam and its backends (hf, vllm), rollouts, the rollout store, scoring types
    accuracy.py   answer accuracy of a model on problems (greedy or sampled)
    testbed/      the embedded teacher-student pair: config, tasks, build, report, the Qwen2 tokenizer
    bank.py, engine.py, pair.py   the context bank, the fixed-context engine, a run's pair and prompts
    shards.py     the bank's resumable shards, split over the processes of a torchrun launch
    diagnose_config.py, diagnose.py   the diagnostic's config and its recipe (`taopd diagnose`)
Nothing here imports `opd`, `analysis` or `taopd`.
"""
