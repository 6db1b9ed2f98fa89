"""Closed-loop evaluation of any policy in the simulators (TF-free).

  from qsft_vla.evaluation import loop, outcomes
  summary, episodes = loop.evaluate("babyai:BabyAI-GoToLocal-v0", policy, episodes=50, seed=0)
  print(outcomes.format_table({"Q-SFT": summary_qsft, "BC": summary_bc}))

`loop` runs episodes (the same episodes for every policy given the same seed,
so comparisons are paired), checks every action against the robot's bounds and
writes GIFs of the first few episodes; `outcomes` holds the Wilson interval, the
per-run summary and the comparison table. Used by `python -m qsft_vla.evaluate`
and the training loop's periodic evaluation. Never imports TensorFlow, TFDS or
Reverb.
"""
