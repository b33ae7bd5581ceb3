"""Quad: the selection loop as a resumable state machine, its UCB bandit, tau calibration by
validation, and the score cache a refresh carries forward."""
