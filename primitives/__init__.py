"""What can be measured: per-filter statistics, their collection, the operators and the expression
language, the DEAP primitive set and the baseline metrics; this folder installs as
`evoprune.primitives`."""
