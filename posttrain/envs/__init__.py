"""Multi-turn text environments for agent RL (EPO's setting): sparse terminal rewards, env feedback tokens
masked out of the loss. `guessing` holds a number-guessing game with higher/lower feedback."""

from posttrain.envs.guessing import (
    GuessingGame,
    GuessingGameTool,
    GuessingTask,
    guessing_dataset,
    guessing_reward,
    guessing_rollout,
    secrets_from_dataset,
)

__all__ = ["GuessingGame", "GuessingGameTool", "GuessingTask", "guessing_dataset", "guessing_reward",
           "guessing_rollout", "secrets_from_dataset"]
