"""Engram Studio: give a language model a sparse, inspectable memory of its user."""

import os

__version__ = "0.1.0"

# OpenMP threads waiting at a barrier spin GOMP_SPINCOUNT times before they sleep (libgomp's default,
# 300,000, is milliseconds). The chat and the training worker are two processes on the same cores, and
# a thread spinning for its partner takes the core that partner needs: beside a training job the chat
# fell to 0.03x of its speed alone and the job to 0.05x of its own. At 10,000 both keep their speed
# alone (the chat 0.97x, a training step 0.96x) and, with the chat on half the threads while a job
# trains (inference/threads.py), keep 0.75x and 0.35x beside each other
# (bench/chat_beside_training.py; docs/CHAT.md "Chat while a job trains"). Set here, before torch
# loads libgomp (the OpenMP runtime of PyTorch's Linux wheels; others ignore it), in every process of
# the app (the worker starts as ``python -m engram_app``); a value already in the environment wins.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
