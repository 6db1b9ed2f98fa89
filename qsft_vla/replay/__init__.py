"""Reverb replay: a server with one table of training examples, and the
inserters that fill it. TensorFlow and Reverb live here and in data/, never on
the robot-host path; offline training on one host does not need them."""
