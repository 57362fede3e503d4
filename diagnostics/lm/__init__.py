"""lm: language models as the toolkit uses them: loading and the pair check (`models`), precision (`precision`),
and the one padded forward (`forward`: `ResponseBatch`, `PositionLM`, chunked log-probs).
Imports `diagnostics.core` only.
"""
