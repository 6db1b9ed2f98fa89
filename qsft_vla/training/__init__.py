"""What the training binary (qsft_vla/train.py) is made of, each piece small and tested:

  batches.py        numpy pipeline batches -> learner batches (instruction ids,
                    filtered-BC keep flags, microbatch stacking)
  data_iterator.py  the tf.data iterator position as an orbax checkpoint item
  metrics.py        metrics.jsonl + TensorBoard scalars + a progress line with rate and ETA

Training imports TensorFlow (the input pipeline); the controller never does.
"""
