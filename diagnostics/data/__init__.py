"""data: problems and prompts: `Problem` and answer checks (`problems`: exact, math), prompt sets from files or
the hub (`prompt_sets`), and prompt rendering and tokenisation (`prompts`).
Imports `diagnostics.core` only.
"""
