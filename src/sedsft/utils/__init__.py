"""Helpers shared by the stages that belong to none of them: the command line checked before
Hydra starts, run directories, console output, pre-emption, CPU threads, batch sizes and
world size, schedules, code-keyed caches, and the analysis of multiruns."""
