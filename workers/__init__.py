"""How candidates are scored: the prune-and-finetune proxy and the in-process and Ray evaluators;
this folder installs as `evoprune.workers`."""
