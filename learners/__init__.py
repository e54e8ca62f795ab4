"""The learner: DeepSpeed ranks of the policy (learner_rank), the group that fans calls out to
them (learner_group), their per-micro-batch math (policy) and weight sync to rollout workers
(weight_sync). Import the submodules; this package imports nothing heavy."""
