"""The DEAP search engine, its configuration, the run as a service and its live display; this
folder installs as `evoprune.evolve`."""
