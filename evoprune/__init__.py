"""evoprune: genetic-programming search for channel-pruning metrics. This package holds the CLI,
data sets, models, tasks, training, masks and allocators, records, export and report; the
top-level folders primitives/, evolve/, workers/, db/ and transfer/ install beside it as
`evoprune.primitives`, `evoprune.evolve`, ..."""

__version__ = "0.1.0"
