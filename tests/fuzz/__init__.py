"""Fuzzing of every decoder of untrusted bytes (issue 11): the engine is :mod:`.harness`, the
targets are in :mod:`.targets`, ``scripts/fuzz`` runs a large budget and ``test_fuzz.py`` a small one."""
