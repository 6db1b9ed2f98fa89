"""The robot host's package: a trained policy, its checkpoints and the controller.

  from qsft_vla.policy import Controller, TrainedPolicy
  ctrl = Controller.load("/path/to/workdir")

  layout.py       how a run's parameters are grouped (training groups, acting networks)
  checkpoints.py  the checkpoint format: save, verify, restore, metadata
  bundle.py       TrainedPolicy: model, configs, tokenizers, robot, statistics, params
  controller.py   Controller: observations + instruction -> bounded actions

Imports no TensorFlow, TFDS, Reverb or optax (tests/test_tf_free_core.py).
"""

from qsft_vla.policy.bundle import TrainedPolicy  # noqa: F401
from qsft_vla.policy.controller import Controller, ControllerError, ObservationError  # noqa: F401
