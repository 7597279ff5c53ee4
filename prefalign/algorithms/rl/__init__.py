"""The RL core GRPO and PPO share: experience (per-completion tokens, sampler / old / reference log-probs,
rewards, advantages, mask, room for values), rollout collection scored through `WeightedRewards.score_groups`,
and the source that turns a rollout batch into μ passes of optimizer steps for the one training loop."""
