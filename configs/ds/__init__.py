"""DeepSpeed JSON configs shipped with the package: ``distributed.config: zero2`` finds zero2.json here."""
