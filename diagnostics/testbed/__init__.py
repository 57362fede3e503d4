"""testbed: the embedded teacher-student pair: its config (`config`), synthetic tasks (`task`), build and cache
(`build`), report (`report`), and the offline Qwen2 tokenizer (`qwen_vocab`).
Imports `diagnostics.core`, `lm`, `data`, `generation` and `diagnostics.accuracy`.
"""
