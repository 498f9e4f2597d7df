"""The sections of benchmarks/accelerator_suite.py (the entry point: arguments, budget, watchdog, files).

``sizes``: the shapes of a full and a --smoke run; ``record``: one section's record (rows, notes, goals,
its share of the budget) and the helpers every section uses; ``report``: the Markdown; one module per
group of sections, each a function ``(section, suite) -> None``: ``kernels`` (1. kernel_correctness,
2. kernel_timing, 3. tile_table), ``attention`` (4.), ``train_mfu`` (5.), ``qlora_step`` (6., its
process included). Imported with benchmarks/ on ``sys.path``, as is benchmarks/qlora_matmul.py.
"""
