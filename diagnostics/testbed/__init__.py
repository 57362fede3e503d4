"""testbed: the embedded teacher-student pair: its config (`config`), synthetic tasks (`task`), build and cache
(`build`), report (`report`), the offline Qwen2 tokenizer (`qwen_vocab`), the testbeds shipped inside the package
(`shipped/`, checked by `manifest`; a rebuild compared with them by `rebuild`), and Qwen3-shaped random pairs at the
published shapes with Qwen3's tokenizer (`qwen3`).
Imports `diagnostics.core`, `lm`, `data`, `generation` and `diagnostics.accuracy`.
"""
